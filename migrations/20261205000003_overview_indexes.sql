-- The Overview's users low on backup codes, fewest first then by username
-- as bytes (as the Overview sorts them), read from the index alone.
CREATE INDEX rm_users_low_on_codes ON rm_users (tenant_id, backup_codes_left, username COLLATE "C")
    INCLUDE (user_id)
    WHERE backup_codes_left <= 2 AND NOT service_account;

-- The settings an SMS delivery's outcome counts under (the last change
-- before it). Without it PostgreSQL priced the delivery figures' lookup as
-- a walk of the tenant's history and compiled the query (JIT) on every
-- Overview page: 27 ms for a query that runs in 0.1 ms.
CREATE INDEX rm_audit_settings ON rm_audit (tenant_id, position)
    WHERE event_type = 'TwoFactorSettingsChanged';
