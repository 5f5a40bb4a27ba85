"""What every Studio page shares: the Klein app its routes are added to, who is looking, CSRF
checks, HTML responses with their security headers, redirects, and error pages.

Page families (``pages/*.py``) are mixins of ``StudioBase`` whose methods are routed on
``studio`` (paths relative to ``/studio``); ``routes.Studio`` combines them.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import TYPE_CHECKING, Any

import attrs
from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed
from werkzeug.exceptions import NotFound as RouteNotFound

from director.accounts import store
from director.accounts.validation import ValidationFailed
from director.config import Settings
from director.db.database import Database, DatabaseUnavailable
from director.playbooks.cache import PlaybookCache
from director.playbooks.store import Playbook
from director.studio import csrf
from director.studio.assets import StaticFiles
from director.studio.forms import Form, read_form
from director.studio.templates.components import crumbs, error_box
from director.studio.templates.layout import Chrome, page, render
from director.web.auth import Authenticator, Principal, read_cookie
from director.web.errors import ApiError, Forbidden, NotFound, Unauthorized

if TYPE_CHECKING:
    from director.accounts.usage import KeyUsage
    from director.mcp.engine import McpEngine
    from director.studio.live import LiveHub
    from director.studio.workbench import Workbench
    from director.web.v1 import ApiV1

log = Logger(namespace="studio")

studio = Klein()

#: No inline script, style or event handler anywhere: only our own files, and images from
#: ``data:`` URLs (tool results carry images as base64).
CONTENT_SECURITY_POLICY = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")


class NeedLogin(Exception):
    """Nobody (or an expired session) is signed in: go to the login page."""


class CsrfRejected(Exception):
    """A state-changing form without a valid CSRF token."""


class AccountPending(Exception):
    """The account waits for an administrator (waitlist)."""


@attrs.frozen
class Viewer:
    """Who is looking at a page: the principal, their cookie session, their CSRF token."""

    principal: Principal
    session: store.Session
    token: str
    csrf: str

    @property
    def user(self) -> store.User:
        return self.principal.user


#: An upstream OAuth callback (``director.oauth.client.routes``): a browser that comes back
#: from an authorization server signed out signs in, then goes on to it.
_OAUTH_CALLBACK = re.compile(r"^/oauth/[^/?#\\]+/[^/?#\\]+/callback(\?[^#]*)?$")


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a Studio path, back to an OAuth authorization that asked
    to sign in, or an upstream OAuth callback (never another site)."""
    if value and (value.startswith(("/studio/", "/oauth/authorize?"))
                  or _OAUTH_CALLBACK.match(value)) \
            and not value.startswith("//") and "\\" not in value \
            and not any(ord(c) < 32 for c in value):
        return value
    return "/studio/"


class StudioBase:
    settings: Settings
    database: Database
    auth: Authenticator
    playbooks: PlaybookCache
    engine: McpEngine
    api: ApiV1
    tokens: csrf.CsrfTokens
    assets: StaticFiles
    workbench: Workbench
    live: LiveHub
    key_usage: KeyUsage
    reactor: Any  # the service's: its clock is the pages' (task.Clock in tests)
    #: ``director.oauth.client``'s ``UpstreamAuthorizations`` (None when not wired).
    oauth: Any

    # --- responses ------------------------------------------------------------------------

    def chrome(self, viewer: Viewer | None, section: str = "", playbook: str | None = None,
               live: bool = False) -> Chrome:
        return Chrome(css=self.assets.url("studio.css"), js=self.assets.url("studio.js"),
                      icon=self.assets.url("icon.svg"),
                      user_email=viewer.user.email if viewer is not None else None,
                      csrf=viewer.csrf if viewer is not None else None, section=section,
                      playbook=playbook, live=live)

    @staticmethod
    def html_headers(request: Request, status: int = 200) -> None:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY)
        request.setHeader(b"cache-control", b"no-store")
        request.responseHeaders.removeHeader(b"etag")

    def respond(self, request: Request, title: str, *content: Any, viewer: Viewer | None = None,
                status: int = 200, section: str = "", playbook: str | None = None,
                live: bool = False) -> bytes:
        self.html_headers(request, status)
        body = render(page(self.chrome(viewer, section, playbook, live), title, *content))
        started = getattr(request, "started", None)
        if started is not None:  # the server's time for this page (bench/studio.py reads it)
            # A DirectorRequest's, on its site's clock (director.web.edge).
            elapsed = (request.now() - started) * 1000  # type: ignore[attr-defined]
            request.setHeader(b"server-timing", f"app;dur={elapsed:.2f}".encode())
        return body

    @staticmethod
    def redirect(request: Request, location: str, status: int = 303) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"location", location.encode())
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.responseHeaders.removeHeader(b"etag")
        return b""

    # --- who is looking -------------------------------------------------------------------

    async def viewer(self, request: Request, allow_pending: bool = False) -> Viewer:
        """The signed-in user of a cookie session, or ``NeedLogin``/``AccountPending``."""
        try:
            principal = await self.auth.authenticate(request, allow_pending=True)
        except Unauthorized:
            raise NeedLogin() from None
        if principal.session is None or principal.session_token is None:
            raise NeedLogin()
        if principal.user.status == "pending" and self.settings.waitlist_enabled \
                and not allow_pending:
            raise AccountPending()
        return Viewer(principal, principal.session, principal.session_token,
                      self.tokens.for_session(principal.session.id))

    async def form_of(self, request: Request, allow_pending: bool = False) -> tuple[Viewer, Form]:
        """A signed-in user's form, its CSRF token checked before anything else is read."""
        viewer = await self.viewer(request, allow_pending)
        form = read_form(request)
        if not self.tokens.session_token_valid(viewer.session.id, form.get(csrf.FIELD) or None):
            raise CsrfRejected()
        return viewer, form

    def anonymous_csrf(self, request: Request) -> str:
        """The token for a form shown before signing in (setting its cookie if needed)."""
        value = read_cookie(request.getHeader(b"cookie"), csrf.ANONYMOUS_COOKIE)
        if not value:
            value = csrf.new_anonymous_value()
            secure = "; Secure" if self.auth.secure_cookie else ""
            request.responseHeaders.addRawHeader(
                b"set-cookie", f"{csrf.ANONYMOUS_COOKIE}={value}; Path=/studio; HttpOnly; "
                               f"SameSite=Lax{secure}".encode())
        return self.tokens.for_anonymous(value)

    def anonymous_form(self, request: Request) -> Form:
        form = read_form(request)
        value = read_cookie(request.getHeader(b"cookie"), csrf.ANONYMOUS_COOKIE)
        if not self.tokens.anonymous_token_valid(value, form.get(csrf.FIELD) or None):
            raise CsrfRejected()
        return form

    def owned(self, viewer: Viewer, playbook_id: str) -> Playbook:
        """The viewer's playbook, or 404: another user's playbook does not exist for them."""
        playbook = self.playbooks.get(viewer.user.id, playbook_id)
        if playbook is None:
            raise NotFound(f"no playbook {playbook_id!r}")
        return playbook

    @staticmethod
    def playbook_url(playbook: Playbook, *parts: str) -> str:
        quoted = [urllib.parse.quote(part, safe="") for part in parts]
        return "/".join(["/studio/playbooks", urllib.parse.quote(playbook.id, safe=""), *quoted])

    def playbook_crumbs(self, playbook: Playbook, *more: tuple[str, str]) -> Any:
        return crumbs(("Playbooks", "/studio/"), (playbook.name, self.playbook_url(playbook)),
                      *more)

    # --- error pages ----------------------------------------------------------------------

    def error_page(self, request: Request, status: int, title: str, message: str,
                   viewer: Viewer | None = None) -> bytes:
        from twisted.web.template import tags

        return self.respond(request, title, tags.h1(title), error_box(message),
                            tags.p(tags.a("Back to your playbooks", href="/studio/")),
                            viewer=viewer, status=status)


def _login_redirect(instance: StudioBase, request: Any, failure: Failure) -> bytes:
    target = request.uri.decode("latin-1") if request.method == b"GET" else "/studio/"
    return instance.redirect(
        request, "/studio/login?" + urllib.parse.urlencode({"next": safe_next(target)}))


def _pending(instance: StudioBase, request: Any, failure: Failure) -> bytes:
    return instance.redirect(request, "/studio/waiting")


def _csrf_rejected(instance: StudioBase, request: Any, failure: Failure) -> bytes:
    log.info("Studio form refused: missing or wrong CSRF token", path=request.path.decode(
        "latin-1"))
    return instance.error_page(
        request, 403, "This form has expired",
        "The form was not sent from this Studio page, or your session changed since it was "
        "shown (cross-site request forgery protection). Go back, reload the page and try "
        "again.")


def _route_not_found(instance: StudioBase, request: Any, failure: Failure) -> bytes:
    return instance.error_page(request, 404, "Not found", "There is no such page.")


def _method_not_allowed(instance: StudioBase, request: Any, failure: Failure) -> bytes:
    allowed = sorted(getattr(failure.value, "valid_methods", None) or [])
    if allowed:
        request.setHeader(b"allow", ", ".join(allowed).encode())
    return instance.error_page(request, 405, "Method not allowed",
                               f"{request.method.decode()} is not allowed here.")


def _api_error(instance: StudioBase, request: Any, failure: Failure) -> bytes:
    error = failure.value
    assert isinstance(error, ApiError)
    for name, value in error.headers.items():
        if name.lower() == "retry-after":
            request.setHeader(b"retry-after", value.encode())
    titles = {404: "Not found", 429: "Too many requests", 403: "Not allowed",
              503: "Temporarily unavailable", 415: "Cannot read this form",
              413: "Too large"}
    if isinstance(error, Forbidden) and error.code == "csrf_rejected":
        return _csrf_rejected(instance, request, failure)
    return instance.error_page(request, error.status, titles.get(error.status, "Cannot do that"),
                               error.message)


def _validation(instance: StudioBase, request: Any, failure: Failure) -> bytes:
    error = failure.value
    assert isinstance(error, ValidationFailed)
    return instance.error_page(request, 400, "Cannot do that", str(error))


def _unavailable(instance: StudioBase, request: Any, failure: Failure) -> bytes:
    request.setHeader(b"retry-after", b"2")
    return instance.error_page(request, 503, "Temporarily unavailable",
                               "The database is unavailable; retry in a moment.")


def _unexpected(instance: StudioBase, request: Any, failure: Failure) -> bytes:
    trace_id = getattr(request, "trace_id", "")
    log.failure("unhandled error in the Studio: {method} {path}", failure,
                method=request.method.decode(), path=request.path.decode("latin-1"),
                trace_id=trace_id)
    return instance.error_page(request, 500, "Something went wrong",
                               f"An unexpected error happened; the trace id {trace_id} is in "
                               "the daemon's log.")


for _exception, _handler in ((NeedLogin, _login_redirect), (AccountPending, _pending),
                             (CsrfRejected, _csrf_rejected), (RouteNotFound, _route_not_found),
                             (MethodNotAllowed, _method_not_allowed), (ApiError, _api_error),
                             (ValidationFailed, _validation),
                             (DatabaseUnavailable, _unavailable), (Exception, _unexpected)):
    studio.handle_errors(_exception)(_handler)  # type: ignore[arg-type]
