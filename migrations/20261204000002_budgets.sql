-- Hourly budgets shared by every verifier: wrong passwords per client address
-- (across accounts) and codes sent per recipient, per account and per address.
-- A row is one key's use in the current window; a use is taken with one
-- atomic upsert before the work it pays for, so parallel requests never get
-- past the budget together.
CREATE TABLE budgets (
    tenant_id    uuid        NOT NULL,
    kind         text        NOT NULL,
    key          text        NOT NULL,
    window_start timestamptz NOT NULL,
    used         integer     NOT NULL,
    PRIMARY KEY (tenant_id, kind, key)
);
ALTER TABLE budgets SET (autovacuum_vacuum_scale_factor = 0.05);
