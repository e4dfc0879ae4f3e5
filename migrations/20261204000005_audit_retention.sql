-- Where each tenant's audit history was pruned up to by its retention
-- setting (`audit_retention_days`): the entries up to `position` left
-- rm_audit; `count` of them, the chain's hash `head` at the last one, which
-- the checkpoint signed at `signed_at` vouches for. Kept across read-model
-- rebuilds like audit_chain, and applied by them: a rebuild leaves the
-- pruned entries out.
CREATE TABLE audit_pruned
(
    tenant_id text PRIMARY KEY,
    position  bigint      NOT NULL,
    count     bigint      NOT NULL,
    head      text        NOT NULL,
    signed_at timestamptz NOT NULL,
    pruned_at timestamptz NOT NULL
);

-- The position up to which every tenant's chain was extended over the
-- settled entries (one row): the checkpoint pass starts there instead of
-- at the least advanced tenant's position.
CREATE TABLE audit_settled
(
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    position  bigint NOT NULL
);
