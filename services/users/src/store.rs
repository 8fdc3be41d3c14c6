//! Profiles and their change log in SQL: one trait, [`UsersStore`], implemented for SQLite (the
//! embedded default, `<data-dir>/users/users.db`) and PostgreSQL by one macro over the same
//! portable SQL.
//!
//! Every change and its event are written in one transaction (the outbox pattern). Each write
//! transaction first takes the single `event_sequence` row (`UPDATE … RETURNING`) and holds it
//! until commit, so writers are serialised at the log and sequences grow in commit order — on
//! PostgreSQL, where concurrent transactions could otherwise commit out of id order, and on
//! SQLite, where taking a write lock first also avoids lock-upgrade deadlocks. A transaction that
//! changes nothing rolls back and uses no sequence.
//!
//! Times are Unix milliseconds.

use std::{path::Path, sync::Arc};

use mesh_store::{Migrations, Pool};
use sqlx::{postgres::PgPool, sqlite::SqlitePool};

const MIGRATIONS: Migrations = Migrations(&[
    (1, "init", include_str!("../migrations/0001_init.sql")),
    (
        2,
        "settings",
        include_str!("../migrations/0002_settings.sql"),
    ),
    (
        3,
        "erasure_retention",
        include_str!("../migrations/0003_erasure_retention.sql"),
    ),
]);

/// How long a deleted profile's last state is kept for the live DELETED event (every replica's
/// feed reads new events within its poll interval, 250 ms by default).
pub const DELETED_TAIL_KEEP_MS: i64 = 60_000;

/// A storage failure. Never shown to callers.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Open(#[from] mesh_store::OpenError),
    /// A stored event has a kind this version does not know.
    #[error("unknown event kind {0} in the log")]
    UnknownKind(i64),
}

/// A stored profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The user id.
    pub id: String,
    /// The e-mail from the owner's token.
    pub email: String,
    /// The display name, trimmed.
    pub display_name: String,
    /// The bio, trimmed.
    pub bio: String,
    /// Creation time.
    pub create_time: i64,
    /// Last change.
    pub update_time: i64,
    /// Starts at 1, grows by one per change.
    pub version: i64,
}

/// What happened to a profile (numbered as the contract's `EventKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Created.
    Created = 1,
    /// Changed.
    Updated = 2,
    /// Deleted.
    Deleted = 3,
}

impl EventKind {
    fn from_i64(n: i64) -> Result<Self, StoreError> {
        match n {
            1 => Ok(Self::Created),
            2 => Ok(Self::Updated),
            3 => Ok(Self::Deleted),
            other => Err(StoreError::UnknownKind(other)),
        }
    }
}

/// One entry of the change log. Its `user.email` is always empty: events never carry e-mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Strictly increasing in commit order.
    pub sequence: i64,
    /// What happened.
    pub kind: EventKind,
    /// The profile after the change (for a deletion: the last state, version + 1).
    pub user: User,
    /// When it was committed.
    pub occur_time: i64,
}

/// What `create` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// A new profile, and its event.
    New(User, Event),
    /// The profile already existed; `same_request` when it was made with the same non-empty
    /// request id (an idempotent retry).
    Exists {
        /// The profile as it is now.
        user: User,
        /// Whether the retry carries the request id of the original create.
        same_request: bool,
    },
}

/// The fields an update may change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// A new display name.
    pub display_name: Option<String>,
    /// A new bio.
    pub bio: Option<String>,
}

/// What `update` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Updated {
    /// Changed, with its event.
    Changed(User, Event),
    /// Nothing differed: no new version, no event.
    Unchanged(User),
    /// No such profile.
    NotFound,
    /// `expected_version` did not match; the stored version.
    Conflict(i64),
}

/// Storage of profiles and their change log.
#[tonic::async_trait]
pub trait UsersStore: Send + Sync + std::fmt::Debug + 'static {
    /// Creates a profile with version 1, or reports the existing one.
    async fn create(
        &self,
        user: &User,
        request_id: Option<&str>,
        now: i64,
    ) -> Result<Created, StoreError>;
    /// One profile.
    async fn get(&self, id: &str) -> Result<Option<User>, StoreError>;
    /// The profiles among `ids` that exist (any order).
    async fn batch_get(&self, ids: &[String]) -> Result<Vec<User>, StoreError>;
    /// Up to `limit` profiles with ids greater than `after` (all when `None`), by id.
    async fn list(&self, after: Option<&str>, limit: i64) -> Result<Vec<User>, StoreError>;
    /// Applies `changes` if the profile exists and (when `expected_version` > 0) has that
    /// version.
    async fn update(
        &self,
        id: &str,
        changes: &Changes,
        expected_version: i64,
        now: i64,
    ) -> Result<Updated, StoreError>;
    /// Deletes a profile and erases its display name and bio from every stored event of it;
    /// its DELETED event (with the last state), or `None` if there was none.
    async fn delete(&self, id: &str, now: i64) -> Result<Option<Event>, StoreError>;
    /// Up to `limit` stored events with a sequence greater than `after`, in order: what a
    /// replay sends (a deleted profile's events erased).
    async fn events_after(&self, after: i64, limit: i64) -> Result<Vec<Event>, StoreError>;
    /// As [`UsersStore::events_after`], but a DELETED event still carries the profile's last
    /// state while its tail is kept: what the live feed broadcasts.
    async fn live_events_after(&self, after: i64, limit: i64) -> Result<Vec<Event>, StoreError>;
    /// The sequence through which events were removed by retention (0: none).
    async fn pruned_through(&self) -> Result<i64, StoreError>;
    /// Removes deleted profiles' tails kept past `now`, and (with `retain_after`) every event
    /// that occurred before it. Returns the new `pruned_through`.
    async fn prune(&self, now: i64, retain_after: Option<i64>) -> Result<i64, StoreError>;
    /// The newest sequence handed out (0 for an empty log).
    async fn last_sequence(&self) -> Result<i64, StoreError>;
    /// Whether the database answers (`SELECT 1`).
    async fn ping(&self) -> Result<(), StoreError>;
    /// The setting `name`: the stored value, or `proposed` if none was stored yet (then stored,
    /// so every replica that asks later gets the same value).
    async fn setting_or_insert(&self, name: &str, proposed: &str) -> Result<String, StoreError>;
    /// A signal of the commits every process sharing the database makes to the log, as they
    /// commit; `None` where the store has none (SQLite: the log has one writer, this process).
    async fn commits(&self) -> Result<Option<Commits>, StoreError>;
}

/// The channel on which PostgreSQL announces each commit that appends to the log.
pub const COMMITS_CHANNEL: &str = "mesh_users_log";

/// Commits to the log announced by PostgreSQL (`LISTEN`/`NOTIFY`), from any replica: one
/// dedicated connection of the store's pool, re-established by sqlx when it is lost.
#[derive(Debug)]
pub struct Commits(sqlx::postgres::PgListener);

impl Commits {
    /// Waits for the next announced commit. After an error (the connection was lost) the next
    /// call connects again; announcements made meanwhile are lost, so the caller reads the log
    /// once more then.
    pub async fn next(&mut self) -> Result<(), StoreError> {
        self.0.recv().await?;
        Ok(())
    }
}

impl SqliteStore {
    /// SQLite's log has one writer, this process, which wakes its own feed.
    async fn announce(_tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>) -> Result<(), StoreError> {
        Ok(())
    }

    async fn listen(&self) -> Result<Option<Commits>, StoreError> {
        Ok(None)
    }
}

impl PgStore {
    /// Announces the appended event to every replica's feed when the transaction commits
    /// (PostgreSQL delivers a transaction's notifications at commit, and folds repeats).
    async fn announce(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(COMMITS_CHANNEL)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn listen(&self) -> Result<Option<Commits>, StoreError> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(COMMITS_CHANNEL).await?;
        Ok(Some(Commits(listener)))
    }
}

/// Opens the store named by `url`, or the SQLite file `<data_dir>/users/users.db`.
pub async fn open(url: Option<&str>, data_dir: &Path) -> Result<Arc<dyn UsersStore>, StoreError> {
    let file = data_dir.join("users").join("users.db");
    Ok(
        match mesh_store::open(url, &file, MIGRATIONS, MIGRATIONS).await? {
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

type UserRow = (String, String, String, String, i64, i64, i64);
type EventRow = (i64, i64, String, String, String, i64, i64, i64, i64);

const USER_COLUMNS: &str = "id, email, display_name, bio, create_time, update_time, version";

fn user((id, email, display_name, bio, create_time, update_time, version): UserRow) -> User {
    User {
        id,
        email,
        display_name,
        bio,
        create_time,
        update_time,
        version,
    }
}

fn event(row: EventRow) -> Result<Event, StoreError> {
    let (sequence, kind, id, display_name, bio, create_time, update_time, version, occur_time) =
        row;
    Ok(Event {
        sequence,
        kind: EventKind::from_i64(kind)?,
        user: User {
            id,
            email: String::new(),
            display_name,
            bio,
            create_time,
            update_time,
            version,
        },
        occur_time,
    })
}

macro_rules! impl_store {
    ($store:ty, $db:ty) => {
        impl $store {
            /// Takes the next sequence; holds the log's row until the transaction ends.
            async fn next_sequence(
                tx: &mut sqlx::Transaction<'_, $db>,
            ) -> Result<i64, StoreError> {
                let (sequence,): (i64,) = sqlx::query_as(
                    "UPDATE event_sequence SET last = last + 1 WHERE id = 1 RETURNING last",
                )
                .fetch_one(&mut **tx)
                .await?;
                Ok(sequence)
            }

            /// Appends the event of `user`'s change.
            async fn append(
                tx: &mut sqlx::Transaction<'_, $db>,
                sequence: i64,
                kind: EventKind,
                user: &User,
                now: i64,
            ) -> Result<Event, StoreError> {
                sqlx::query(
                    "INSERT INTO user_events (sequence, kind, user_id, display_name, bio, \
                         create_time, update_time, version, occur_time) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(sequence)
                .bind(kind as i64)
                .bind(&user.id)
                .bind(&user.display_name)
                .bind(&user.bio)
                .bind(user.create_time)
                .bind(user.update_time)
                .bind(user.version)
                .bind(now)
                .execute(&mut **tx)
                .await?;
                Self::announce(tx).await?;
                Ok(Event {
                    sequence,
                    kind,
                    user: User {
                        email: String::new(),
                        ..user.clone()
                    },
                    occur_time: now,
                })
            }

            async fn get_in(
                tx: &mut sqlx::Transaction<'_, $db>,
                id: &str,
            ) -> Result<Option<(User, Option<String>)>, StoreError> {
                let row: Option<(String, String, String, String, i64, i64, i64, Option<String>)> =
                    sqlx::query_as(&format!(
                        "SELECT {USER_COLUMNS}, create_request_id FROM users WHERE id = $1"
                    ))
                    .bind(id)
                    .fetch_optional(&mut **tx)
                    .await?;
                Ok(row.map(|(a, b, c, d, e, f, g, request_id)| (user((a, b, c, d, e, f, g)), request_id)))
            }
        }

        #[tonic::async_trait]
        impl UsersStore for $store {
            #[tracing::instrument(name = "users.store.create", level = "info", skip_all)]
            async fn create(
                &self,
                new: &User,
                request_id: Option<&str>,
                now: i64,
            ) -> Result<Created, StoreError> {
                let mut tx = self.pool.begin().await?;
                let sequence = Self::next_sequence(&mut tx).await?;
                if let Some((existing, original)) = Self::get_in(&mut tx, &new.id).await? {
                    tx.rollback().await?;
                    let same_request =
                        request_id.is_some_and(|r| !r.is_empty() && original.as_deref() == Some(r));
                    return Ok(Created::Exists {
                        user: existing,
                        same_request,
                    });
                }
                let user = User {
                    create_time: now,
                    update_time: now,
                    version: 1,
                    ..new.clone()
                };
                sqlx::query(
                    "INSERT INTO users (id, email, display_name, bio, create_time, update_time, \
                         version, create_request_id) VALUES ($1, $2, $3, $4, $5, $5, 1, $6)",
                )
                .bind(&user.id)
                .bind(&user.email)
                .bind(&user.display_name)
                .bind(&user.bio)
                .bind(now)
                .bind(request_id.filter(|r| !r.is_empty()))
                .execute(&mut *tx)
                .await?;
                let event = Self::append(&mut tx, sequence, EventKind::Created, &user, now).await?;
                tx.commit().await?;
                Ok(Created::New(user, event))
            }

            // One span per read (a child of the call's span in its trace), as any store call
            // can have: `#[tracing::instrument]` is all it takes.
            #[tracing::instrument(name = "users.store.get", level = "info", skip_all)]
            async fn get(&self, id: &str) -> Result<Option<User>, StoreError> {
                let row: Option<UserRow> =
                    sqlx::query_as(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
                        .bind(id)
                        .fetch_optional(&self.pool)
                        .await?;
                Ok(row.map(user))
            }

            async fn batch_get(&self, ids: &[String]) -> Result<Vec<User>, StoreError> {
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let placeholders: Vec<String> =
                    (1..=ids.len()).map(|i| format!("${i}")).collect();
                let sql = format!(
                    "SELECT {USER_COLUMNS} FROM users WHERE id IN ({})",
                    placeholders.join(", ")
                );
                let mut query = sqlx::query_as::<_, UserRow>(&sql);
                for id in ids {
                    query = query.bind(id);
                }
                Ok(query.fetch_all(&self.pool).await?.into_iter().map(user).collect())
            }

            async fn list(&self, after: Option<&str>, limit: i64) -> Result<Vec<User>, StoreError> {
                let rows: Vec<UserRow> = sqlx::query_as(&format!(
                    "SELECT {USER_COLUMNS} FROM users WHERE id > $1 ORDER BY id LIMIT $2"
                ))
                .bind(after.unwrap_or(""))
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(user).collect())
            }

            async fn update(
                &self,
                id: &str,
                changes: &Changes,
                expected_version: i64,
                now: i64,
            ) -> Result<Updated, StoreError> {
                let mut tx = self.pool.begin().await?;
                let sequence = Self::next_sequence(&mut tx).await?;
                let Some((current, _)) = Self::get_in(&mut tx, id).await? else {
                    tx.rollback().await?;
                    return Ok(Updated::NotFound);
                };
                if expected_version > 0 && expected_version != current.version {
                    tx.rollback().await?;
                    return Ok(Updated::Conflict(current.version));
                }
                let display_name = changes
                    .display_name
                    .clone()
                    .unwrap_or_else(|| current.display_name.clone());
                let bio = changes.bio.clone().unwrap_or_else(|| current.bio.clone());
                if display_name == current.display_name && bio == current.bio {
                    tx.rollback().await?;
                    return Ok(Updated::Unchanged(current));
                }
                let user = User {
                    display_name,
                    bio,
                    update_time: now,
                    version: current.version + 1,
                    ..current
                };
                sqlx::query(
                    "UPDATE users SET display_name = $1, bio = $2, update_time = $3, version = $4 \
                     WHERE id = $5",
                )
                .bind(&user.display_name)
                .bind(&user.bio)
                .bind(now)
                .bind(user.version)
                .bind(&user.id)
                .execute(&mut *tx)
                .await?;
                let event = Self::append(&mut tx, sequence, EventKind::Updated, &user, now).await?;
                tx.commit().await?;
                Ok(Updated::Changed(user, event))
            }

            async fn delete(&self, id: &str, now: i64) -> Result<Option<Event>, StoreError> {
                let mut tx = self.pool.begin().await?;
                let sequence = Self::next_sequence(&mut tx).await?;
                let Some((current, _)) = Self::get_in(&mut tx, id).await? else {
                    tx.rollback().await?;
                    return Ok(None);
                };
                sqlx::query("DELETE FROM users WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                // No replay of the log shows a deleted profile's name or bio again.
                sqlx::query(
                    "UPDATE user_events SET display_name = '', bio = '' WHERE user_id = $1",
                )
                .bind(id)
                .execute(&mut *tx)
                .await?;
                // The DELETED event carries the last state with version + 1, stored erased; the
                // live feed shows the last state from the tail.
                let last = User {
                    update_time: now,
                    version: current.version + 1,
                    ..current
                };
                let erased = User {
                    display_name: String::new(),
                    bio: String::new(),
                    ..last.clone()
                };
                Self::append(&mut tx, sequence, EventKind::Deleted, &erased, now).await?;
                sqlx::query(
                    "INSERT INTO deleted_tail (sequence, display_name, bio, erase_after) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(sequence)
                .bind(&last.display_name)
                .bind(&last.bio)
                .bind(now + DELETED_TAIL_KEEP_MS)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(Some(Event {
                    sequence,
                    kind: EventKind::Deleted,
                    user: User {
                        email: String::new(),
                        ..last
                    },
                    occur_time: now,
                }))
            }

            async fn events_after(&self, after: i64, limit: i64) -> Result<Vec<Event>, StoreError> {
                let rows: Vec<EventRow> = sqlx::query_as(
                    "SELECT sequence, kind, user_id, display_name, bio, create_time, update_time, \
                         version, occur_time \
                     FROM user_events WHERE sequence > $1 ORDER BY sequence LIMIT $2",
                )
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter().map(event).collect()
            }

            async fn live_events_after(
                &self,
                after: i64,
                limit: i64,
            ) -> Result<Vec<Event>, StoreError> {
                let rows: Vec<EventRow> = sqlx::query_as(
                    "SELECT e.sequence, e.kind, e.user_id, \
                         COALESCE(t.display_name, e.display_name), COALESCE(t.bio, e.bio), \
                         e.create_time, e.update_time, e.version, e.occur_time \
                     FROM user_events e LEFT JOIN deleted_tail t ON t.sequence = e.sequence \
                     WHERE e.sequence > $1 ORDER BY e.sequence LIMIT $2",
                )
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter().map(event).collect()
            }

            async fn pruned_through(&self) -> Result<i64, StoreError> {
                let (pruned,): (i64,) =
                    sqlx::query_as("SELECT pruned_through FROM event_sequence WHERE id = 1")
                        .fetch_one(&self.pool)
                        .await?;
                Ok(pruned)
            }

            async fn prune(&self, now: i64, retain_after: Option<i64>) -> Result<i64, StoreError> {
                sqlx::query("DELETE FROM deleted_tail WHERE erase_after <= $1")
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                let mut tx = self.pool.begin().await?;
                // The log's row first, as every writer takes it.
                let (mut pruned,): (i64,) = sqlx::query_as(
                    "UPDATE event_sequence SET pruned_through = pruned_through WHERE id = 1 \
                     RETURNING pruned_through",
                )
                .fetch_one(&mut *tx)
                .await?;
                if let Some(cutoff) = retain_after {
                    let (through,): (Option<i64>,) = sqlx::query_as(
                        "SELECT MAX(sequence) FROM user_events WHERE occur_time < $1",
                    )
                    .bind(cutoff)
                    .fetch_one(&mut *tx)
                    .await?;
                    if let Some(through) = through.filter(|t| *t > pruned) {
                        sqlx::query("DELETE FROM user_events WHERE sequence <= $1")
                            .bind(through)
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query("UPDATE event_sequence SET pruned_through = $1 WHERE id = 1")
                            .bind(through)
                            .execute(&mut *tx)
                            .await?;
                        pruned = through;
                    }
                }
                tx.commit().await?;
                Ok(pruned)
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            async fn last_sequence(&self) -> Result<i64, StoreError> {
                let (last,): (i64,) =
                    sqlx::query_as("SELECT last FROM event_sequence WHERE id = 1")
                        .fetch_one(&self.pool)
                        .await?;
                Ok(last)
            }

            async fn commits(&self) -> Result<Option<Commits>, StoreError> {
                self.listen().await
            }

            async fn setting_or_insert(
                &self,
                name: &str,
                proposed: &str,
            ) -> Result<String, StoreError> {
                sqlx::query(
                    "INSERT INTO service_settings (name, value) VALUES ($1, $2) \
                     ON CONFLICT (name) DO NOTHING",
                )
                .bind(name)
                .bind(proposed)
                .execute(&self.pool)
                .await?;
                let (value,): (String,) =
                    sqlx::query_as("SELECT value FROM service_settings WHERE name = $1")
                        .bind(name)
                        .fetch_one(&self.pool)
                        .await?;
                Ok(value)
            }
        }
    };
}

impl_store!(SqliteStore, sqlx::Sqlite);
impl_store!(PgStore, sqlx::Postgres);
