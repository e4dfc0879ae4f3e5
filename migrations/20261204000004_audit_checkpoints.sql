-- Each tenant's audit history as one hash chain in position order (as an
-- unfiltered export computes it), as far as it has been walked, and when it
-- was last checkpointed. Kept across read-model rebuilds: it is what the
-- signed checkpoints vouch for.
CREATE TABLE audit_chain
(
    tenant_id          text PRIMARY KEY,
    position           bigint      NOT NULL,
    count              bigint      NOT NULL,
    head               text        NOT NULL,
    checkpointed_count bigint      NOT NULL,
    checkpointed_at    timestamptz NOT NULL
);

-- Signed checkpoints of those chains (`GET /audit/checkpoints`).
CREATE TABLE audit_checkpoints
(
    tenant_id text        NOT NULL,
    position  bigint      NOT NULL,
    count     bigint      NOT NULL,
    head      text        NOT NULL,
    at        timestamptz NOT NULL,
    key_id    text        NOT NULL,
    algorithm text        NOT NULL,
    signature text        NOT NULL,
    PRIMARY KEY (tenant_id, position)
);
CREATE INDEX audit_checkpoints_at ON audit_checkpoints (tenant_id, at);
