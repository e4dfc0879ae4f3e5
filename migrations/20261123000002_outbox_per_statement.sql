-- The outbox: a row per statement that wrote events (up to 100 of them, in
-- position order), rather than a row per event, written by a trigger once per
-- statement, so a commit of a batch of appends adds one or a few outbox rows
-- and the relay deletes as few. Without NOTIFY: a transaction that notifies
-- holds a database-wide lock from its commit until its WAL is flushed, so
-- every committing writer would wait for the one before it and commits could
-- no longer share a flush. The relay polls the outbox instead.
DROP TRIGGER events_outbox ON events;
DROP FUNCTION twofold_outbox_enqueue();

ALTER TABLE outbox ADD COLUMN positions bigint[];
UPDATE outbox SET positions = ARRAY[global_position];
ALTER TABLE outbox ALTER COLUMN positions SET NOT NULL;
ALTER TABLE outbox DROP COLUMN global_position;
-- Rows come and go all the time: vacuum it often, so a read of the head of
-- the queue does not wade through the dead.
ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);

CREATE FUNCTION twofold_outbox_enqueue() RETURNS trigger AS
$$
BEGIN
    INSERT INTO outbox (positions)
    SELECT array_agg(global_position ORDER BY global_position)
    FROM (SELECT global_position, (row_number() OVER (ORDER BY global_position) - 1) / 100 AS chunk
          FROM appended) numbered
    GROUP BY chunk
    ORDER BY chunk;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER events_outbox
    AFTER INSERT
    ON events
    REFERENCING NEW TABLE AS appended
    FOR EACH STATEMENT
EXECUTE FUNCTION twofold_outbox_enqueue();
