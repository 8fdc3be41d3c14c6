-- Revocations every local token verifier follows, bounds on what one account can grow, and the
-- indexes pruning needs (PostgreSQL).

-- Sessions ended by Logout, refresh-token reuse or account deletion, kept until every access
-- token of the session has expired (`expire_time`, Unix ms). `id` orders them for followers.
CREATE TABLE revocations (
    id          BIGINT  PRIMARY KEY,
    session_id  TEXT    NOT NULL,
    expire_time BIGINT  NOT NULL
);
-- The last revocation id handed out. A transaction that revokes takes this one row first and
-- holds it until it commits, so ids are assigned in commit order: a follower reading "ids after
-- the last one I saw" can never miss a revocation that commits late with a lower id.
CREATE TABLE revocation_sequence (
    id   BIGINT  PRIMARY KEY CHECK (id = 1),
    last BIGINT  NOT NULL
);
INSERT INTO revocation_sequence (id, last) VALUES (1, 0);
CREATE INDEX revocations_by_expiry ON revocations (expire_time);

-- The session generation each used refresh token had: only the latest few are kept per session.
ALTER TABLE used_refresh_tokens ADD COLUMN generation BIGINT NOT NULL DEFAULT 0;
CREATE INDEX used_refresh_tokens_by_session ON used_refresh_tokens (session_id, generation);

CREATE INDEX sessions_by_expiry ON sessions (expire_time);
