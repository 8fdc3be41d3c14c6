-- Credentials and sessions of the auth service (PostgreSQL).
CREATE TABLE credentials (
    user_id       TEXT    PRIMARY KEY,
    -- Stored trimmed and lower-cased, so uniqueness is case-insensitive.
    email         TEXT    NOT NULL UNIQUE,
    -- Argon2id PHC string.
    password_hash TEXT    NOT NULL,
    create_time   BIGINT  NOT NULL
);

CREATE TABLE sessions (
    session_id    TEXT    PRIMARY KEY,
    user_id       TEXT    NOT NULL REFERENCES credentials (user_id) ON DELETE CASCADE,
    -- SHA-256 of the current refresh token: the token itself is never stored.
    refresh_hash  BYTEA   NOT NULL UNIQUE,
    generation    BIGINT  NOT NULL,
    create_time   BIGINT  NOT NULL,
    last_use_time BIGINT  NOT NULL,
    expire_time   BIGINT  NOT NULL,
    revoke_time   BIGINT
);
CREATE INDEX sessions_by_user ON sessions (user_id);

-- Refresh tokens already rotated away: presenting one again revokes its session.
CREATE TABLE used_refresh_tokens (
    refresh_hash  BYTEA PRIMARY KEY,
    session_id    TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE
);
