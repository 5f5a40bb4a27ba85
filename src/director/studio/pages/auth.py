"""First-run setup, sign-in, sign-up (with the waitlist), sign-out; the static files and the
live event stream also live here, being the pages' plumbing rather than pages."""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.internet import threads
from twisted.logger import Logger
from twisted.web.server import Request
from twisted.web.template import Tag, tags

from director.accounts.credentials import hash_password
from director.accounts.validation import ValidationFailed, check_password, normalise_email
from director.studio import setup
from director.studio.base import StudioBase, safe_next, studio
from director.studio.forms import call_api, problems
from director.studio.pages import notice_for
from director.studio.templates.components import csrf_input, error_box, field, notice, snippet
from director.web.auth import client_address
from director.web.errors import ApiError, NotFound, TooManyRequests
from director.web.mcp_routes import STREAMING

log = Logger(namespace="studio")

app: Klein = studio


def _setup_attempt(request: Request) -> tuple[str, str]:
    """The throttle's keys for a setup link tried from this address: the address alone. The
    link is unguessable, so the throttle only slows a scan; keyed on the page, anyone who can
    reach it could lock its owner out by failing first."""
    address = client_address(request)
    return f"studio-setup {address}", address


class AuthPages(StudioBase):
    # --- plumbing -------------------------------------------------------------------------

    @app.route("/static/<name>", methods=["GET", "HEAD"])
    def static(self, request: Request, name: str) -> bytes:
        asset = self.assets.get(name)
        if asset is None:
            raise NotFound(f"no static file {name!r}")
        request.setHeader(b"content-type", asset.content_type)
        request.setHeader(b"cache-control", b"public, max-age=31536000, immutable")
        request.setHeader(b"vary", b"Accept-Encoding")
        accepted = (request.getHeader(b"accept-encoding") or b"").lower()
        if b"gzip" in accepted:
            request.setHeader(b"content-encoding", b"gzip")
            return asset.gzipped
        return asset.body

    @app.route("/events", methods=["GET"])
    async def events(self, request: Request) -> Any:
        viewer = await self.viewer(request)
        self.live.open(request, viewer.user.id, viewer.token)
        return STREAMING

    # --- first run ------------------------------------------------------------------------

    def _setup_form(self, request: Request, token: str, email: str = "",
                    message: str | None = None, fields: dict[str, str] | None = None,
                    status: int = 200) -> bytes:
        return self.respond(request, "Set up Director", tags.div(
            tags.h1("Welcome to Director"),
            tags.p("Create the first account. It can then create playbooks, API keys and more "
                   "accounts' invitations; other people sign up or are added with "
                   "`director users create`.", class_="lead"),
            error_box(message, fields),
            tags.form(
                csrf_input(self.anonymous_csrf(request)),
                tags.input(type="hidden", name="token", value=token),
                field("Email", "email", email, kind="email", errors=fields, required=True,
                      autocomplete="username"),
                field("Password", "password", kind="password", errors=fields, required=True,
                      autocomplete="new-password", hint="At least 8 characters.",
                      minlength="8"),
                field("Password again", "password_again", kind="password", errors=fields,
                      required=True, autocomplete="new-password"),
                tags.div(tags.button("Create the account", type="submit"), class_="actions"),
                method="post", action="/studio/setup"),
            class_="card narrow"), status=status)

    def _setup_link_problem(self, request: Request, title: str, message: str,
                            status: int) -> bytes:
        return self.respond(request, title, tags.div(
            tags.h1(title), error_box(message),
            tags.p("Open the link the daemon wrote in its log at start "
                   "(", tags.code("journalctl -u director | grep setup"), "), or print a fresh "
                   "one on the server with:"),
            snippet("setup-url", "director setup-url", "the command (as root)"),
            class_="card narrow"), status=status)

    def _setup_closed(self) -> bool:
        return bool(self.auth.cache.users)

    @app.route("/setup", methods=["GET"])
    async def setup_page(self, request: Request) -> bytes:
        if self._setup_closed():
            raise NotFound("the setup page is closed: an account exists already")
        token = (request.args.get(b"token") or [b""])[0].decode("latin-1")
        if not token:
            return self._setup_link_problem(
                request, "Set up Director", "This page needs the one-time setup link.", 200)
        self._check_setup_throttle(request)
        if not await self.database.run(setup.token_valid(token)):
            self.api.throttle.failed(*_setup_attempt(request))
            return self._setup_link_problem(
                request, "This setup link does not work",
                "The link is not valid: it was used, replaced by a newer one, or is more "
                "than a day old.", 403)
        return self._setup_form(request, token)

    def _check_setup_throttle(self, request: Request) -> None:
        wait = self.api.throttle.retry_after(*_setup_attempt(request))
        if wait:
            raise TooManyRequests(f"too many wrong setup links; retry in {wait} s",
                                  headers={"Retry-After": str(wait)})

    @app.route("/setup", methods=["POST"])
    async def setup_submit(self, request: Request) -> bytes:
        if self._setup_closed():
            raise NotFound("the setup page is closed: an account exists already")
        form = self.anonymous_form(request)
        self._check_setup_throttle(request)
        token, email = form.get("token"), form.get("email")
        try:
            email, password = self._checked_credentials(email, form.get("password"),
                                                        form.get("password_again"))
        except ValidationFailed as error:
            return self._setup_form(request, token, email, "Please correct the following.",
                                    error.fields, 400)
        password_hash = await threads.deferToThread(hash_password, password)
        try:
            user, key = await self.database.run(setup.create_first_user(token, email,
                                                                        password_hash))
        except setup.SetupClosed:
            raise NotFound("the setup page is closed: an account exists already") from None
        except setup.TokenInvalid:
            self.api.throttle.failed(*_setup_attempt(request))
            return self._setup_link_problem(
                request, "This setup link does not work",
                "The link is not valid: it was used, replaced by a newer one, or is more "
                "than a day old.", 403)
        self.auth.cache.users[user.id] = user
        if key is not None:
            self.auth.cache.remember_key(key.record)
        await self.api._start_session(request, user)
        log.info("first account created in the Studio", user_id=str(user.id))
        return self._welcome(request, user.email, key.record.name if key else None,
                             key.value if key else None)

    @staticmethod
    def _checked_credentials(email: str, password: str, again: str) -> tuple[str, str]:
        fields: dict[str, str] = {}
        try:
            email = normalise_email(email)
        except ValidationFailed as error:
            fields.update(error.fields)
        try:
            check_password(password)
        except ValidationFailed as error:
            fields.update(error.fields)
        if password != again:
            fields["password_again"] = "does not match the password"  # noqa: S105
        if fields:
            raise ValidationFailed(fields)
        return email, password

    def _welcome(self, request: Request, email: str, key_name: str | None,
                 key_value: str | None) -> bytes:
        """After setup or sign-up: the account's first API key, shown this once."""
        parts: list[Any] = [tags.h1("Your account is ready"),
                            tags.p(f"Signed in as {email}.", class_="lead")]
        if key_name is not None and key_value is not None:
            parts.append(tags.div(
                tags.h2("Your API key"),
                tags.p("Every account starts with an API key named ", tags.code(key_name),
                       ". Copy it now: it is shown only this once (you can create more, and "
                       "revoke this one, under Account)."),
                snippet("new-key", key_value, "the API key"),
                class_="secret-once"))
        parts.append(tags.div(tags.a("Go to your playbooks", href="/studio/", class_="button"),
                              class_="actions"))
        return self.respond(request, "Welcome", tags.div(*parts, class_="card narrow"))

    # --- sign in, sign up, sign out -------------------------------------------------------

    def _credentials_form(self, request: Request, *, title: str, action: str, button: str,
                          email: str = "", next_path: str = "", message: str | None = None,
                          fields: dict[str, str] | None = None, status: int = 200,
                          new_password: bool = False, extra: Any = "") -> bytes:
        return self.respond(request, title, tags.div(
            tags.h1(title), notice(notice_for(request)), error_box(message, fields),
            tags.form(
                csrf_input(self.anonymous_csrf(request)),
                tags.input(type="hidden", name="next", value=next_path),
                field("Email", "email", email, kind="email", errors=fields, required=True,
                      autocomplete="username"),
                field("Password", "password", kind="password", errors=fields, required=True,
                      autocomplete="new-password" if new_password else "current-password",
                      hint="At least 8 characters." if new_password else None),
                tags.div(tags.button(button, type="submit"), class_="actions"),
                method="post", action=action),
            extra, class_="card narrow"), status=status)

    def organisation_link(self, next_path: str) -> Tag | str:
        """Another way to sign in (``oauth/server/organisation.py`` overrides it), or none."""
        return ""

    def _login_form(self, request: Request, **options: Any) -> bytes:
        return self._credentials_form(
            request, title="Sign in", action="/studio/login", button="Sign in",
            extra=tags.div(self.organisation_link(options.get("next_path", "")),
                           tags.p("No account yet? ", tags.a("Sign up", href="/studio/signup"))),
            **options)

    def _signup_form(self, request: Request, **options: Any) -> bytes:
        waitlist: Tag | str = tags.p(
            "New accounts wait for an administrator to activate them.", class_="hint") \
            if self.settings.waitlist_enabled else ""
        return self._credentials_form(
            request, title="Sign up", action="/studio/signup", button="Create my account",
            new_password=True,
            extra=tags.div(waitlist, tags.p("Have an account? ",
                                            tags.a("Sign in", href="/studio/login"))),
            **options)

    async def _signed_in(self, request: Request) -> bool:
        try:
            await self.viewer(request, allow_pending=True)
        except Exception:
            return False
        return True

    @app.route("/login", methods=["GET"])
    async def login_page(self, request: Request) -> bytes:
        next_path = safe_next((request.args.get(b"next") or [b""])[0].decode("latin-1"))
        if await self._signed_in(request):
            return self.redirect(request, next_path)
        return self._login_form(request, next_path=next_path)

    @app.route("/login", methods=["POST"])
    async def login_submit(self, request: Request) -> bytes:
        form = self.anonymous_form(request)
        email, next_path = form.get("email"), safe_next(form.get("next"))
        try:
            await call_api(request, self.api.login,
                           body={"email": email, "password": form.get("password")})
        except (ApiError, ValidationFailed) as error:
            message, fields = problems(error)
            status = error.status if isinstance(error, ApiError) else 400
            if isinstance(error, TooManyRequests):
                request.setHeader(b"retry-after", error.headers.get("Retry-After", "1").encode())
            return self._login_form(request, email=email, next_path=next_path, message=message,
                                    fields=fields, status=status)
        return self.redirect(request, next_path)

    @app.route("/signup", methods=["GET"])
    async def signup_page(self, request: Request) -> bytes:
        if await self._signed_in(request):
            return self.redirect(request, "/studio/")
        return self._signup_form(request)

    @app.route("/signup", methods=["POST"])
    async def signup_submit(self, request: Request) -> bytes:
        form = self.anonymous_form(request)
        email = form.get("email")
        try:
            _, answer = await call_api(request, self.api.signup,
                                       body={"email": email, "password": form.get("password")})
        except (ApiError, ValidationFailed) as error:
            message, fields = problems(error)
            status = error.status if isinstance(error, ApiError) else 400
            return self._signup_form(request, email=email, message=message, fields=fields,
                                     status=status)
        if answer["user"]["status"] == "pending":
            return self.redirect(request, "/studio/waiting")
        return self._welcome(request, answer["user"]["email"], answer["api_key"]["name"],
                             answer["api_key"]["key"])

    @app.route("/waiting", methods=["GET"])
    async def waiting(self, request: Request) -> bytes:
        viewer = await self.viewer(request, allow_pending=True)
        if viewer.user.status != "pending" or not self.settings.waitlist_enabled:
            return self.redirect(request, "/studio/")
        return self.respond(request, "Almost there", tags.div(
            tags.h1("Your account is on the waitlist"),
            tags.p(f"{viewer.user.email} is waiting for an administrator to activate it. "
                   "Once it is active, this page takes you to your playbooks."),
            tags.p("An administrator activates it with ",
                   tags.code(f"director users activate {viewer.user.email}"), "."),
            tags.form(csrf_input(viewer.csrf), tags.button("Sign out", type="submit",
                                                           class_="secondary"),
                      method="post", action="/studio/logout"),
            # No navigation: a pending account has no playbooks or account pages yet.
            class_="card narrow"))

    @app.route("/logout", methods=["POST"])
    async def logout(self, request: Request) -> bytes:
        _, _form = await self.form_of(request, allow_pending=True)
        await call_api(request, self.api.logout)
        return self.redirect(request, "/studio/login?notice=signed-out")
