-- First-run setup of the Studio: one-time tokens that allow creating the first account.
-- Only their SHA-256 is stored, so every instance and `director setup-url` agree on which
-- are valid without any of them being readable here. Rows go when the first account is
-- created (and the setup page closes for good once any user exists).
CREATE TABLE studio_setup_tokens (
    token_hash bytea PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

-- When each API key was last used (the account page's "last used"), to the minute: instances
-- keep uses in memory and write them once a minute (accounts/usage.py), never on the request.
ALTER TABLE api_keys ADD COLUMN last_used_at timestamptz;
