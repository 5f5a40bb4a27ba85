-- Playbooks, their servers and prompts, and the audit trail of every change.
-- A playbook's public id is a slug unique per owner (two users may both own "github");
-- "pk" is the internal key the other tables and the change notifications use.

CREATE TABLE playbooks (
    pk uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    id text NOT NULL CHECK (id ~ '^[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?$'),
    name text NOT NULL,
    description text NOT NULL DEFAULT '',
    position integer NOT NULL DEFAULT 0,
    -- Bumped by every change to the playbook or its parts: the optimistic-concurrency token.
    version integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, id)
);

CREATE TABLE playbook_servers (
    playbook_pk uuid NOT NULL REFERENCES playbooks (pk) ON DELETE CASCADE,
    name text NOT NULL,
    position integer NOT NULL,
    type text NOT NULL CHECK (type IN ('stdio', 'http', 'sse')),
    -- command/args/env/cwd or url/headers; secret values are sealed (see crypto.py).
    config jsonb NOT NULL,
    disabled boolean NOT NULL DEFAULT false,
    prefix text NOT NULL DEFAULT '',
    tools_include text[],
    tools_exclude text[],
    expose_prompts boolean NOT NULL DEFAULT false,
    timeout_seconds double precision NOT NULL,
    isolate_sessions boolean NOT NULL DEFAULT false,
    PRIMARY KEY (playbook_pk, name),
    CHECK (tools_include IS NULL OR tools_exclude IS NULL)
);

CREATE TABLE playbook_prompts (
    playbook_pk uuid NOT NULL REFERENCES playbooks (pk) ON DELETE CASCADE,
    name text NOT NULL,
    position integer NOT NULL,
    title text NOT NULL DEFAULT '',
    description text NOT NULL DEFAULT '',
    body text NOT NULL,
    arguments jsonb NOT NULL DEFAULT '[]',
    PRIMARY KEY (playbook_pk, name)
);

-- Kept after the playbook is deleted (no foreign key on playbook_pk) so history survives.
CREATE TABLE playbook_audit (
    seq bigserial PRIMARY KEY,
    playbook_pk uuid NOT NULL,
    owner_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    playbook_id text NOT NULL,
    actor text NOT NULL,
    action text NOT NULL,
    detail jsonb NOT NULL DEFAULT '{}',
    version integer NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX playbook_audit_playbook_idx ON playbook_audit (playbook_pk, seq);
