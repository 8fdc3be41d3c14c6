//! Test helpers (feature `test-util`): a fresh PostgreSQL database per test.

use sqlx::Connection as _;

/// The environment variable naming a PostgreSQL server tests may create databases on.
pub const PG_ENV: &str = "MESH_TEST_DATABASE_URL";

/// The URL of a fresh, empty database for one test, or `None` when no server is configured
/// outside CI (with a loud message). In CI (`CI=true`) a missing server fails the test.
pub async fn postgres_for(prefix: &str, test: &str) -> Option<String> {
    match std::env::var(PG_ENV) {
        Ok(url) if !url.is_empty() => Some(fresh_database(&url, prefix, test).await),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{PG_ENV} must name a PostgreSQL server in CI (scripts/test sets it)")
        }
        _ => {
            eprintln!(
                "\n*** {test}: PostgreSQL SKIPPED ({PG_ENV} is not set; scripts/test sets it). \
                 CI never skips it. ***\n"
            );
            None
        }
    }
}

/// Creates an empty database on the server at `admin_url`, named after `prefix`, the test
/// process and `test`, and drops those that earlier test processes with this prefix left.
pub async fn fresh_database(admin_url: &str, prefix: &str, test: &str) -> String {
    let run_prefix = format!("mesh_{prefix}_{}_", std::process::id());
    let mut name = format!(
        "{run_prefix}{}_{}",
        test.chars()
            .filter(char::is_ascii_alphanumeric)
            .take(20)
            .collect::<String>(),
        uuid::Uuid::now_v7().simple()
    )
    .to_lowercase();
    // PostgreSQL keeps 63 bytes of a name: the URL must name the database as it is stored.
    name.truncate(63);
    let mut admin = sqlx::PgConnection::connect(admin_url)
        .await
        .expect("connect to the test PostgreSQL server");
    let stale: Vec<(String,)> = sqlx::query_as(
        "SELECT datname FROM pg_database WHERE datname LIKE $1 ESCAPE '!' AND datname NOT LIKE $2",
    )
    .bind(format!("mesh!_{prefix}!_%"))
    .bind(format!("{run_prefix}%"))
    .fetch_all(&mut admin)
    .await
    .unwrap_or_default();
    for (stale,) in stale {
        // A database still in use by another test process stays until a later run.
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {stale}"))
            .execute(&mut admin)
            .await;
    }
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create a test database");
    let (base, _) = admin_url
        .rsplit_once('/')
        .expect("URL with a database path");
    format!("{base}/{name}")
}
