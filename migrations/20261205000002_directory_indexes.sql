-- The directory's filters and search served by indexes, so a page of a
-- 100,000-user tenant reads its page and not the tenant.
--
-- Backup codes left, as a column (NULL unless the row's authenticator is
-- enrolled, which is when the directory shows a count) rather than picked
-- out of the JSON row on every filter.
ALTER TABLE rm_users
    ADD COLUMN backup_codes_left integer GENERATED ALWAYS AS (
        CASE WHEN row ->> 'two_factor' = 'enrolled'
             THEN (row ->> 'backup_codes_left')::integer END) STORED;

-- The tenant's users in username order, carrying every filter column and
-- the id: a page's filters, its OFFSET and the (capped) count are read from
-- this index alone, and only the page's rows from the table.
DROP INDEX rm_users_tenant;
CREATE INDEX rm_users_directory ON rm_users (tenant_id, username)
    INCLUDE (user_id, two_factor, locked, roles, methods);

-- By status, in username order (a rare status is not a scan of the tenant).
CREATE INDEX rm_users_status ON rm_users (tenant_id, two_factor, username) INCLUDE (user_id);

-- Users with few backup codes left.
CREATE INDEX rm_users_backup_codes ON rm_users (tenant_id, backup_codes_left)
    INCLUDE (username, user_id) WHERE backup_codes_left IS NOT NULL;

-- Part of a username (`q`): trigrams, for `username LIKE '%…%'`.
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE INDEX rm_users_username_trgm ON rm_users USING gin (username gin_trgm_ops);
