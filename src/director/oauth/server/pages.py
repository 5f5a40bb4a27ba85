"""The authorization endpoint: check the request, sign the person in, ask for consent.

``GET /oauth/authorize`` checks the request in the order that decides where an error may go
(RFC 6749 section 4.1.2.1): while the client or its redirect URI is in doubt, an error is a
page here, never a redirect (an attacker could name any URI); after that, errors go back to
the client's redirect URI with ``state`` and ``iss`` (RFC 9207). Then the person signs in with
the Studio's login page (which comes back here), and the consent page says who asks (the
client's name, and whether anyone vouches for it), where the answer goes (the redirect's
host, with a warning for this computer and for native applications), which playbook and what
it may do. Consent is asked every time: a silent grant to a client whose redirect target
nobody can verify (``localhost``) is what the MCP security considerations warn about, and
approving is one click.

The consent form posts the request's parameters back (nothing is kept between the two
requests: any instance answers either), with the Studio session's CSRF token; everything is
checked again before a code is issued. The page's Content-Security-Policy allows its form to
lead to the redirect URI's origin (or native scheme) and nowhere else: browsers check
``form-action`` against the redirect that follows the submission.
"""

from __future__ import annotations

import re
from urllib.parse import urlencode, urlsplit

import attrs
from klein import Klein
from twisted.logger import Logger
from twisted.web.server import Request
from twisted.web.template import Tag, tags

from director.oauth.server import clients as client_store
from director.oauth.server import grants
from director.oauth.server.clients import METADATA_DOCUMENT, REGISTERED, Client
from director.oauth.server.documents import DocumentError, is_document_url
from director.oauth.server.metadata import (
    AUTHORIZE_PATH,
    OFFLINE_ACCESS,
    SCOPE_DESCRIPTIONS,
    SCOPE_READ,
    InvalidResource,
    InvalidScope,
    Resource,
    parse_resource,
    parse_scope,
    scope_text,
    with_required,
)
from director.oauth.server.routes import ServerBase, oauth
from director.playbooks.store import Playbook
from director.studio.base import (
    CONTENT_SECURITY_POLICY,
    AccountPending,
    CsrfRejected,
    NeedLogin,
    Viewer,
)
from director.studio.templates.components import csrf_input, definition_rows, error_box

log = Logger(namespace="oauth")

app: Klein = oauth

#: The authorization request's parameters the consent form carries back.
CARRIED = ("response_type", "client_id", "redirect_uri", "scope", "state", "code_challenge",
           "code_challenge_method", "resource")
_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")


class PageError(Exception):
    """The request cannot be answered through the client: shown here as a page."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


class Refused(Exception):
    """An error the client gets on its redirect URI (RFC 6749 section 4.1.2.1)."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error, self.description = error, description


@attrs.frozen
class Destination:
    """Who asks, and where answers go: settled before any error may be redirected."""

    client: Client
    redirect_uri: str
    state: str | None


@attrs.frozen
class Checked:
    """An authorization request that passed every check."""

    resource: Resource
    scopes: tuple[str, ...]
    code_challenge: str


def _parameters(raw: dict[bytes, list[bytes]]) -> dict[str, list[str]]:
    try:
        parameters = {name.decode("utf-8"): [value.decode("utf-8") for value in values]
                      for name, values in raw.items()}
    except UnicodeDecodeError:
        raise PageError("the request's parameters are not UTF-8 text") from None
    return _without_nul(parameters)


def _without_nul(parameters: dict[str, list[str]]) -> dict[str, list[str]]:
    """No identifier, URI or token has a NUL, and PostgreSQL refuses it in text."""
    if any("\x00" in name or any("\x00" in value for value in values)
           for name, values in parameters.items()):
        raise PageError("the request's parameters hold a NUL character")
    return parameters


def _one(parameters: dict[str, list[str]], name: str) -> str | None:
    values = [value for value in parameters.get(name, ()) if value != ""]
    if len(values) > 1:
        raise Refused("invalid_request", f"{name} is given {len(values)} times")
    return values[0] if values else None


def consent_policy(redirect_uri: str) -> bytes:
    """The Studio's CSP, with ``form-action`` also allowing where this consent leads."""
    parts = urlsplit(redirect_uri)
    target = (f"{parts.scheme}://{parts.netloc}" if parts.scheme in ("http", "https")
              else f"{parts.scheme}:")
    return CONTENT_SECURITY_POLICY.replace(b"form-action 'self'",
                                           f"form-action 'self' {target}".encode())


class ConsentPages(ServerBase):
    app = oauth

    # --- checks ----------------------------------------------------------------------------

    async def find_client(self, client_id: str) -> Client:
        if is_document_url(client_id):
            try:
                return await self.documents.client(client_id)
            except DocumentError as problem:
                raise PageError(f"The application's identity could not be verified: "
                                f"{problem}.") from None
        client = await self.database.run(client_store.registered_client(client_id))
        if client is None:
            raise PageError(f"No application is registered as {client_id[:200]!r}: it may "
                            "have registered more than a day ago without being used, or on "
                            "another Director. Connect it again from the application.")
        return client

    async def destination(self,
                          parameters: dict[str, list[str]]) -> Destination:
        try:
            client_id = _one(parameters, "client_id")
            presented = _one(parameters, "redirect_uri")
        except Refused as refused:
            raise PageError(refused.description) from None
        if client_id is None:
            raise PageError("The request names no application (client_id is missing).")
        client = await self.find_client(client_id)
        redirect_uri = client_store.allowed_redirect(client, presented)
        if redirect_uri is None:
            raise PageError(
                f"{client.display_name} asked to send the answer to "
                f"{(presented or '(no redirect_uri)')[:300]!r}, which is not one of the "
                "addresses it registered. Nothing was sent.")
        states = parameters.get("state")
        return Destination(client, redirect_uri, states[0] if states else None)

    def checked(self, parameters: dict[str, list[str]],
                client: Client) -> Checked:
        response_type = _one(parameters, "response_type")
        if response_type != "code":
            raise Refused("unsupported_response_type", "response_type must be code")
        challenge = _one(parameters, "code_challenge")
        if challenge is None:
            raise Refused("invalid_request", "code_challenge is required (PKCE with S256)")
        if _one(parameters, "code_challenge_method") != "S256":
            raise Refused("invalid_request", "code_challenge_method must be S256")
        if not _CHALLENGE.fullmatch(challenge):
            raise Refused("invalid_request", "code_challenge must be the 43-character base64url "
                                             "SHA-256 of the code verifier")
        resources = [value for value in parameters.get("resource", ()) if value]
        if len(resources) != 1:
            raise Refused("invalid_target", "resource is required, once: the URL of the "
                                            "playbook's MCP endpoint (RFC 8707)")
        try:
            resource = parse_resource(self.settings, resources[0])
        except InvalidResource as problem:
            raise Refused("invalid_target", str(problem)) from None
        try:
            scopes = with_required(parse_scope(_one(parameters, "scope")))
        except InvalidScope as problem:
            raise Refused("invalid_scope", str(problem)) from None
        registered = client.metadata.get("scope")
        if registered:
            beyond = [scope for scope in scopes if scope not in registered.split()]
            if beyond:
                raise Refused("invalid_scope", f"this client registered scope {registered!r}, "
                                               f"not {' '.join(beyond)}")
        if client.refreshes:
            # A client registered for refresh tokens gets them only with offline_access, which
            # the consent page then shows (and the person may refuse) whether it asked or not.
            scopes = with_required((*scopes, OFFLINE_ACCESS))
        return Checked(resource, scopes, challenge)

    def playbook_of(self, viewer: Viewer, resource: Resource) -> Playbook:
        playbook = self.playbooks.get(viewer.user.id, resource.playbook_id)
        if playbook is None:
            raise Refused("invalid_target", f"{viewer.user.email} has no playbook "
                                            f"{resource.playbook_id!r}")
        return playbook

    # --- answers ---------------------------------------------------------------------------

    def back_to_client(self, request: Request, destination: Destination,
                       values: dict[str, str]) -> bytes:
        """Redirect to the client with ``values``, ``state`` and ``iss`` (RFC 9207)."""
        if destination.state is not None:
            values["state"] = destination.state
        values["iss"] = self.settings.base_url
        uri = destination.redirect_uri
        separator = "" if uri.endswith(("?", "&")) else "&" if "?" in uri else "?"
        request.setResponseCode(302)
        request.setHeader(b"location", (uri + separator + urlencode(values)).encode("utf-8"))
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b""

    def refused(self, request: Request, destination: Destination,
                refusal: Refused) -> bytes:
        log.info("OAuth authorization refused: {error}: {reason}", error=refusal.error,
                 reason=refusal.description, client_id=destination.client.client_id)
        return self.back_to_client(request, destination, {
            "error": refusal.error, "error_description": refusal.description})

    def problem_page(self, request: Request, error: PageError,
                     viewer: Viewer | None = None) -> bytes:
        return self.studio.respond(
            request, "Cannot connect this application",
            tags.div(tags.h1("Cannot connect this application"), error_box(error.message),
                     tags.p("Nothing was shared with the application. Go back to it and "
                            "connect again.", class_="hint"),
                     class_="card narrow"),
            viewer=viewer, status=error.status)

    def to_login(self, request: Request, parameters: dict[str, list[str]]
                 ) -> bytes:
        query = urlencode([(name, value) for name in CARRIED
                           for value in parameters.get(name, ())])
        return self.studio.redirect(request, "/studio/login?" + urlencode(
            {"next": f"{AUTHORIZE_PATH}?{query}"}), 302)

    # --- the endpoint ----------------------------------------------------------------------

    @app.route(AUTHORIZE_PATH, methods=["GET", "HEAD"])
    async def authorize(self, request: Request) -> bytes:
        try:
            parameters = _parameters(request.args)
            destination = await self.destination(parameters)
        except PageError as error:
            return self.problem_page(request, error)
        try:
            checked = self.checked(parameters, destination.client)
            viewer = await self.studio.viewer(request)
            playbook = self.playbook_of(viewer, checked.resource)
        except Refused as refusal:
            return self.refused(request, destination, refusal)
        except NeedLogin:
            return self.to_login(request, parameters)
        except AccountPending:
            return self.studio.redirect(request, "/studio/waiting", 302)
        return self.consent_page(request, viewer, parameters, destination, checked, playbook)

    @app.route(AUTHORIZE_PATH, methods=["POST"])
    async def decide(self, request: Request) -> bytes:
        try:
            viewer, form = await self.studio.form_of(request)
        except NeedLogin:
            return self.studio.redirect(request, "/studio/login", 303)
        except AccountPending:
            return self.studio.redirect(request, "/studio/waiting", 303)
        except CsrfRejected:
            return self.problem_page(request, PageError(
                "The consent form was not sent from this Director's page, or your session "
                "changed since it was shown. Connect the application again.", 403))
        try:
            parameters = _without_nul({name: form.all(name) for name in CARRIED})
            destination = await self.destination(parameters)
        except PageError as error:
            return self.problem_page(request, error, viewer)
        try:
            checked = self.checked(parameters, destination.client)
            playbook = self.playbook_of(viewer, checked.resource)
            if form.get("decision") != "allow":
                raise Refused("access_denied", f"{viewer.user.email} denied access")
        except Refused as refusal:
            return self.refused(request, destination, refusal)
        chosen = form.all("grant")
        scopes = with_required(tuple(scope for scope in checked.scopes
                                     if scope == SCOPE_READ or scope in chosen))
        client = destination.client
        if client.kind == METADATA_DOCUMENT:
            await self.database.run(client_store.save_document_client(client))
        code = await self.database.run(grants.create_code(grants.CodeRequest(
            client.client_id, viewer.user.id, playbook.pk, checked.resource.url,
            scope_text(scopes), destination.redirect_uri, checked.code_challenge)))
        log.info("OAuth authorization approved for {client} on playbook {playbook}",
                 client=client.display_name, playbook=playbook.id, client_id=client.client_id,
                 user_id=str(viewer.user.id), scope=scope_text(scopes))
        return self.back_to_client(request, destination, {"code": code})

    # --- the consent page ------------------------------------------------------------------

    def consent_page(self, request: Request, viewer: Viewer,
                     parameters: dict[str, list[str]], destination: Destination,
                     checked: Checked, playbook: Playbook) -> bytes:
        client = destination.client
        name = client.display_name
        hidden = [tags.input(type="hidden", name=field, value=value)
                  for field in CARRIED for value in parameters.get(field, ())[:1]]
        body = tags.div(
            tags.h1(f"Connect {name}?"),
            tags.p(tags.strong(name), " asks to use your playbook ", tags.strong(playbook.name),
                   f" as {viewer.user.email}.", class_="lead"),
            definition_rows([
                ("Application", [name, " ", _identity_badge(client)]),
                ("Identified as", tags.code(client.client_id)),
                ("Returns to", [tags.strong(_redirect_host(destination.redirect_uri)), " ",
                                tags.code(destination.redirect_uri)]),
                ("Playbook", [playbook.name, " ", tags.code(playbook.id)]),
            ]),
            *_warnings(client, destination.redirect_uri),
            tags.h2("It will be able to"),
            tags.form(
                csrf_input(viewer.csrf), *hidden,
                tags.ul(*[_scope_item(scope) for scope in checked.scopes], class_="plain"),
                tags.div(
                    tags.button("Allow", type="submit", name="decision", value="allow"),
                    tags.button("Deny", type="submit", name="decision", value="deny",
                                class_="secondary"),
                    class_="actions"),
                method="post", action=AUTHORIZE_PATH),
            tags.p("You can disconnect it at any time under ",
                   tags.a("Account → Connected apps", href="/studio/account/apps"), ".",
                   class_="hint"),
            class_="card narrow")
        page = self.studio.respond(request, f"Connect {name}", body, viewer=viewer)
        request.setHeader(b"content-security-policy", consent_policy(destination.redirect_uri))
        return page


def _identity_badge(client: Client) -> Tag:
    if client.kind == REGISTERED:
        return tags.span("unverified", class_="badge tag-shadowed",
                         title="It registered itself: nobody checked its name")
    host = urlsplit(client.client_id).hostname or ""
    return tags.span(f"published by {host}", class_="badge status-connected")


def _redirect_host(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        return parts.hostname or uri
    return f"the {parts.scheme}: application"


def _warnings(client: Client, redirect_uri: str) -> list[Tag]:
    name = client.display_name
    found: list[Tag] = []
    if client.kind == REGISTERED:
        found.append(tags.p(
            tags.strong("Unverified application. "),
            f"It registered itself with Director; “{name}” is the name it gave, and nobody "
            "checked it. Allow only if you are connecting this application yourself, now."))
    else:
        published = urlsplit(client.client_id).hostname
        target = urlsplit(redirect_uri).hostname
        if target is not None and published != target and \
                client_store.redirect_kind(redirect_uri) == "https":
            found.append(tags.p(tags.strong("Another host. "),
                                f"The application is published by {published} but returns "
                                f"to {target}."))
    kind = client_store.redirect_kind(redirect_uri)
    if kind == "loopback":
        found.append(tags.p(
            tags.strong("It returns to a program on this computer"),
            f" ({urlsplit(redirect_uri).netloc}). Any program can listen there and claim to "
            f"be {name}: allow only if you just started connecting it on this computer."))
    elif kind == "native":
        found.append(tags.p(
            tags.strong("It returns to an application on this computer"),
            f" through the {urlsplit(redirect_uri).scheme}: scheme, which any installed "
            "application may claim."))
    if not found:
        return []
    return [tags.div(*found, class_="secret-once", role="note")]


def _scope_item(scope: str) -> Tag:
    description = SCOPE_DESCRIPTIONS[scope]
    if scope == SCOPE_READ:
        return tags.li(description, tags.span(" (always)", class_="muted small"))
    identifier = "grant-" + scope.replace(":", "-").replace("_", "-")
    return tags.li(tags.label(
        tags.input(type="checkbox", name="grant", value=scope, id=identifier,
                   checked="checked"), " ", description, for_=identifier, class_="inline"))
