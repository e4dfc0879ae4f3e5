-- Sign-in starts from a username; this maps (tenant, username) to the user's
-- stream. A claim is taken here before the user is registered, so two admins
-- cannot create the same username at once.
CREATE TABLE usernames
(
    tenant_id  uuid        NOT NULL,
    username   text        NOT NULL,
    user_id    uuid        NOT NULL UNIQUE,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, username)
);
