"""``director users|keys|seed``: the real command against real PostgreSQL and a real daemon."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from director.accounts.credentials import verify_password
from director.db import migrate
from tests.harness import DIRECTOR, Daemon, base_environment, free_port, query

PRODUCTION = {
    "NODE_ENV": "production",
    "DATABASE_URL": "postgres://director:pw@db.internal:5432/director",
    "BASE_URL": "https://director.example.com",
}
KEY = re.compile(r"^dk_[A-Za-z0-9]{64}$")


def director(url: str | None, *args: str, stdin: str | None = None,
             **env: str) -> subprocess.CompletedProcess[str]:
    if url is not None:
        env.setdefault("DATABASE_URL", url)
    return subprocess.run(
        [DIRECTOR, *args], env=base_environment(**env), capture_output=True, text=True,
        input=stdin, stdin=subprocess.DEVNULL if stdin is None else None, timeout=60,
        check=False)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def fails(result: subprocess.CompletedProcess[str], code: int, fragment: str) -> str:
    """A failure: the exit status, one line on stderr containing *fragment*, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    return result.stderr.strip()


def create_user(url: str, email: str, password: str = "correct horse",  # noqa: S107
                *extra: str) -> Any:
    out = ok(director(url, "users", "create", "--email", email, "--password-stdin", "--json",
                      *extra, stdin=password + "\n"))
    return json.loads(out)


def stored_hash(url: str, email: str) -> str:
    return str(query(url, "SELECT password_hash FROM users WHERE email = %s", email)[0][0])


def wait_for_status(daemon: Daemon, path: str, headers: dict[str, str], wanted: int,
                    within: float) -> float:
    started = time.monotonic()
    while True:
        status, _, body = daemon.request("GET", path, headers=headers)
        elapsed = time.monotonic() - started
        if status == wanted:
            return elapsed
        assert elapsed < within, f"still {status} after {elapsed:.2f} s: {body!r}"
        time.sleep(0.02)


# --- users --------------------------------------------------------------------------------


def test_users_create_and_list(migrated_url: str) -> None:
    human = ok(director(migrated_url, "users", "create", "--email", " Alice@Example.COM ",
                        "--password-stdin", stdin="pass word  \n\n"))
    assert "created user alice@example.com (active)" in human
    assert "dk_" in human and not re.search(r"dk_[A-Za-z0-9]{64}", human)  # only the prefix
    # Exactly one trailing newline is removed; the rest of the password is kept as typed.
    assert verify_password("pass word  \n", stored_hash(migrated_url, "alice@example.com"))

    bob = create_user(migrated_url, "bob@example.com", "bob's password", "--pending")
    assert bob["email"] == "bob@example.com" and bob["status"] == "pending" and bob["id"]
    assert bob["api_key"]["name"] == "default" and "key" not in bob["api_key"]
    carol = create_user(migrated_url, "carol@example.com", "carol's password", "--show-key")
    assert KEY.match(carol["api_key"]["key"])
    rows = query(migrated_url, "SELECT u.email, u.status, k.name FROM users u "
                 "JOIN api_keys k ON k.user_id = u.id ORDER BY u.email")
    assert rows == [("alice@example.com", "active", "default"),
                    ("bob@example.com", "pending", "default"),
                    ("carol@example.com", "active", "default")]

    listed = json.loads(ok(director(migrated_url, "users", "list", "--json")))["users"]
    assert [(u["email"], u["status"]) for u in listed] == [
        ("alice@example.com", "active"), ("bob@example.com", "pending"),
        ("carol@example.com", "active")]
    assert {u["id"] for u in listed} >= {bob["id"], carol["id"]}

    lines = ok(director(migrated_url, "users", "list")).splitlines()
    assert lines[0].split() == ["EMAIL", "STATUS", "CREATED", "ID"]
    assert len(lines) == 4
    status_column = lines[0].index("STATUS")
    assert [line[status_column:].split()[0] for line in lines[1:]] == [
        "active", "pending", "active"]
    assert lines[2].startswith("bob@example.com ")


def test_users_list_pages_through_more_than_one_page(migrated_url: str) -> None:
    query(migrated_url, "INSERT INTO users (email, password_hash, status) "
          "SELECT 'u' || lpad(n::text, 4, '0') || '@example.com', 'x', 'active' "
          "FROM generate_series(1, 1001) AS n")
    listed = json.loads(ok(director(migrated_url, "users", "list", "--json")))["users"]
    assert len(listed) == 1001
    assert listed[0]["email"] == "u0001@example.com" and listed[-1]["email"] == "u1001@example.com"
    assert ok(director(migrated_url, "users", "list")).count("\n") == 1002


def test_users_create_errors(migrated_url: str) -> None:
    create_user(migrated_url, "dana@example.com")
    fails(director(migrated_url, "users", "create", "--email", "DANA@example.com",
                   "--password-stdin", stdin="another password"), 1,
          "director: a user with email 'dana@example.com' already exists")
    fails(director(migrated_url, "users", "create", "--email", "not-an-email",
                   "--password-stdin", stdin="long enough password"), 2, "invalid email:")
    fails(director(migrated_url, "users", "create", "--email", "eve@example.com",
                   "--password-stdin", stdin="short\n"), 2,
          "invalid password: must be at least 8 characters")
    fails(director(migrated_url, "users", "create", "--email", "eve@example.com"), 2,
          "--password-stdin")
    assert query(migrated_url, "SELECT count(*) FROM users") == [(1,)]
    assert ok(director(migrated_url, "users", "list")).count("\n") == 2


def test_users_activate_disable_and_set_password(migrated_url: str) -> None:
    user = create_user(migrated_url, "fay@example.com", "first password", "--pending")
    assert ok(director(migrated_url, "users", "activate", "FAY@example.com")).strip() == \
        "fay@example.com is now active (was pending)"
    assert "already active" in ok(director(migrated_url, "users", "activate", "fay@example.com"))
    query(migrated_url, "INSERT INTO sessions (user_id, token_hash, expires_at) "
          "VALUES (%s, 'token-1', now() + interval '1 day')", user["id"])

    changed = json.loads(ok(director(migrated_url, "users", "set-password", "fay@example.com",
                                     "--password-stdin", "--json", stdin="second password\n")))
    assert changed["email"] == "fay@example.com" and changed["sessions_revoked"] is True
    assert verify_password("second password", stored_hash(migrated_url, "fay@example.com"))
    assert query(migrated_url, "SELECT count(*) FROM sessions") == [(0,)]

    query(migrated_url, "INSERT INTO sessions (user_id, token_hash, expires_at) "
          "VALUES (%s, 'token-2', now() + interval '1 day')", user["id"])
    disabled = json.loads(ok(director(migrated_url, "users", "disable", "fay@example.com",
                                      "--json")))
    assert disabled["status"] == "disabled" and disabled["previous_status"] == "active"
    assert query(migrated_url, "SELECT count(*) FROM sessions") == [(0,)]

    for action in ("activate", "disable"):
        fails(director(migrated_url, "users", action, "nobody@example.com"), 1,
              "director: no user with email 'nobody@example.com'")
    fails(director(migrated_url, "users", "set-password", "nobody@example.com",
                   "--password-stdin", stdin="a good password"), 1,
          "director: no user with email 'nobody@example.com'")
    fails(director(migrated_url, "users", "set-password", "fay@example.com",
                   "--password-stdin", stdin="tiny"), 2, "invalid password:")
    assert verify_password("second password", stored_hash(migrated_url, "fay@example.com"))


# --- keys ---------------------------------------------------------------------------------


def test_keys_create_list_and_revoke(migrated_url: str) -> None:
    create_user(migrated_url, "gus@example.com")
    made = json.loads(ok(director(migrated_url, "keys", "create", "--user", "gus@example.com",
                                  "--name", "ci", "--json")))
    assert KEY.match(made["key"]) and made["name"] == "ci" and made["id"]
    assert made["prefix"] == made["key"][:10]

    plain = director(migrated_url, "keys", "create", "--user", "gus@example.com")
    value = ok(plain).strip()
    assert KEY.match(value), plain.stdout  # the key alone on stdout; the note on stderr
    assert "shown only this once" in plain.stderr
    default_name = re.search(r"API key '(cli-\d{8}-\d{6})'", plain.stderr)
    assert default_name, plain.stderr
    # A second default name in the same second does not collide.
    ok(director(migrated_url, "keys", "create", "--user", "gus@example.com"))

    fails(director(migrated_url, "keys", "create", "--user", "gus@example.com",
                   "--name", "ci"), 1, "already has a live API key named 'ci'")
    fails(director(migrated_url, "keys", "create", "--user", "gus@example.com",
                   "--name", "  "), 2, "invalid name: must not be empty")
    fails(director(migrated_url, "keys", "create", "--user", "nobody@example.com"), 1,
          "director: no user with email 'nobody@example.com'")

    keys = json.loads(ok(director(migrated_url, "keys", "list", "--user", "gus@example.com",
                                  "--json")))["keys"]
    names = [key["name"] for key in keys]
    assert names[:3] == ["default", "ci", default_name[1]] and len(names) == 4
    assert all("key" not in key for key in keys)
    lines = ok(director(migrated_url, "keys", "list", "--user", "gus@example.com")).splitlines()
    assert lines[0].split() == ["ID", "NAME", "PREFIX", "CREATED", "RATE", "LIMIT"]
    assert len(lines) == 5 and made["id"] in lines[2] and made["key"][:10] in lines[2]

    revoked = ok(director(migrated_url, "keys", "revoke", "--user", "gus@example.com", "ci"))
    assert f"revoked API key 'ci' (id {made['id']})" in revoked
    by_id = json.loads(ok(director(migrated_url, "keys", "revoke", "--user", "gus@example.com",
                                   keys[0]["id"], "--json")))
    assert by_id["name"] == "default" and by_id["revoked"] is True
    by_value = ok(director(migrated_url, "keys", "revoke", "--user", "gus@example.com", value))
    assert f"revoked API key '{default_name[1]}'" in by_value
    fails(director(migrated_url, "keys", "revoke", "--user", "gus@example.com", "ci"), 1,
          "has no live API key with id or name 'ci'")
    fails(director(migrated_url, "keys", "revoke", "--user", "nobody@example.com", "ci"), 1,
          "director: no user with email 'nobody@example.com'")
    left = json.loads(ok(director(migrated_url, "keys", "list", "--user", "gus@example.com",
                                  "--json")))["keys"]
    assert [key["name"] for key in left] == names[3:]
    # The name is free again once its key is revoked.
    ok(director(migrated_url, "keys", "create", "--user", "gus@example.com", "--name", "ci"))


# --- against a running daemon -------------------------------------------------------------


def test_changes_reach_a_running_daemon_within_a_second(
        migrated_url: str, start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(DATABASE_URL=migrated_url)
    create_user(migrated_url, "hal@example.com", "hal's password")
    daemon.wait_healthy()

    status, _, body = daemon.request(
        "POST", "/api/v1/auth/login",
        json.dumps({"email": "hal@example.com", "password": "hal's password"}).encode(),
        {"content-type": "application/json"})
    assert status == 200, body
    assert json.loads(body)["user"]["email"] == "hal@example.com"

    first = json.loads(ok(director(migrated_url, "keys", "create", "--user", "hal@example.com",
                                   "--name", "first", "--json")))["key"]
    second = ok(director(migrated_url, "keys", "create", "--user", "hal@example.com",
                         "--name", "second")).strip()
    for key in (first, second):
        status, _, body = daemon.request("GET", "/api/v1/me", headers={"x-api-key": key})
        assert status == 200, body
        assert json.loads(body)["email"] == "hal@example.com"

    ok(director(migrated_url, "keys", "revoke", "--user", "hal@example.com", "first"))
    wait_for_status(daemon, "/api/v1/me", {"x-api-key": first}, 401, within=1.0)
    status, _, _ = daemon.request("GET", "/api/v1/me", headers={"x-api-key": second})
    assert status == 200

    ok(director(migrated_url, "users", "disable", "hal@example.com"))
    wait_for_status(daemon, "/api/v1/me", {"x-api-key": second}, 401, within=1.0)
    ok(director(migrated_url, "users", "activate", "hal@example.com"))
    wait_for_status(daemon, "/api/v1/me", {"x-api-key": second}, 200, within=1.0)


# --- seed ---------------------------------------------------------------------------------


def test_seed_is_refused_unless_enabled_and_outside_production(migrated_url: str) -> None:
    fails(director(migrated_url, "seed"), 1, "DANGEROUSLY_ENABLE_SEEDING=true")
    fails(director(migrated_url, "seed", DANGEROUSLY_ENABLE_SEEDING="false"), 1,
          "seeding is disabled")
    refused = director(None, "seed", **PRODUCTION, DANGEROUSLY_ENABLE_SEEDING="true")
    assert refused.returncode == 78, refused.stderr
    assert refused.stderr.splitlines() == [
        "FATAL: DANGEROUSLY_ENABLE_SEEDING cannot be enabled in production. Remove it from the "
        "environment, or set NODE_ENV=development for single-user local development."]
    fails(director(None, "seed", **PRODUCTION), 1, "DANGEROUSLY_ENABLE_SEEDING")
    assert query(migrated_url, "SELECT count(*) FROM users") == [(0,)]


def test_seed_creates_its_user_once(migrated_url: str) -> None:
    first = ok(director(migrated_url, "seed", DANGEROUSLY_ENABLE_SEEDING="true"))
    assert "seeded user user@director.run (active)" in first
    again = ok(director(migrated_url, "seed", DANGEROUSLY_ENABLE_SEEDING="true"))
    assert "user user@director.run already exists (active); left unchanged" in again
    assert query(migrated_url, "SELECT email, status FROM users") == [
        ("user@director.run", "active")]
    assert query(migrated_url, "SELECT count(*) FROM api_keys") == [(1,)]
    assert verify_password("password", stored_hash(migrated_url, "user@director.run"))

    custom = {"DANGEROUSLY_ENABLE_SEEDING": "1", "SEED_USER_EMAIL": "Dev@Example.com",
              "SEED_USER_PASSWORD": "dev password"}
    made = json.loads(ok(director(migrated_url, "seed", "--json", "--show-key", **custom)))
    assert made["email"] == "dev@example.com" and KEY.match(made["api_key"]["key"])
    assert json.loads(ok(director(migrated_url, "seed", "--json", **custom)))[
        "already_existed"] is True
    assert verify_password("dev password", stored_hash(migrated_url, "dev@example.com"))
    fails(director(migrated_url, "seed", DANGEROUSLY_ENABLE_SEEDING="true",
                   SEED_USER_PASSWORD="short"), 2, "invalid SEED_USER_PASSWORD:")


# --- the database -------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ("users", "list"),
    ("users", "create", "--email", "ivy@example.com", "--password-stdin"),
    ("keys", "list", "--user", "ivy@example.com"),
])
def test_commands_refuse_an_unmigrated_database(database_url: str, args: tuple[str, ...]) -> None:
    latest = migrate.known_migrations()[-1].version
    fails(director(database_url, *args, stdin="a fine password"), 1,
          "director: " + migrate.outdated_schema_message(0, latest))


def test_commands_report_an_unreachable_database() -> None:
    url = f"postgres://director@127.0.0.1:{free_port()}/director"
    for args in (("users", "list"), ("keys", "revoke", "--user", "a@example.com", "x")):
        fails(director(url, *args), 1, "director: cannot reach the database: ")
