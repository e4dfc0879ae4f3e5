-- The outbox: a row per committed event, written by a trigger in the same
-- transaction as the event, so nothing reaches NATS that was not committed
-- and nothing committed is missed. The relay publishes rows in id order and
-- deletes them after JetStream acknowledged them; the NOTIFY wakes it.
CREATE TABLE outbox
(
    id              bigserial PRIMARY KEY,
    global_position bigint      NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION twofold_outbox_enqueue() RETURNS trigger AS
$$
BEGIN
    INSERT INTO outbox (global_position) VALUES (NEW.global_position);
    PERFORM pg_notify('twofold_outbox', '');
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER events_outbox
    AFTER INSERT
    ON events
    FOR EACH ROW
EXECUTE FUNCTION twofold_outbox_enqueue();
