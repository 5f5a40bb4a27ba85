-- One row describing this deployment. Its id is the anonymous identity used by telemetry
-- (when enabled) and lets every instance sharing the database recognise the same deployment.
CREATE TABLE deployment (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now(),
    singleton boolean NOT NULL DEFAULT true UNIQUE CHECK (singleton)
);
INSERT INTO deployment DEFAULT VALUES;
