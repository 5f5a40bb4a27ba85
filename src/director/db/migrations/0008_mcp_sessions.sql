-- Handshake-era and legacy /sse MCP sessions, shared by every instance (issue 17).
--
-- A session's durable facts are written once when it starts (and again when the client changes
-- its log level or subscriptions), never on its calls: any instance that receives a request for
-- a session it does not hold reads this row once and serves it from then on (mcp/shared_sessions.py).
-- Only the SHA-256 of the session id is stored (like API keys and cookie sessions): the row
-- cannot be used to reach the session. Credentials are kept by id so that a revocation finds
-- the sessions it ends; a deleted user or playbook takes its sessions along.
CREATE TABLE mcp_sessions (
    id_hash bytea PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    playbook_pk uuid NOT NULL REFERENCES playbooks (pk) ON DELETE CASCADE,
    credential_kind text NOT NULL,
    credential_id uuid NOT NULL,
    transport text NOT NULL CHECK (transport IN ('streamable', 'sse')),
    protocol_version text NOT NULL,
    client_info jsonb NOT NULL DEFAULT '{}',
    client_capabilities jsonb NOT NULL DEFAULT '{}',
    log_level text,
    subscriptions text[] NOT NULL DEFAULT '{}',
    -- The instance holding the session's stream (its GET stream, or the /sse stream).
    holder uuid,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Refreshed in batches (every MCP_SESSION_IDLE_SECONDS / 4 at most), not per request.
    last_seen timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX mcp_sessions_user_idx ON mcp_sessions (user_id, last_seen);
CREATE INDEX mcp_sessions_credential_idx ON mcp_sessions (credential_kind, credential_id);
CREATE INDEX mcp_sessions_last_seen_idx ON mcp_sessions (last_seen);

-- The events of the sessions' GET streams, so that a client resuming with Last-Event-ID on
-- another instance gets what it missed (mcp/event_log.py). Bounded by MCP_EVENT_LOG_EVENTS
-- (in total) and MCP_EVENT_LOG_SECONDS; trimmed by position and time, both indexed.
CREATE TABLE mcp_events (
    position bigserial PRIMARY KEY,
    session_hash bytea NOT NULL,
    event_id text NOT NULL,
    body bytea NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX mcp_events_session_idx ON mcp_events (session_hash, position);
CREATE INDEX mcp_events_at_idx ON mcp_events (at);

-- Bodies relayed between instances that do not fit in a NOTIFY payload (mcp/relay.py); the
-- NOTIFY carries the row's id. Rows older than a minute are deleted by the periodic sweep.
CREATE TABLE mcp_relay (
    id bigserial PRIMARY KEY,
    body bytea NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX mcp_relay_at_idx ON mcp_relay (at);
