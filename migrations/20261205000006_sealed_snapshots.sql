-- User snapshots are now written with their personal data sealed, as the
-- events are. Those written before held it opened: they are removed, and
-- each user's next load folds their events (sealed) and writes a sealed
-- snapshot with its next commit.
DELETE FROM snapshots WHERE aggregate_type = 'user';
