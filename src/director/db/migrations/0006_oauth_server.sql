-- The OAuth authorization server for MCP clients (director.oauth.server): the clients it knows,
-- the authorizations users gave them (grants), one-time codes, and the tokens of each grant.
-- Codes and tokens are 256-bit random values stored only as their SHA-256, like API keys.

-- A client registered through Dynamic Client Registration (RFC 7591: kind 'registered'), or
-- one identified by the URL of its Client ID Metadata Document (kind 'metadata_document',
-- a snapshot of the document last fetched, so that Connected apps can name it). A registration
-- never used to authorize anything (last_used_at NULL) is deleted after a day.
CREATE TABLE oauth_clients (
    client_id text PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('registered', 'metadata_document')),
    client_name text NOT NULL DEFAULT '',
    redirect_uris text[] NOT NULL,
    -- What the client registered or published, as registered (the fields Director knows).
    metadata jsonb NOT NULL,
    -- A confidential client's secret (client_secret_basic / client_secret_post); NULL: public.
    secret_hash bytea,
    registered_from text,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz
);
CREATE INDEX oauth_clients_unused_idx ON oauth_clients (created_at) WHERE last_used_at IS NULL;

-- One authorization a user gave one client for one playbook: what Connected apps lists and
-- revokes. Its tokens (an access token and a refresh token at a time) rotate; the grant is the
-- refresh-token family, and the credential the MCP sessions it opens are bound to.
CREATE TABLE oauth_grants (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    client_id text NOT NULL REFERENCES oauth_clients (client_id) ON DELETE CASCADE,
    playbook_pk uuid NOT NULL REFERENCES playbooks (pk) ON DELETE CASCADE,
    -- The canonical URL of the playbook's MCP endpoint the token was asked for (RFC 8707).
    resource text NOT NULL,
    scope text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    refreshed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX oauth_grants_user_idx ON oauth_grants (user_id);
CREATE INDEX oauth_grants_client_idx ON oauth_grants (client_id);
CREATE INDEX oauth_grants_playbook_idx ON oauth_grants (playbook_pk);

-- Authorization codes: single use, short-lived, bound to the client, the redirect URI and the
-- PKCE challenge. Once exchanged, grant_id names the grant it created (a second exchange of
-- the same code revokes that grant, RFC 6749 section 4.1.2).
CREATE TABLE oauth_codes (
    code_hash bytea PRIMARY KEY,
    client_id text NOT NULL REFERENCES oauth_clients (client_id) ON DELETE CASCADE,
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    playbook_pk uuid NOT NULL REFERENCES playbooks (pk) ON DELETE CASCADE,
    resource text NOT NULL,
    scope text NOT NULL,
    redirect_uri text NOT NULL,
    code_challenge text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    exchanged_at timestamptz,
    grant_id uuid REFERENCES oauth_grants (id) ON DELETE SET NULL
);
CREATE INDEX oauth_codes_expires_idx ON oauth_codes (expires_at);

-- Access and refresh tokens of a grant. A refresh token is used once: rotated_at records the
-- exchange, and presenting it again revokes the whole grant (reuse detection).
CREATE TABLE oauth_tokens (
    token_hash bytea PRIMARY KEY,
    grant_id uuid NOT NULL REFERENCES oauth_grants (id) ON DELETE CASCADE,
    kind text NOT NULL CHECK (kind IN ('access', 'refresh')),
    -- An access token may carry less than its grant (a refresh that asked for less).
    scope text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    rotated_at timestamptz
);
CREATE INDEX oauth_tokens_grant_idx ON oauth_tokens (grant_id);
CREATE INDEX oauth_tokens_expires_idx ON oauth_tokens (expires_at);
