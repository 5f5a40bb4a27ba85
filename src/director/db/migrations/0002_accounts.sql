-- Accounts: users, cookie sessions, API keys, and the shared counters of per-key rate limits.
-- Secrets are stored only as hashes: passwords with scrypt, session tokens and API keys with
-- SHA-256 (both are 256-bit random values, so a fast hash is enough and lookups stay indexed).

CREATE TABLE users (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email text NOT NULL,
    password_hash text NOT NULL,
    status text NOT NULL CHECK (status IN ('active', 'pending', 'disabled')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_key ON users (email);

CREATE TABLE sessions (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    renewed_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    user_agent text,
    address text
);
CREATE INDEX sessions_user_id_idx ON sessions (user_id);
CREATE INDEX sessions_expires_at_idx ON sessions (expires_at);

CREATE TABLE api_keys (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name text NOT NULL,
    prefix text NOT NULL,
    key_hash bytea NOT NULL UNIQUE,
    -- NULL: follow API_KEY_RATE_LIMIT_* of the running configuration.
    rate_limit_window_seconds integer CHECK (rate_limit_window_seconds > 0),
    rate_limit_max_requests integer CHECK (rate_limit_max_requests > 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX api_keys_user_id_idx ON api_keys (user_id);
CREATE UNIQUE INDEX api_keys_live_name_key ON api_keys (user_id, name) WHERE revoked_at IS NULL;

-- Permits of a key's fixed window handed out to instances in batches (see ratelimit.py).
CREATE TABLE rate_limit_windows (
    key_id uuid NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    window_start bigint NOT NULL,
    granted integer NOT NULL,
    PRIMARY KEY (key_id, window_start)
);
