-- Upstream OAuth: Director signs in to OAuth-protected MCP servers for its users
-- (director/oauth/client). Every token and client secret is sealed (crypto.SecretBox, the
-- sealing context naming the row it belongs to), never stored in clear.

-- What each protected server URL told us: its protected-resource metadata (RFC 9728) and its
-- authorization server's metadata (RFC 8414 / OpenID discovery). Public documents, shared by
-- every user and instance; refreshed when the server challenges again.
CREATE TABLE upstream_oauth_discoveries (
    server_url text PRIMARY KEY,
    resource text NOT NULL,
    issuer text NOT NULL,
    resource_metadata jsonb NOT NULL,
    issuer_metadata jsonb NOT NULL,
    -- The scope the server's last challenge asked for (WWW-Authenticate scope=), if any.
    challenge_scope text,
    discovered_at timestamptz NOT NULL DEFAULT now()
);

-- Client registrations Director holds at authorization servers: dynamic ones (RFC 7591), one
-- per redirect URI, and those a user entered for an issuer. (A Client ID Metadata Document
-- needs no row: its client id is Director's own URL.)
CREATE TABLE upstream_oauth_clients (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    issuer text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('dcr', 'manual')),
    user_id uuid REFERENCES users (id) ON DELETE CASCADE,
    redirect_uri text,
    client_id text NOT NULL,
    client_secret text,
    auth_method text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'dcr') = (redirect_uri IS NOT NULL)),
    CHECK ((kind = 'manual') = (user_id IS NOT NULL))
);
CREATE UNIQUE INDEX upstream_oauth_clients_dcr ON upstream_oauth_clients (issuer, redirect_uri)
    WHERE kind = 'dcr';
CREATE UNIQUE INDEX upstream_oauth_clients_manual ON upstream_oauth_clients (issuer, user_id)
    WHERE kind = 'manual';

-- Authorizations under way: one per authorize URL handed out. Only the SHA-256 of the state
-- is stored; the row is bound to (user, playbook, server) and consumed once, by whichever
-- instance the callback reaches. Kept a day after it ends, for `director playbooks authorize`
-- to read the outcome.
CREATE TABLE upstream_oauth_flows (
    state_hash bytea PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    playbook_pk uuid NOT NULL REFERENCES playbooks (pk) ON DELETE CASCADE,
    server_name text NOT NULL,
    server_url text NOT NULL,
    resource text NOT NULL,
    issuer text NOT NULL,
    client_kind text NOT NULL CHECK (client_kind IN ('cimd', 'dcr', 'manual')),
    client_id text NOT NULL,
    client_secret text,
    auth_method text NOT NULL,
    code_verifier text NOT NULL,
    redirect_uri text NOT NULL,
    scope text,
    token_endpoint text NOT NULL,
    revocation_endpoint text,
    -- RFC 9207: the authorization server promised `iss` in its answer, so it must be there.
    iss_required boolean NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    consumed_at timestamptz,
    finished_at timestamptz,
    -- 'authorized', or the error shown to the user.
    outcome text
);
CREATE INDEX upstream_oauth_flows_pending ON upstream_oauth_flows (expires_at)
    WHERE consumed_at IS NULL;

-- The tokens: one credential per (user, authorization server, resource), so that one
-- authorization serves every playbook of that user that uses the same server.
CREATE TABLE upstream_oauth_credentials (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    issuer text NOT NULL,
    resource text NOT NULL,
    client_kind text NOT NULL CHECK (client_kind IN ('cimd', 'dcr', 'manual')),
    client_id text NOT NULL,
    client_secret text,
    auth_method text NOT NULL,
    token_endpoint text NOT NULL,
    revocation_endpoint text,
    access_token text NOT NULL,
    token_type text NOT NULL,
    refresh_token text,
    scope text,
    expires_at timestamptz,
    -- Bumped by every new token: who saw generation N and got a 401 knows whether someone
    -- else refreshed meanwhile.
    generation integer NOT NULL DEFAULT 1,
    -- The refresh under way (single flight across instances): held until then.
    refresh_lease_until timestamptz,
    -- Why the user must authorize again though tokens exist (a refused token, a scope the
    -- server asks for: step-up), and the scope to ask for then.
    problem text,
    wanted_scope text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, issuer, resource)
);
