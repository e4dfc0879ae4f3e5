-- Per-user data keys: personal data in a user's events (email, phone,
-- username, IP, user agent) is sealed under the user's own key, itself
-- sealed (wrapped) under a server key whose id is kept beside it. Erasing a
-- user deletes the row: what was sealed under it can no longer be opened
-- anywhere (event store, NATS copies, exports), while the events themselves,
-- and the audit hash chain over them, stay as they were.
CREATE TABLE data_keys
(
    user_id       text PRIMARY KEY,
    server_key_id text        NOT NULL,
    wrapped       text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
