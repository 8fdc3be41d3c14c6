//! Scenario `login`: an auth server on loopback (SQLite in a temporary folder) driven by
//! concurrent `Login` callers; in the same run, the raw Argon2id verification rate of the
//! machine on every core (the ceiling for logins), the latency of health checks during the
//! login storm against idle, and the throughput of `ValidateToken`.

use std::{sync::Arc, time::Duration};

use mesh_proto::auth::v1::{
    LoginRequest, RegisterRequest, ValidateTokenRequest, auth_service_client::AuthServiceClient,
};
use tokio::sync::oneshot;

use super::{
    BenchError, Outcome, Settings, channels,
    fixtures::{channels_one, setup, start_auth},
    measure::{Measurement, drive},
    probe_health,
    report::Figure,
};

const PASSWORD: &str = "benchmark password";
const EMAIL: &str = "bench@example.com";

pub(super) async fn login(settings: &Settings) -> Result<Outcome, BenchError> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);

    // 1. The ceiling: raw Argon2id verifications on every core, nothing else running.
    let duration = settings.duration;
    let raw_rate = tokio::task::spawn_blocking(move || mesh_auth::raw_verify_rate(cores, duration))
        .await
        .map_err(setup)?;

    // 2. An auth server on loopback, one account.
    let data = std::env::temp_dir().join(format!("mesh-bench-login-{}", std::process::id()));
    let auth = start_auth(&data, Vec::new()).await?;
    let channels = Arc::new(channels(auth.addr, settings.connections).await?);
    let access_token = AuthServiceClient::new(channels[0].clone())
        .register(RegisterRequest {
            email: EMAIL.into(),
            password: PASSWORD.into(),
        })
        .await
        .map_err(|e| setup(format!("register: {e}")))?
        .into_inner()
        .tokens
        .map(|t| t.access_token)
        .ok_or_else(|| setup("no tokens"))?;

    // 3. Health latency while idle, on a connection of its own.
    let health_channel = channels_one(auth.addr).await?;
    let (stop, stopped) = oneshot::channel();
    let idle_probe = tokio::spawn(probe_health(health_channel.clone(), stopped));
    tokio::time::sleep(Duration::from_secs(2).min(settings.duration)).await;
    let _ = stop.send(());
    let (idle, idle_for) = idle_probe.await.map_err(setup)?;

    // 4. The login storm, with health probed throughout.
    let login_call = {
        let channels = channels.clone();
        move |worker: usize| {
            let mut client = AuthServiceClient::new(channels[worker % channels.len()].clone());
            async move {
                client
                    .login(LoginRequest {
                        email: EMAIL.into(),
                        password: PASSWORD.into(),
                    })
                    .await
                    .is_ok()
            }
        }
    };
    let (stop, stopped) = oneshot::channel();
    let storm_probe = tokio::spawn(probe_health(health_channel, stopped));
    let logins = drive(
        settings.concurrency,
        settings.warmup,
        settings.duration,
        login_call,
    )
    .await;
    let _ = stop.send(());
    let (storm, storm_for) = storm_probe.await.map_err(setup)?;

    // 5. ValidateToken (signature, claims and a session lookup).
    let validate_call = {
        let channels = channels.clone();
        move |worker: usize| {
            let mut client = AuthServiceClient::new(channels[worker % channels.len()].clone());
            let request = ValidateTokenRequest {
                access_token: access_token.clone(),
            };
            async move { client.validate_token(request).await.is_ok() }
        }
    };
    let validations = drive(
        settings.concurrency,
        settings.warmup,
        settings.duration,
        validate_call,
    )
    .await;
    auth.stop().await;
    let _ = std::fs::remove_dir_all(&data);

    let logins = logins.measurement("Login (Argon2id, SQLite)");
    let idle = Measurement::new("health check, idle (1 every 20 ms)", &idle, 0, idle_for);
    let storm = Measurement::new("health check, during the login storm", &storm, 0, storm_for);
    let figures = vec![
        Figure::new("raw Argon2id verifications per second", raw_rate, "/s"),
        Figure::at_least(
            "Login rate / raw Argon2id rate",
            logins.per_second / raw_rate.max(f64::MIN_POSITIVE),
            "ratio",
            0.9,
        ),
        Figure::at_most(
            "health p99 during the storm / idle",
            storm.latency_ms.p99 / idle.latency_ms.p99.max(0.001),
            "ratio",
            2.0,
        ),
    ];
    Ok(Outcome {
        measurements: vec![
            logins,
            idle,
            storm,
            validations.measurement("ValidateToken"),
        ],
        figures,
        notes: vec![format!(
            "The raw rate is Argon2id verification of the same hash on {cores} threads with \
             nothing else running; Login adds the gRPC call, the store and token signing."
        )],
    })
}
