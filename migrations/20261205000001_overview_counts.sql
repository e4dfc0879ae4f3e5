-- The live Overview without reading every user: per tenant, the counts its
-- figures are (users, enrolled, pending, not started, locked, by method,
-- backup codes, per role), moved by the directory builder in the
-- transaction that changes the rows. Keys and what adds to them:
-- `overview::tally`.
CREATE TABLE rm_overview_counts
(
    tenant_id text   NOT NULL,
    key       text   NOT NULL,
    value     bigint NOT NULL,
    PRIMARY KEY (tenant_id, key)
);

-- Read models that an upgrade left to be filled in from the others by the
-- code that defines them (the projector does it when it starts; a rebuild
-- fills them anyway).
CREATE TABLE read_model_upgrades
(
    name text PRIMARY KEY
);
INSERT INTO read_model_upgrades (name)
SELECT 'overview_counts' WHERE EXISTS (SELECT 1 FROM rm_users);

-- The users the Overview names: the most recent enrollments.
ALTER TABLE rm_users ADD COLUMN enrolled_at timestamptz;
UPDATE rm_users SET enrolled_at = (row ->> 'enrolled_at')::timestamptz
WHERE row ->> 'enrolled_at' IS NOT NULL;
CREATE INDEX rm_users_enrolled_at ON rm_users (tenant_id, enrolled_at DESC)
    WHERE two_factor = 'enrolled' AND NOT service_account AND enrolled_at IS NOT NULL;
-- (Those low on codes: by `rm_users_backup_codes`, the next migration's.)

-- The Overview's figures at the end of each settled day (UTC), so the daily
-- series is read, not folded; emptied by a rebuild like the checkpoints.
CREATE TABLE overview_days
(
    tenant_id   text    NOT NULL,
    day         date    NOT NULL,
    counts      jsonb   NOT NULL,
    PRIMARY KEY (tenant_id, day)
);

-- The rollout checklist's admins, without reading every user.
CREATE INDEX rm_users_admins ON rm_users (tenant_id, username) WHERE 'admin' = ANY (roles);
