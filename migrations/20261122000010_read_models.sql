-- Read models built by the projectors. Each builder records, per stream, the
-- last sequence it applied, in the same transaction as its update, so a
-- redelivered or duplicated event is recognised and skipped.
CREATE TABLE projection_positions
(
    projection     text   NOT NULL,
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    sequence       bigint NOT NULL,
    PRIMARY KEY (projection, aggregate_type, aggregate_id)
);

-- How far each builder has got, for lag metrics.
CREATE TABLE projection_progress
(
    projection      text PRIMARY KEY,
    last_position   bigint      NOT NULL DEFAULT 0,
    last_event_at   timestamptz,
    last_applied_at timestamptz
);

-- The user directory: filter columns, and the whole row as JSON.
CREATE TABLE rm_users
(
    user_id         text PRIMARY KEY,
    tenant_id       text        NOT NULL,
    username        text        NOT NULL,
    two_factor      text        NOT NULL,
    locked          boolean     NOT NULL,
    service_account boolean     NOT NULL,
    roles           text[]      NOT NULL,
    methods         text[]      NOT NULL,
    last_sign_in_at timestamptz,
    row             jsonb       NOT NULL
);
CREATE INDEX rm_users_tenant ON rm_users (tenant_id, username);

-- The audit history, one entry per event.
CREATE TABLE rm_audit
(
    position       bigint PRIMARY KEY,
    tenant_id      text        NOT NULL,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    sequence       bigint      NOT NULL,
    event_type     text        NOT NULL,
    at             timestamptz NOT NULL,
    actor_kind     text        NOT NULL,
    actor_id       text,
    ip             text,
    user_agent     text,
    reason         text,
    user_id        text,
    details        json        NOT NULL
);
CREATE INDEX rm_audit_tenant ON rm_audit (tenant_id, position);
CREATE INDEX rm_audit_user ON rm_audit (tenant_id, user_id, position);
