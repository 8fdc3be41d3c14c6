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
    /// Stores a new session.
    async fn create_session(&self, session: &NewSession) -> Result<(), StoreError>;
    /// Replaces the refresh token `old` by `new` if `old` is current and its session live; if
    /// `old` was already used, revokes its session.
    async fn rotate(&self, old: &[u8], new: &[u8], now: i64) -> Result<Rotation, StoreError>;
    /// Revokes the session whose current or used refresh token is `hash`; false if none.
    async fn revoke_by_refresh(&self, hash: &[u8], now: i64) -> Result<bool, StoreError>;
    /// Whether the session exists, is not revoked and has not expired.
    async fn session_live(&self, session_id: &str, now: i64) -> Result<bool, StoreError>;
    /// The user's live sessions, newest first.
    async fn live_sessions(&self, user_id: &str, now: i64) -> Result<Vec<Session>, StoreError>;
    /// Deletes the user's credentials and every session; false if there were none.
    async fn delete_account(&self, user_id: &str) -> Result<bool, StoreError>;
    /// Whether the database answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

const SQLITE_MIGRATIONS: Migrations = Migrations(&[(
    1,
    "init",
    include_str!("../migrations/sqlite/0001_init.sql"),
)]);
const POSTGRES_MIGRATIONS: Migrations = Migrations(&[(
    1,
    "init",
    include_str!("../migrations/postgres/0001_init.sql"),
)]);

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

            async fn create_session(&self, session: &NewSession) -> Result<(), StoreError> {
                insert_session!(&self.pool, session)?;
                Ok(())
            }

            async fn rotate(
                &self,
                old: &[u8],
                new: &[u8],
                now: i64,
            ) -> Result<Rotation, StoreError> {
                let mut tx = self.pool.begin().await?;
                // One conditional UPDATE: of two concurrent rotations of the same token, only
                // one can match the current hash.
                let rotated: Option<SessionRow> = sqlx::query_as(
                    "UPDATE sessions SET refresh_hash = $1, generation = generation + 1, \
                         last_use_time = $2 \
                     WHERE refresh_hash = $3 AND revoke_time IS NULL AND expire_time > $2 \
                     RETURNING session_id, user_id, create_time, last_use_time, expire_time",
                )
                .bind(new)
                .bind(now)
                .bind(old)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(session) = rotated.map(session) {
                    sqlx::query(
                        "INSERT INTO used_refresh_tokens (refresh_hash, session_id) VALUES ($1, $2)",
                    )
                    .bind(old)
                    .bind(&session.session_id)
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
                let revoked = sqlx::query(
                    "UPDATE sessions SET revoke_time = $1 WHERE revoke_time IS NULL AND \
                     session_id IN (SELECT session_id FROM used_refresh_tokens WHERE refresh_hash = $2)",
                )
                .bind(now)
                .bind(old)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                let reused: Option<(String,)> = sqlx::query_as(
                    "SELECT session_id FROM used_refresh_tokens WHERE refresh_hash = $1",
                )
                .bind(old)
                .fetch_optional(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(if revoked > 0 || reused.is_some() {
                    Rotation::Reused
                } else {
                    Rotation::Invalid
                })
            }

            async fn revoke_by_refresh(&self, hash: &[u8], now: i64) -> Result<bool, StoreError> {
                let revoked = sqlx::query(
                    "UPDATE sessions SET revoke_time = $1 WHERE revoke_time IS NULL AND \
                     (refresh_hash = $2 OR session_id IN \
                        (SELECT session_id FROM used_refresh_tokens WHERE refresh_hash = $2))",
                )
                .bind(now)
                .bind(hash)
                .execute(&self.pool)
                .await?
                .rows_affected();
                Ok(revoked > 0)
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

            async fn delete_account(&self, user_id: &str) -> Result<bool, StoreError> {
                // Sessions and used tokens go with the credentials (ON DELETE CASCADE).
                let deleted = sqlx::query("DELETE FROM credentials WHERE user_id = $1")
                    .bind(user_id)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                Ok(deleted > 0)
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }
        }
    };
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
