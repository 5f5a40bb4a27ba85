"""``/api/v1`` routes of accounts: sign-up, login, logout, the caller, API keys."""

from __future__ import annotations

from typing import Any

from twisted.internet import threads
from twisted.logger import Logger
from twisted.web.server import Request

from director.accounts import store
from director.accounts.credentials import (
    DUMMY_PASSWORD_HASH,
    generate_session_token,
    hash_password,
    verify_password,
)
from director.accounts.ratelimit import Limit
from director.accounts.throttle import LoginThrottle
from director.accounts.validation import ValidationFailed, check_name, check_password, normalise_email
from director.config import Settings
from director.db.database import Database
from director.web.api import (
    api,
    decode_cursor,
    encode_cursor,
    page_size,
    reject_unknown_fields,
    require_field,
)
from director.web.auth import Authenticator, parse_uuid, too_many_requests
from director.web.errors import (
    Conflict,
    Forbidden,
    NotFound,
    TooManyRequests,
    Unauthorized,
    read_json_object,
    write_json,
)

log = Logger(namespace="accounts")


class AccountRoutes:
    settings: Settings
    database: Database
    auth: Authenticator
    throttle: LoginThrottle

    # --- sign-up, login, logout ---------------------------------------------------------

    async def _start_session(self, request: Request, user: store.User) -> None:
        token = generate_session_token()
        session = await self.database.run(store.create_session(
            user.id, token, (request.getHeader(b"user-agent") or b"").decode("latin-1"),
            self.auth.client_address(request)))
        self.auth.cache.remember_session(token, session)
        self.auth.set_session_cookie(request, token, session.expires_at)

    def _credentials(self, request: Request) -> tuple[str, str]:
        body = read_json_object(request)
        reject_unknown_fields(body, {"email", "password", "name"})
        fields: dict[str, str] = {}
        email = password = ""
        try:
            email = normalise_email(require_field(body, "email"))
        except ValidationFailed as error:
            fields.update(error.fields)
        try:
            password = check_password(require_field(body, "password"))
        except ValidationFailed as error:
            fields.update(error.fields)
        if fields:
            raise ValidationFailed(fields)
        return email, password

    async def _limit_signups(self, request: Request) -> None:
        """At most SIGNUP_RATE_LIMIT_PER_HOUR per client address in any hour, across instances
        (the same leases as every rate limit). Counted before the password is hashed, which is
        the costly part, and after the body is checked, so that mistakes cost nothing."""
        address = self.auth.client_address(request)
        decision = await self.auth.limiter.check(Limit(
            "signup", address, self.settings.signup_rate_limit_per_hour, 3600,
            "sign-ups from this address"))
        for name, value in decision.headers().items():
            request.setHeader(name.encode(), value.encode())
        if not decision.allowed:
            log.info("sign-up refused: too many from {address}", address=address)
            raise too_many_requests(decision)

    @api.route("/auth/signup", methods=["POST"])
    async def signup(self, request: Request) -> bytes:
        email, password = self._credentials(request)
        await self._limit_signups(request)
        password_hash = await threads.deferToThread(hash_password, password)
        status = "pending" if self.settings.waitlist_enabled else "active"
        try:
            user, key = await self.database.run(store.create_user(email, password_hash, status))
        except store.EmailTaken:
            raise Conflict("an account with this email already exists",
                           details={"fields": {"email": "is already registered"}}) from None
        assert key is not None
        self.auth.cache.users[user.id] = user
        self.auth.cache.remember_key(key.record)
        await self._start_session(request, user)
        log.info("user signed up", user_id=str(user.id), status=status)
        return write_json(request, 201, {"user": user.public(), "api_key": key.public()})

    @api.route("/auth/login", methods=["POST"])
    async def login(self, request: Request) -> bytes:
        try:
            email, password = self._credentials(request)
        except ValidationFailed as error:
            if "password" in error.fields and len(error.fields) == 1:
                # A too-short password is simply wrong; do not teach guessers the rules.
                raise Unauthorized("wrong email or password", code="invalid_credentials") \
                    from None
            raise
        address = self.auth.client_address(request)
        wait = self.throttle.retry_after(email, address)
        if wait:
            raise TooManyRequests(f"too many failed logins; retry in {wait} s",
                                  details={"retry_after": wait},
                                  headers={"Retry-After": str(wait)})
        user = await self.database.run(store.user_by_email(email))
        stored = user.password_hash if user is not None else DUMMY_PASSWORD_HASH
        matches = await threads.deferToThread(verify_password, password, stored)
        if user is None or not matches:
            self.throttle.failed(email, address)
            log.info("failed login", email=email, address=address)
            raise Unauthorized("wrong email or password", code="invalid_credentials")
        if user.status == "disabled":
            raise Forbidden("this account is disabled", code="user_disabled")
        self.throttle.succeeded(email)
        await self._start_session(request, user)
        return write_json(request, 200, {"user": user.public()})

    @api.route("/auth/logout", methods=["POST"])
    async def logout(self, request: Request) -> bytes:
        principal = await self.auth.authenticate(request, allow_pending=True)
        if principal.session_token is not None:
            await self.database.run(store.delete_session(principal.session_token))
            self.auth.cache.forget_session(principal.session_token)
        self.auth.clear_session_cookie(request)
        request.setResponseCode(204)
        return b""

    # --- the caller ---------------------------------------------------------------------

    @api.route("/me", methods=["GET"])
    async def me(self, request: Request) -> bytes:
        principal = await self.auth.authenticate(request, allow_pending=True)
        body: dict[str, Any] = {**principal.user.public(), "authenticated_by": principal.via}
        if principal.key is not None:
            body["api_key"] = principal.key.public()
        return write_json(request, 200, body)

    @api.route("/me/password", methods=["POST"])
    async def change_password(self, request: Request) -> bytes:
        principal = await self.auth.authenticate(request, allow_pending=True)
        body = read_json_object(request)
        reject_unknown_fields(body, {"current_password", "new_password"})
        current = require_field(body, "current_password")
        new = check_password(require_field(body, "new_password"), "new_password")
        if not isinstance(current, str):
            raise ValidationFailed({"current_password": "must be a string"})
        user = await self.database.run(store.user_by_id(principal.user.id))
        if user is None or not await threads.deferToThread(verify_password, current,
                                                           user.password_hash):
            raise Forbidden("the current password is wrong", code="invalid_credentials")
        new_hash = await threads.deferToThread(hash_password, new)
        await self.database.run(store.set_password(user.id, new_hash))
        if principal.session_token is not None:
            self.auth.cache.forget_session(principal.session_token)
            await self._start_session(request, user)  # the other sessions are gone
        request.setResponseCode(204)
        return b""

    # --- API keys -----------------------------------------------------------------------

    @api.route("/api-keys", methods=["GET"])
    async def list_keys(self, request: Request) -> bytes:
        principal = await self.auth.authenticate(request)
        limit = page_size(request)
        after = decode_cursor(request, 2)
        keys = await self.database.run(store.keys_of(
            principal.user.id, limit + 1, (after[0], after[1]) if after else None))
        body: dict[str, Any] = {"items": [key.public() for key in keys[:limit]],
                                "next_cursor": None}
        if len(keys) > limit:
            last = keys[limit - 1]
            body["next_cursor"] = encode_cursor(last.created_at.isoformat(), str(last.id))
        return write_json(request, 200, body)

    @api.route("/api-keys", methods=["POST"])
    async def create_key(self, request: Request) -> bytes:
        principal = await self.auth.authenticate(request)
        body = read_json_object(request)
        reject_unknown_fields(body, {"name"})
        name = check_name(require_field(body, "name"))
        try:
            new = await self.database.run(store.create_key(principal.user.id, name))
        except store.NameTaken:
            raise Conflict(f"you already have an API key named {name!r}",
                           details={"fields": {"name": "is already in use"}}) from None
        self.auth.cache.remember_key(new.record)
        return write_json(request, 201, new.public())

    @api.route("/api-keys/<key_id>", methods=["DELETE"])
    async def revoke_key(self, request: Request, key_id: str) -> bytes:
        principal = await self.auth.authenticate(request)
        try:
            revoked = await self.database.run(store.revoke_key(principal.user.id,
                                                               parse_uuid(key_id)))
        except store.NoSuchThing:
            raise NotFound(f"no API key {key_id!r}") from None
        self.auth.cache.key_revoked(revoked.id)
        request.setResponseCode(204)
        return b""

    @api.route("/api-keys/<key_id>/regenerate", methods=["POST"])
    async def regenerate_key(self, request: Request, key_id: str) -> bytes:
        principal = await self.auth.authenticate(request)
        try:
            new = await self.database.run(store.regenerate_key(principal.user.id,
                                                               parse_uuid(key_id)))
        except store.NoSuchThing:
            raise NotFound(f"no API key {key_id!r}") from None
        self.auth.cache.key_revoked(parse_uuid(key_id))
        self.auth.cache.remember_key(new.record)
        return write_json(request, 200, new.public())
