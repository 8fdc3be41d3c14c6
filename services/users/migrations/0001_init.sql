-- Profiles and their change log. Portable SQL: the same file migrates SQLite and PostgreSQL.
CREATE TABLE users (
    id                TEXT   PRIMARY KEY,
    email             TEXT   NOT NULL,
    display_name      TEXT   NOT NULL,
    bio               TEXT   NOT NULL,
    create_time       BIGINT NOT NULL,
    update_time       BIGINT NOT NULL,
    version           BIGINT NOT NULL,
    -- The idempotency key of the CreateUser that made the profile, if it had one.
    create_request_id TEXT
);

-- The durable, ordered change log (the outbox): written in the same transaction as the change.
CREATE TABLE user_events (
    sequence     BIGINT PRIMARY KEY,
    -- 1 created, 2 updated, 3 deleted (EventKind's numbers).
    kind         BIGINT NOT NULL,
    user_id      TEXT   NOT NULL,
    display_name TEXT   NOT NULL,
    bio          TEXT   NOT NULL,
    create_time  BIGINT NOT NULL,
    update_time  BIGINT NOT NULL,
    version      BIGINT NOT NULL,
    occur_time   BIGINT NOT NULL
);

-- The last sequence handed out. Every change takes this one row first and holds it until it
-- commits, so sequences are assigned in commit order: no reader can see sequence 7 before a
-- later-committing 6.
CREATE TABLE event_sequence (
    id   BIGINT PRIMARY KEY CHECK (id = 1),
    last BIGINT NOT NULL
);
INSERT INTO event_sequence (id, last) VALUES (1, 0);
