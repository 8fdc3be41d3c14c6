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
            make_private(default_file)?;
            let options = SqliteConnectOptions::new().filename(default_file);
            Ok(Pool::Sqlite(open_sqlite(options, sqlite).await?))
        }
    }
}

/// Makes the SQLite file's folders (mode 0700) and the file itself (0600) private to the
/// service's user before SQLite opens it — it holds password hashes, refresh-token digests and
/// keys — and tightens them if they already exist. SQLite gives its `-wal` and `-shm` files the
/// database file's mode.
fn make_private(file: &Path) -> Result<(), OpenError> {
    let data_dir = |dir: &Path, e| OpenError::DataDir(dir.display().to_string(), e);
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        private_dirs(dir).map_err(|e| data_dir(dir, e))?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(file);
        match created {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                for suffix in ["", "-wal", "-shm"] {
                    let mut path = file.as_os_str().to_owned();
                    path.push(suffix);
                    let path = std::path::PathBuf::from(path);
                    if path.exists() {
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                            .map_err(|e| data_dir(&path, e))?;
                    }
                }
            }
            Err(e) => return Err(data_dir(file, e)),
        }
    }
    Ok(())
}

/// Creates `dir` and its missing parents with mode 0700; the last folder is made 0700 even if
/// it existed (the service's own folder, e.g. `<data-dir>/auth`), and so is its parent when
/// this call created it.
fn private_dirs(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir)?;
    Ok(())
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
