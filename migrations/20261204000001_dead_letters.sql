-- Messages a worker could not handle after its deliveries ran out (or could
-- not read at all): kept here with the reason, and acknowledged on the stream
-- (terminated), so one bad message never holds up the ones behind it.
CREATE TABLE dead_letters (
    id              bigserial PRIMARY KEY,
    -- The durable consumer that gave up on it (`dispatcher`, `projector-audit`, ...).
    consumer        text NOT NULL,
    subject         text NOT NULL,
    stream_sequence bigint NOT NULL,
    payload         bytea NOT NULL,
    reason          text NOT NULL,
    at              timestamptz NOT NULL DEFAULT now(),
    -- A message parked twice (redelivered before its termination arrived) is kept once.
    UNIQUE (consumer, stream_sequence)
);
