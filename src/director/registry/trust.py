"""What the operator trusts: which registry packages may run on this host.

``REGISTRY_TRUST`` decides, for servers installed from the registry as packages (npm, PyPI:
code that runs on the gateway host):

* ``none`` (the default) — none runs unless ``DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS`` is
  set. Anyone can publish to a public registry, and nothing there is reviewed: running it is a
  decision the operator takes by name, not one a default takes for them;
* ``allowlist`` — those whose name is in ``REGISTRY_ALLOW``, exactly
  (``io.github.acme/weather``) or by namespace (``io.github.acme/*``);
* ``any`` — every package entry of ``REGISTRY_URL`` (for a registry the operator curates).

Only a server installed from the registry ``REGISTRY_URL`` names now passes: a server
installed from another registry (before the setting changed) is refused at its next start.
Remote entries are plain https servers and pass the same rails as any other.
"""

from __future__ import annotations

from director.config import Settings
from director.playbooks.model import RegistrySource


def allowed_by_list(allow: tuple[str, ...], name: str) -> bool:
    namespace = name.split("/", 1)[0]
    return any(item == name or item == f"{namespace}/*" for item in allow)


def package_refusal(settings: Settings, source: RegistrySource) -> tuple[str, str, str] | None:
    """``(what, remedy, explanation)`` when the trust setting refuses this registry package,
    else None."""
    if source.registry != settings.registry_url:
        return ("packages installed from another registry",
                f"REGISTRY_URL={source.registry}",
                f"{source.name} was installed from {source.registry}, which is not REGISTRY_URL "
                f"({settings.registry_url}); install it again from the configured registry")
    if settings.registry_trust == "any":
        return None
    if settings.registry_trust == "allowlist":
        if allowed_by_list(settings.registry_allow, source.name):
            return None
        return ("registry packages not in REGISTRY_ALLOW", f"{source.name} in REGISTRY_ALLOW",
                f"{source.name} is not in REGISTRY_ALLOW; an operator can add it (or its "
                "namespace, e.g. " + source.name.split("/", 1)[0] + "/*)")
    return ("registry packages", "REGISTRY_TRUST=allowlist (with REGISTRY_ALLOW) or any",
            "registry packages run code on the gateway host and REGISTRY_TRUST=none; an "
            "operator can allow them by name with REGISTRY_TRUST=allowlist and REGISTRY_ALLOW, "
            "or all with REGISTRY_TRUST=any")
