-- Daily checkpoints of what `GET /overview?as_of=` folds, so its cost does
-- not grow with history: per tenant and day, every user's directory row as
-- folded from their events before the day's end (UTC), with the sequence the
-- fold reached in each stream, and nothing personal (usernames are read from
-- `usernames` when the answer names someone). Created on the first `as_of`
-- that needs one; emptied by a rebuild.
CREATE TABLE overview_checkpoints
(
    tenant_id  text        NOT NULL,
    day        date        NOT NULL,
    body       bytea       NOT NULL,
    users      integer     NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, day)
);

-- The events after a checkpoint are found by their time in the audit history
-- (also what `GET /audit?from=&to=` filters on).
CREATE INDEX rm_audit_at ON rm_audit (tenant_id, at);

-- A user's audit timeline takes their deliveries' entries by delivery id.
CREATE INDEX rm_audit_delivery ON rm_audit (tenant_id, aggregate_id) WHERE aggregate_type = 'delivery';
