-- Rate limits over a sliding window (see accounts/ratelimit.py): one row per subject and limit
-- (an API key "key:<id>:<max>/<window>", a user "user:<id>:…", a sign-up address
-- "signup:<address>:…") listing the leases of permits handed to instances that still count:
-- when each was granted (epoch seconds, the granting instance's clock) and how many permits.
-- Rows whose leases no longer count (expires_at in the past) are deleted by every instance's
-- cleanup.
-- The fixed windows of 0002 go: their counts mean nothing to the sliding window.

DROP TABLE rate_limit_windows;

CREATE TABLE rate_limits (
    subject text PRIMARY KEY,
    lease_times double precision[] NOT NULL DEFAULT '{}',
    lease_permits integer[] NOT NULL DEFAULT '{}',
    expires_at double precision NOT NULL DEFAULT 0,
    CHECK (cardinality(lease_times) = cardinality(lease_permits))
);
CREATE INDEX rate_limits_expires_at_idx ON rate_limits (expires_at);
