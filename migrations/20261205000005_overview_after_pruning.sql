-- Overview checkpoints and days of tenants whose audit history was pruned
-- may have been swept across the pruned entries, which the sweep then
-- missed (it found the events after a checkpoint by their time in the audit
-- history). They are folded again, correctly, when next asked for.
DELETE FROM overview_checkpoints WHERE tenant_id IN (SELECT tenant_id FROM audit_pruned);
DELETE FROM overview_days WHERE tenant_id IN (SELECT tenant_id FROM audit_pruned);
