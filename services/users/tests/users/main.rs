//! The users service's integration tests, one binary: the server in-process on port 0 beside a
//! real auth (the test kit's [`TestMesh`]), through the generated clients, on SQLite and on
//! PostgreSQL; property tests of any request; and the store on both databases.
//!
//! Auth signs with a key the test also holds (the mesh's [`mesh_testkit::Minter`]), so tests
//! can mint tokens for any subject (many users, service tokens) and users verifies them against
//! auth's real `GetJwks`.

mod listing;
mod profiles;
mod properties;
mod service;
mod store;
mod tokens;
mod watch;

use std::time::Duration;

use mesh_proto::users::v1::{CreateUserRequest, User, UserEvent};
use mesh_testkit::{Database, TestMesh, bearer};
use tokio_stream::StreamExt as _;
use tonic::Streaming;

/// The PostgreSQL server's admin URL, for tests that only PostgreSQL can run (`None`, and a
/// loud skip, outside CI when none is named).
fn postgres_admin_url() -> Option<String> {
    mesh_testkit::databases()
        .into_iter()
        .find_map(|database| match database {
            Database::Postgres(admin_url) => Some(admin_url),
            Database::Sqlite => None,
        })
}

/// Auth and users on `database`.
async fn start(database: Database) -> TestMesh {
    start_with(database, |_| {}).await
}

/// Auth and users on `database`, with users' configuration changed by `tweak`.
async fn start_with(
    database: Database,
    tweak: impl FnOnce(&mut mesh_users::Config) + Send + 'static,
) -> TestMesh {
    TestMesh::builder()
        .users()
        .database(database)
        .users_config(|config| {
            // These tests change profiles in bulk; the per-profile write limit has a test of
            // its own.
            config.profile_writes_burst = u32::MAX;
            config.profile_writes_per_second = 1e9;
        })
        .users_config(tweak)
        .start()
        .await
}

/// A user of the mesh (not yet with a profile) and their token.
#[derive(Debug, Clone)]
struct Caller {
    id: String,
    email: String,
    token: String,
}

/// A new user (a fresh UUIDv7) and their token.
fn user(mesh: &TestMesh) -> Caller {
    user_with_id(mesh, &uuid::Uuid::now_v7().to_string())
}

/// The user `id` (e-mail `<id>@example.com`) and their token.
fn user_with_id(mesh: &TestMesh, id: &str) -> Caller {
    let email = format!("{id}@example.com");
    Caller {
        id: id.to_owned(),
        token: mesh.keys.user(id, &email),
        email,
    }
}

/// A service token (the aggregator's).
fn service_token(mesh: &TestMesh) -> String {
    mesh.keys.service("aggregator")
}

/// Creates `caller`'s profile named `name`.
async fn create(mesh: &TestMesh, caller: &Caller, name: &str) -> User {
    mesh.users_client()
        .create_user(bearer(
            &caller.token,
            CreateUserRequest {
                user: Some(User {
                    display_name: name.into(),
                    ..User::default()
                }),
                request_id: String::new(),
            },
        ))
        .await
        .expect("create")
        .into_inner()
}

fn profile(display_name: &str, bio: &str) -> Option<User> {
    Some(User {
        display_name: display_name.into(),
        bio: bio.into(),
        ..User::default()
    })
}

fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    })
}

/// The next `n` events of `stream` (20 s at most for each).
async fn take(stream: &mut Streaming<UserEvent>, n: usize) -> Vec<UserEvent> {
    let mut events = Vec::with_capacity(n);
    while events.len() < n {
        let event = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .unwrap_or_else(|_| panic!("timed out after {} of {n} events", events.len()))
            .expect("stream open")
            .expect("event");
        events.push(event);
    }
    events
}
