//! The server as a whole: health and reflection, the database going away and coming back,
//! client-side balancing over several users servers.

use std::time::Duration;

use mesh_proto::users::v1::{
    CreateUserRequest, GetUserRequest, ListUsersRequest, user_service_client::UserServiceClient,
};
use mesh_testkit::{
    Database, assert_standard_server, bearer, connect, start_users, users_config, wait_for_health,
};
use sqlx::Connection as _;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::{create, profile, start, start_with, user};

/// Health (`""`, the service name, `liveness`) is SERVING after start, and reflection v1 and
/// v1alpha list and describe the users service, health and themselves.
#[tokio::test]
async fn health_and_reflection() {
    let mesh = start(Database::Sqlite).await;
    assert_standard_server(&mesh.users().channel, mesh_users::SERVICE_NAME).await;
    mesh.stop().await;
}

/// The database going away (PostgreSQL refusing the service's connections, and those it had
/// terminated): calls fail with UNAVAILABLE and no driver text, health turns NOT_SERVING, and
/// both recover when the database comes back — without a restart.
#[tokio::test]
async fn the_database_going_away_and_coming_back() {
    let Some(admin_url) = crate::postgres_admin_url() else {
        return;
    };
    // A prefix of its own: while the database refuses connections, a test creating a database
    // with a prefix this one starts with ("users", in this process or another) would take it
    // for a stale one and drop it.
    let url =
        mesh_store::testing::fresh_database(&admin_url, "usersoutage", "the_database_going_away")
            .await;
    let database = url
        .rsplit('/')
        .next()
        .and_then(|tail| tail.split('?').next())
        .expect("database name")
        .to_owned();
    // Auth on SQLite, users on this database (the one the test takes away).
    let mesh = start_with(Database::Sqlite, move |config| {
        config.database_url = Some(url.as_str().into());
    })
    .await;
    let alice = user(&mesh);
    create(&mesh, &alice, "Alice").await;
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("admin connection");
    let set_allowed =
        |allowed: bool| format!("ALTER DATABASE \"{database}\" WITH ALLOW_CONNECTIONS {allowed}");
    sqlx::query(&set_allowed(false))
        .execute(&mut admin)
        .await
        .expect("refuse connections");
    let (terminated,): (i64,) = sqlx::query_as(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1",
    )
    .bind(&database)
    .fetch_one(&mut admin)
    .await
    .expect("terminate connections");
    assert!(terminated > 0, "the service had connections to {database}");

    wait_for_health(
        mesh.users(),
        mesh_users::SERVICE_NAME,
        ServingStatus::NotServing,
    )
    .await;

    let status = mesh
        .users_client()
        .get_user(bearer(
            &alice.token,
            GetUserRequest {
                id: alice.id.clone(),
            },
        ))
        .await
        .expect_err("no database");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.message(),
        "storage unavailable; retry",
        "no driver text"
    );

    sqlx::query(&set_allowed(true))
        .execute(&mut admin)
        .await
        .expect("allow connections");
    wait_for_health(
        mesh.users(),
        mesh_users::SERVICE_NAME,
        ServingStatus::Serving,
    )
    .await;
    let back = mesh
        .users_client()
        .get_user(bearer(
            &alice.token,
            GetUserRequest {
                id: alice.id.clone(),
            },
        ))
        .await
        .expect("served again")
        .into_inner();
    assert_eq!(back.display_name, "Alice");
    mesh.stop().await;
}

/// Client-side balancing over real users servers: three on 127.0.0.1, .2 and .3, each with its
/// own database holding 1, 2 or 3 profiles (so ListUsers tells which one answered), behind one
/// name. Calls reach all three; when one stops and leaves the name, calls go on without a
/// failure and none reach it.
#[tokio::test]
async fn a_balanced_channel_spreads_over_users_servers() {
    let mesh = start(Database::Sqlite).await;
    let mut servers = vec![(mesh.users().addr, None)];
    for ip in [[127, 0, 0, 2], [127, 0, 0, 3]] {
        let data = tempfile::tempdir().expect("data");
        let mut config = users_config(data.path(), mesh.auth.addr);
        config.listen = (ip, 0).into();
        let server = start_users(config).await;
        servers.push((server.addr, Some((server, data))));
    }
    let reader = user(&mesh);
    for (k, (addr, _)) in servers.iter().enumerate() {
        let mut client = UserServiceClient::new(connect(*addr).await);
        for _ in 0..=k {
            let caller = user(&mesh);
            client
                .create_user(bearer(
                    &caller.token,
                    CreateUserRequest {
                        user: profile("P", ""),
                        request_id: String::new(),
                    },
                ))
                .await
                .expect("create");
        }
    }
    let resolved = std::sync::Arc::new(std::sync::Mutex::new(
        servers.iter().map(|(addr, _)| *addr).collect::<Vec<_>>(),
    ));
    let answers = resolved.clone();
    let resolve: mesh_runtime::client::Resolve = Box::new(move |_host, _port| {
        let addrs = answers.lock().expect("lock").clone();
        Box::pin(async move { Ok(addrs) })
    });
    let channel = mesh_runtime::client::balanced_channel_with(
        &"http://users-headless.mesh.svc.cluster.local:50053"
            .parse()
            .expect("uri"),
        &mesh_runtime::tls::ClientTls::default(),
        Duration::from_millis(100),
        resolve,
    )
    .expect("a plaintext channel");
    let client = UserServiceClient::new(channel);
    let answered_by = |n: usize| {
        let mut client = client.clone();
        let token = reader.token.clone();
        async move {
            let mut counts = [0usize; 4];
            for _ in 0..n {
                let page = client
                    .list_users(bearer(&token, ListUsersRequest::default()))
                    .await
                    .expect("list")
                    .into_inner();
                counts[page.users.len()] += 1;
            }
            counts
        }
    };
    let counts = answered_by(300).await;
    assert!(
        counts[1..].iter().all(|&n| n > 0),
        "every server answers: {counts:?}"
    );

    // The third goes away.
    let (_, third) = servers.pop().expect("server");
    resolved.lock().expect("lock").pop();
    if let Some((server, _data)) = third {
        server.shutdown().await.expect("stops");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counts = answered_by(200).await;
    assert_eq!(counts[3], 0, "the stopped server gets nothing: {counts:?}");
    assert!(counts[1] > 0 && counts[2] > 0, "{counts:?}");
    for (_, server) in servers {
        if let Some((server, _data)) = server {
            server.shutdown().await.expect("stops");
        }
    }
    mesh.stop().await;
}
