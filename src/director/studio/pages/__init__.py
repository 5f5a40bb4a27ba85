"""The Studio's pages, one module per family; each is a mixin of ``base.StudioBase``."""

#: Messages a redirect may ask the next page to show (``?notice=<code>``): fixed texts only,
#: so nothing from the query string is ever reflected into a page.
NOTICES = {
    "signed-out": "You are signed out.",
    "created": "Playbook created.",
    "renamed": "Playbook saved.",
    "deleted": "Playbook deleted.",
    "server-added": "Server added. Its tools appear below once it has started.",
    "server-saved": "Server saved.",
    "server-updated": "Server updated from the registry.",
    "server-removed": "Server removed.",
    "restarted": "Server restarting.",
    "tools-saved": "Tool settings saved.",
    "prompt-saved": "Prompt saved.",
    "prompt-removed": "Prompt removed.",
    "imported": "Playbook imported.",
    "unchanged": "The document matches the playbook: nothing changed.",
    "password-changed": "Password changed. Your other sessions were signed out.",
    "others-signed-out": "Every other session was signed out.",
    "session-ended": "Session signed out.",
    "key-revoked": "API key revoked. Clients using it are refused from now on.",
    "server-authorized": "Server authorized. Its tools appear below once it has connected.",
    "server-disconnected": "Server disconnected: its tokens were revoked and deleted.",
    "authorization-lost": "The authorization came back for a playbook or server that no "
                          "longer exists; nothing was stored.",
}


def notice_for(request: object) -> str | None:
    args = getattr(request, "args", {}) or {}
    code = (args.get(b"notice") or [b""])[0].decode("latin-1")
    return NOTICES.get(code)
