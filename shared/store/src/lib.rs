//! What the mesh's SQL stores share: choosing the database from a URL, opening SQLite with the
//! settings that make it durable, connecting to PostgreSQL, and applying migrations embedded in
//! the binary (so a deployed binary needs no migration files beside it).
//!
//! Each service keeps its own schema, its own migrations per database and its own queries; only
//! this plumbing is common.

use std::{borrow::Cow, path::Path, str::FromStr as _, time::Duration};

use futures_util::future::BoxFuture;
use sqlx::{
    migrate::{Migration, MigrationSource, MigrationType, Migrator},
    postgres::{PgConnectOptions, PgPool, PgPoolOptions},
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
    },
};

#[cfg(feature = "test-util")]
pub mod testing;

/// Migrations embedded in the binary: `(version, description, SQL)`, oldest first.
#[derive(Debug, Clone, Copy)]
pub struct Migrations(pub &'static [(i64, &'static str, &'static str)]);

impl MigrationSource<'static> for Migrations {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, sqlx::error::BoxDynError>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|(version, description, sql)| {
                    Migration::new(
                        *version,
                        Cow::Borrowed(*description),
                        MigrationType::Simple,
                        Cow::Borrowed(*sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URL could not be parsed, or the database could not be reached.
    #[error("cannot connect to the database")]
    Connect(#[from] sqlx::Error),
    /// A migration failed.
    #[error("cannot migrate the database")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The data folder could not be created.
    #[error("cannot create the data folder {0}")]
    DataDir(String, #[source] std::io::Error),
}

/// A migrated connection pool of either kind.
#[derive(Debug, Clone)]
pub enum Pool {
    /// SQLite.
    Sqlite(SqlitePool),
    /// PostgreSQL.
    Postgres(PgPool),
}

/// Opens the database named by `url` (`postgres://…`/`postgresql://…`, or `sqlite://…`), or
/// the SQLite file `default_file` when `url` is `None`, and applies the matching migrations.
pub async fn open(
    url: Option<&str>,
    default_file: &Path,
    sqlite: Migrations,
    postgres: Migrations,
) -> Result<Pool, OpenError> {
    match url {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(PgConnectOptions::from_str(url)?)
                .await?;
            Migrator::new(postgres).await?.run(&pool).await?;
            Ok(Pool::Postgres(pool))
        }
        Some(url) => Ok(Pool::Sqlite(
            open_sqlite(SqliteConnectOptions::from_str(url)?, sqlite).await?,
        )),
        None => {
            if let Some(dir) = default_file.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| OpenError::DataDir(dir.display().to_string(), e))?;
            }
            let options = SqliteConnectOptions::new().filename(default_file);
            Ok(Pool::Sqlite(open_sqlite(options, sqlite).await?))
        }
    }
}

/// Opens SQLite durably (WAL, `synchronous=FULL`, foreign keys on, a busy timeout) and
/// migrates it.
async fn open_sqlite(
    options: SqliteConnectOptions,
    migrations: Migrations,
) -> Result<SqlitePool, OpenError> {
    let options = options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(5));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await?;
    Migrator::new(migrations).await?.run(&pool).await?;
    Ok(pool)
}
