//! Credentials and sessions in SQL: one trait, [`AuthStore`], with a SQLite implementation (the
//! embedded default: a file under the data folder, WAL, `synchronous=FULL`, foreign keys on)
//! and a PostgreSQL one (selected by a `postgres://` URL). Each database has its own migration
//! set, embedded in the binary and applied at start-up.
//!
//! Opening and migrating come from [`mesh_store`]. The two implementations run the same SQL (both accept `$n` parameters and `RETURNING`), so
//! one macro writes both; only the schemas differ (BLOB/BYTEA, INTEGER/BIGINT).
//!
//! Times are Unix milliseconds. Nothing secret is stored in plain text: passwords as Argon2id
//! PHC strings, refresh tokens as SHA-256 digests.

use std::{path::Path, sync::Arc};

use mesh_store::{Migrations, Pool};
use sqlx::{postgres::PgPool, sqlite::SqlitePool};

/// A storage failure: the database is unreachable or misbehaved. Never shown to callers.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The e-mail is already registered.
    #[error("e-mail already registered")]
    EmailTaken,
    /// The database failed.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Open(#[from] mesh_store::OpenError),
}

/// Stored credentials.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The user id.
    pub user_id: String,
    /// The e-mail, lower-cased.
    pub email: String,
    /// The Argon2id PHC string.
    pub password_hash: String,
}

/// A new session to store.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// Its id.
    pub session_id: String,
    /// Its user.
    pub user_id: String,
    /// SHA-256 of its first refresh token.
    pub refresh_hash: Vec<u8>,
    /// Creation (and first use) time.
    pub now: i64,
    /// When it ends.
    pub expire_time: i64,
}

/// A stored session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Its id.
    pub session_id: String,
    /// Its user.
    pub user_id: String,
    /// When it began.
    pub create_time: i64,
    /// When its refresh token was last used.
    pub last_use_time: i64,
    /// When it ends.
    pub expire_time: i64,
}

/// Credentials as the queries return them.
type CredentialsRow = (String, String, String);

fn credentials((user_id, email, password_hash): CredentialsRow) -> Credentials {
    Credentials {
        user_id,
        email,
        password_hash,
    }
}

/// A session as the queries return it.
type SessionRow = (String, String, i64, i64, i64);

fn session(row: SessionRow) -> Session {
    let (session_id, user_id, create_time, last_use_time, expire_time) = row;
    Session {
        session_id,
        user_id,
        create_time,
        last_use_time,
        expire_time,
    }
}

/// A revoked session, as followers of the revocations see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// Strictly increasing in commit order.
    pub id: i64,
    /// The session whose tokens are revoked.
    pub session_id: String,
    /// When every access token of the session has expired (Unix ms).
    pub expire_time: i64,
}

/// When a revocation made now may be forgotten, and the bounds of one login.
#[derive(Debug, Clone, Copy)]
pub struct Revoking {
    /// Now (Unix ms).
    pub now: i64,
    /// When revocations made now may be forgotten (Unix ms): when every access token issued
    /// until now has expired.
    pub forget_at: i64,
}

/// What pruning removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Sessions expired, or revoked long enough ago.
    pub sessions: u64,
    /// Revocations whose tokens have all expired.
    pub revocations: u64,
}

/// What presenting a refresh token led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// The token was current: it is now replaced; the session and its user's e-mail.
    Rotated(Session, String),
    /// The token had already been used: its whole session is now revoked.
    Reused,
    /// Unknown, expired or revoked.
    Invalid,
}

/// Storage of credentials and sessions.
#[tonic::async_trait]
pub trait AuthStore: Send + Sync + std::fmt::Debug + 'static {
    /// Stores new credentials and their first session, atomically.
    async fn create_account(
        &self,
        credentials: &Credentials,
        now: i64,
        session: &NewSession,
    ) -> Result<(), StoreError>;
    /// The credentials registered for `email` (lower-cased).
    async fn credentials_by_email(&self, email: &str) -> Result<Option<Credentials>, StoreError>;
    /// The credentials of `user_id`.
    async fn credentials_by_user(&self, user_id: &str) -> Result<Option<Credentials>, StoreError>;
    /// Stores a new session; if the user then has more than `max_live` live sessions, revokes
    /// the oldest beyond it. Returns how many it revoked.
    async fn create_session(
        &self,
        session: &NewSession,
        max_live: usize,
        revoking: Revoking,
    ) -> Result<usize, StoreError>;
    /// Replaces the refresh token `old` by `new` if `old` is current and its session live; if
    /// `old` was already used, revokes its session.
    async fn rotate(
        &self,
        old: &[u8],
        new: &[u8],
        revoking: Revoking,
    ) -> Result<Rotation, StoreError>;
    /// Revokes the session whose current or used refresh token is `hash`; false if none.
    async fn revoke_by_refresh(&self, hash: &[u8], revoking: Revoking) -> Result<bool, StoreError>;
    /// Whether the session exists, is not revoked and has not expired.
    async fn session_live(&self, session_id: &str, now: i64) -> Result<bool, StoreError>;
    /// The user's live sessions, newest first.
    async fn live_sessions(&self, user_id: &str, now: i64) -> Result<Vec<Session>, StoreError>;
    /// Deletes the user's credentials and every session (revoking the live ones); false if
    /// there were none.
    async fn delete_account(&self, user_id: &str, revoking: Revoking) -> Result<bool, StoreError>;
    /// Up to `limit` revocations after id `after` that are not yet forgettable at `now`, in id
    /// order.
    async fn revocations_after(
        &self,
        after: i64,
        now: i64,
        limit: i64,
    ) -> Result<Vec<Revocation>, StoreError>;
    /// The newest revocation id handed out (0 if none).
    async fn last_revocation(&self) -> Result<i64, StoreError>;
    /// Removes sessions expired at `now` or revoked before `revoked_before`, their used refresh
    /// tokens, and revocations forgettable at `now`.
    async fn prune(&self, now: i64, revoked_before: i64) -> Result<Pruned, StoreError>;
    /// Whether the database answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

const SQLITE_MIGRATIONS: Migrations = Migrations(&[
    (
        1,
        "init",
        include_str!("../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "revocations",
        include_str!("../migrations/sqlite/0002_revocations.sql"),
    ),
]);
const POSTGRES_MIGRATIONS: Migrations = Migrations(&[
    (
        1,
        "init",
        include_str!("../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "revocations",
        include_str!("../migrations/postgres/0002_revocations.sql"),
    ),
]);

/// Used refresh tokens remembered per session for reuse detection: the latest ones. Presenting
/// an older one is still refused (it is unknown), without revoking the session.
pub const USED_TOKENS_PER_SESSION: i64 = 32;

/// Opens the store named by `url` (`postgres://…` or `sqlite://…`), or the embedded SQLite
/// file at `<data_dir>/auth/auth.db` when `url` is `None`, and applies its migrations.
pub async fn open(url: Option<&str>, data_dir: &Path) -> Result<Arc<dyn AuthStore>, StoreError> {
    let file = data_dir.join("auth").join("auth.db");
    Ok(
        match mesh_store::open(url, &file, SQLITE_MIGRATIONS, POSTGRES_MIGRATIONS).await? {
            Pool::Sqlite(pool) => Arc::new(SqliteStore { pool }),
            Pool::Postgres(pool) => Arc::new(PgStore { pool }),
        },
    )
}

/// The embedded SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

/// The PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

fn unique_violation(err: sqlx::Error) -> StoreError {
    match &err {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::EmailTaken,
        _ => StoreError::Database(err),
    }
}

macro_rules! impl_store {
    ($store:ty) => {
        #[tonic::async_trait]
        impl AuthStore for $store {
            async fn create_account(
                &self,
                credentials: &Credentials,
                now: i64,
                session: &NewSession,
            ) -> Result<(), StoreError> {
                let mut tx = self.pool.begin().await?;
                sqlx::query(
                    "INSERT INTO credentials (user_id, email, password_hash, create_time) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(&credentials.user_id)
                .bind(&credentials.email)
                .bind(&credentials.password_hash)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(unique_violation)?;
                insert_session!(&mut *tx, session)?;
                tx.commit().await?;
                Ok(())
            }

            async fn credentials_by_email(
                &self,
                email: &str,
            ) -> Result<Option<Credentials>, StoreError> {
                let row: Option<CredentialsRow> = sqlx::query_as(
                    "SELECT user_id, email, password_hash FROM credentials WHERE email = $1",
                )
                .bind(email)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(credentials))
            }

            async fn credentials_by_user(
                &self,
                user_id: &str,
            ) -> Result<Option<Credentials>, StoreError> {
                let row: Option<CredentialsRow> = sqlx::query_as(
                    "SELECT user_id, email, password_hash FROM credentials WHERE user_id = $1",
                )
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(credentials))
            }

            async fn create_session(
                &self,
                session: &NewSession,
                max_live: usize,
                revoking: Revoking,
            ) -> Result<usize, StoreError> {
                let mut tx = self.pool.begin().await?;
                // The revocation id row first: this transaction may revoke.
                let mut next = next_revocation!(&mut *tx)?;
                insert_session!(&mut *tx, session)?;
                let live: Vec<(String,)> = sqlx::query_as(
                    "SELECT session_id FROM sessions \
                     WHERE user_id = $1 AND revoke_time IS NULL AND expire_time > $2 \
                     ORDER BY create_time DESC, session_id DESC",
                )
                .bind(&session.user_id)
                .bind(revoking.now)
                .fetch_all(&mut *tx)
                .await?;
                let beyond: Vec<&String> = live.iter().skip(max_live).map(|(id,)| id).collect();
                for oldest in &beyond {
                    sqlx::query("UPDATE sessions SET revoke_time = $1 WHERE session_id = $2")
                        .bind(revoking.now)
                        .bind(*oldest)
                        .execute(&mut *tx)
                        .await?;
                    next = insert_revocation!(&mut *tx, next, *oldest, revoking)?;
                }
                finish_revocations!(&mut *tx, next)?;
                tx.commit().await?;
                Ok(beyond.len())
            }

            async fn rotate(
                &self,
                old: &[u8],
                new: &[u8],
                revoking: Revoking,
            ) -> Result<Rotation, StoreError> {
                let now = revoking.now;
                // A token that is neither current nor used is refused without a write (a flood
                // of made-up tokens must not take SQLite's write lock).
                let known: Option<(String,)> = sqlx::query_as(
                    "SELECT session_id FROM sessions WHERE refresh_hash = $1 \
                     UNION ALL SELECT session_id FROM used_refresh_tokens WHERE refresh_hash = $1",
                )
                .bind(old)
                .fetch_optional(&self.pool)
                .await?;
                if known.is_none() {
                    return Ok(Rotation::Invalid);
                }
                let mut tx = self.pool.begin().await?;
                // One conditional UPDATE: of two concurrent rotations of the same token, only
                // one can match the current hash.
                let rotated: Option<(String, String, i64, i64, i64, i64)> = sqlx::query_as(
                    "UPDATE sessions SET refresh_hash = $1, generation = generation + 1, \
                         last_use_time = $2 \
                     WHERE refresh_hash = $3 AND revoke_time IS NULL AND expire_time > $2 \
                     RETURNING session_id, user_id, create_time, last_use_time, expire_time, \
                         generation",
                )
                .bind(new)
                .bind(now)
                .bind(old)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some((id, user, create, last_use, expire, generation)) = rotated {
                    let session = session((id, user, create, last_use, expire));
                    sqlx::query(
                        "INSERT INTO used_refresh_tokens (refresh_hash, session_id, generation) \
                         VALUES ($1, $2, $3)",
                    )
                    .bind(old)
                    .bind(&session.session_id)
                    .bind(generation)
                    .execute(&mut *tx)
                    .await?;
                    // Remember only the latest used tokens: one session refreshed in a loop
                    // must not grow the table without end.
                    sqlx::query(
                        "DELETE FROM used_refresh_tokens WHERE session_id = $1 AND generation <= $2",
                    )
                    .bind(&session.session_id)
                    .bind(generation - USED_TOKENS_PER_SESSION)
                    .execute(&mut *tx)
                    .await?;
                    let (email,): (String,) =
                        sqlx::query_as("SELECT email FROM credentials WHERE user_id = $1")
                            .bind(&session.user_id)
                            .fetch_one(&mut *tx)
                            .await?;
                    tx.commit().await?;
                    return Ok(Rotation::Rotated(session, email));
                }
                let reused: Option<(String,)> = sqlx::query_as(
                    "SELECT session_id FROM used_refresh_tokens WHERE refresh_hash = $1",
                )
                .bind(old)
                .fetch_optional(&mut *tx)
                .await?;
                let Some((reused,)) = reused else {
                    tx.commit().await?;
                    return Ok(Rotation::Invalid);
                };
                tx.commit().await?;
                // Reuse: the whole session ends, for every verifier.
                self.revoke_session(&reused, revoking).await?;
                Ok(Rotation::Reused)
            }

            async fn revoke_by_refresh(
                &self,
                hash: &[u8],
                revoking: Revoking,
            ) -> Result<bool, StoreError> {
                let found: Option<(String,)> = sqlx::query_as(
                    "SELECT session_id FROM sessions WHERE refresh_hash = $1 \
                     UNION SELECT session_id FROM used_refresh_tokens WHERE refresh_hash = $1",
                )
                .bind(hash)
                .fetch_optional(&self.pool)
                .await?;
                match found {
                    Some((session_id,)) => self.revoke_session(&session_id, revoking).await,
                    None => Ok(false),
                }
            }

            async fn session_live(&self, session_id: &str, now: i64) -> Result<bool, StoreError> {
                let row: Option<(String,)> = sqlx::query_as(
                    "SELECT session_id FROM sessions \
                     WHERE session_id = $1 AND revoke_time IS NULL AND expire_time > $2",
                )
                .bind(session_id)
                .bind(now)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.is_some())
            }

            async fn live_sessions(
                &self,
                user_id: &str,
                now: i64,
            ) -> Result<Vec<Session>, StoreError> {
                let rows: Vec<SessionRow> = sqlx::query_as(
                    "SELECT session_id, user_id, create_time, last_use_time, expire_time \
                     FROM sessions WHERE user_id = $1 AND revoke_time IS NULL AND expire_time > $2 \
                     ORDER BY create_time DESC, session_id DESC",
                )
                .bind(user_id)
                .bind(now)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(session).collect())
            }

            async fn delete_account(
                &self,
                user_id: &str,
                revoking: Revoking,
            ) -> Result<bool, StoreError> {
                let mut tx = self.pool.begin().await?;
                let mut next = next_revocation!(&mut *tx)?;
                let live: Vec<(String,)> = sqlx::query_as(
                    "SELECT session_id FROM sessions \
                     WHERE user_id = $1 AND revoke_time IS NULL AND expire_time > $2",
                )
                .bind(user_id)
                .bind(revoking.now)
                .fetch_all(&mut *tx)
                .await?;
                for (session_id,) in &live {
                    next = insert_revocation!(&mut *tx, next, session_id, revoking)?;
                }
                finish_revocations!(&mut *tx, next)?;
                // Sessions and used tokens go with the credentials (ON DELETE CASCADE).
                let deleted = sqlx::query("DELETE FROM credentials WHERE user_id = $1")
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                Ok(deleted > 0)
            }

            async fn revocations_after(
                &self,
                after: i64,
                now: i64,
                limit: i64,
            ) -> Result<Vec<Revocation>, StoreError> {
                let rows: Vec<(i64, String, i64)> = sqlx::query_as(
                    "SELECT id, session_id, expire_time FROM revocations \
                     WHERE id > $1 AND expire_time > $2 ORDER BY id LIMIT $3",
                )
                .bind(after)
                .bind(now)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|(id, session_id, expire_time)| Revocation {
                        id,
                        session_id,
                        expire_time,
                    })
                    .collect())
            }

            async fn last_revocation(&self) -> Result<i64, StoreError> {
                let (last,): (i64,) =
                    sqlx::query_as("SELECT last FROM revocation_sequence WHERE id = 1")
                        .fetch_one(&self.pool)
                        .await?;
                Ok(last)
            }

            async fn prune(&self, now: i64, revoked_before: i64) -> Result<Pruned, StoreError> {
                // Used refresh tokens go with their sessions (ON DELETE CASCADE).
                let sessions = sqlx::query(
                    "DELETE FROM sessions WHERE expire_time <= $1 OR revoke_time < $2",
                )
                .bind(now)
                .bind(revoked_before)
                .execute(&self.pool)
                .await?
                .rows_affected();
                let revocations = sqlx::query("DELETE FROM revocations WHERE expire_time <= $1")
                    .bind(now)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                Ok(Pruned {
                    sessions,
                    revocations,
                })
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }
        }
    };
}

macro_rules! inherent_store {
    ($store:ty) => {
        impl $store {
            /// Revokes `session_id` (if not yet) and publishes it to the followers.
            async fn revoke_session(
                &self,
                session_id: &str,
                revoking: Revoking,
            ) -> Result<bool, StoreError> {
                let mut tx = self.pool.begin().await?;
                let next = next_revocation!(&mut *tx)?;
                let revoked = sqlx::query(
                    "UPDATE sessions SET revoke_time = $1 \
                     WHERE session_id = $2 AND revoke_time IS NULL",
                )
                .bind(revoking.now)
                .bind(session_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                let next = if revoked > 0 {
                    insert_revocation!(&mut *tx, next, session_id, revoking)?
                } else {
                    next
                };
                finish_revocations!(&mut *tx, next)?;
                tx.commit().await?;
                Ok(revoked > 0)
            }
        }
    };
}

/// Takes the revocation id row (held until commit) and returns the last id handed out.
macro_rules! next_revocation {
    ($executor:expr) => {{
        let taken: Result<(i64,), sqlx::Error> = sqlx::query_as(
            "UPDATE revocation_sequence SET last = last WHERE id = 1 RETURNING last",
        )
        .fetch_one($executor)
        .await;
        taken.map(|(last,)| last)
    }};
}

/// Inserts one revocation with the id after `$last`; returns that id.
macro_rules! insert_revocation {
    ($executor:expr, $last:expr, $session_id:expr, $revoking:expr) => {{
        let id: i64 = $last + 1;
        let revoking: Revoking = $revoking;
        sqlx::query("INSERT INTO revocations (id, session_id, expire_time) VALUES ($1, $2, $3)")
            .bind(id)
            .bind($session_id)
            .bind(revoking.forget_at)
            .execute($executor)
            .await
            .map(|_| id)
    }};
}

/// Records the last revocation id handed out in the transaction.
macro_rules! finish_revocations {
    ($executor:expr, $last:expr) => {{
        let last: i64 = $last;
        sqlx::query("UPDATE revocation_sequence SET last = $1 WHERE id = 1")
            .bind(last)
            .execute($executor)
            .await
            .map(|_| ())
    }};
}

macro_rules! insert_session {
    ($executor:expr, $session:expr) => {{
        let s: &NewSession = $session;
        sqlx::query(
            "INSERT INTO sessions (session_id, user_id, refresh_hash, generation, create_time, \
                 last_use_time, expire_time) VALUES ($1, $2, $3, 0, $4, $4, $5)",
        )
        .bind(&s.session_id)
        .bind(&s.user_id)
        .bind(&s.refresh_hash)
        .bind(s.now)
        .bind(s.expire_time)
        .execute($executor)
        .await
    }};
}

impl_store!(SqliteStore);
impl_store!(PgStore);
inherent_store!(SqliteStore);
inherent_store!(PgStore);
