//! Scenario `login`: an auth server on loopback (SQLite in a temporary folder) driven by
//! concurrent `Login` callers; in the same run, the raw Argon2id verification rate of the
//! machine on every core (the ceiling for logins), the latency of health checks during the
//! login storm against idle, and the throughput of `ValidateToken`.

use std::sync::Arc;

use mesh_proto::auth::v1::{
    LoginRequest, RegisterRequest, ValidateTokenRequest, auth_service_client::AuthServiceClient,
};
use tokio::sync::oneshot;

use super::{
    BenchError, Outcome, Settings, channels,
    fixtures::{channels_one, setup, start_auth, stop as stop_server},
    measure::{Measurement, drive},
    probe_health,
    report::Figure,
};

const PASSWORD: &str = "benchmark password";

/// The account of login caller `i`: one per caller, because auth refuses an account's login
/// while as many checks of it are under way as its failure limit (so that concurrent guesses
/// cannot race past the limit), and one account for every caller hit that limit at once.
fn email(i: usize) -> String {
    format!("bench-{i}@example.com")
}

pub(super) async fn login(settings: &Settings) -> Result<Outcome, BenchError> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);

    // 1. The ceiling: raw Argon2id verifications on every core, nothing else running.
    let duration = settings.duration;
    let raw_rate = tokio::task::spawn_blocking(move || raw_verify_rate(cores, duration))
        .await
        .map_err(setup)?;

    // 2. An auth server on loopback, an account per caller.
    let data = std::env::temp_dir().join(format!("mesh-bench-login-{}", std::process::id()));
    let auth = start_auth(&data, None).await?;
    let channels = Arc::new(channels(auth.addr, settings.connections).await?);
    // One more account whose token `ValidateToken` checks: no login of the storm ends its
    // session (an account keeps at most `MAX_SESSIONS_PER_ACCOUNT` live sessions, the oldest
    // ended first).
    let callers = settings.concurrency;
    let mut access_token = String::new();
    for i in (0..callers).rev().chain([callers]) {
        access_token = AuthServiceClient::new(channels[0].clone())
            .register(RegisterRequest {
                email: email(i),
                password: PASSWORD.into(),
            })
            .await
            .map_err(|e| setup(format!("register: {e}")))?
            .into_inner()
            .tokens
            .map(|t| t.access_token)
            .ok_or_else(|| setup("no tokens"))?;
    }

    // 3. Health latency while idle, on a connection of its own, for as long as the storm is
    // probed: as many probes on each side, so neither p99 is one slow probe of a hundred.
    let health_channel = channels_one(auth.addr).await?;
    let (stop, stopped) = oneshot::channel();
    let idle_probe = tokio::spawn(probe_health(health_channel.clone(), stopped));
    tokio::time::sleep(settings.warmup + settings.duration).await;
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
                        email: email(worker % callers),
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

    // 5. ValidateToken of one token again and again: its claims' times and a session lookup
    // (auth checks a token's signature once, then answers it from its verified-token cache).
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
    stop_server(auth).await;
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

/// Measures the raw Argon2id verification rate (verifications per second) of this machine at
/// the service's parameters, with `threads` threads for `duration`: the ceiling the login
/// throughput of `mesh bench login` is compared with. Blocks the calling thread.
fn raw_verify_rate(threads: usize, duration: std::time::Duration) -> f64 {
    use argon2::{
        Algorithm, Argon2, PasswordHash, PasswordHasher as _, PasswordVerifier as _, Version,
    };
    let argon2 = Argon2::new(
        Algorithm::Argon2id,
        Version::V0x13,
        mesh_auth::argon2_params(),
    );
    let phc = match argon2::password_hash::SaltString::encode_b64(b"benchmark-salt!!") {
        Ok(salt) => argon2
            .hash_password(b"benchmark password", &salt)
            .map(|h| h.to_string())
            .unwrap_or_default(),
        Err(_) => String::new(),
    };
    let start = std::time::Instant::now();
    let counts: Vec<u64> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                let (argon2, phc) = (argon2.clone(), phc.as_str());
                scope.spawn(move || {
                    let mut n = 0u64;
                    while start.elapsed() < duration {
                        if let Ok(parsed) = PasswordHash::new(phc) {
                            let _ = argon2.verify_password(b"benchmark password", &parsed);
                        }
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0)).collect()
    });
    counts.iter().sum::<u64>() as f64 / start.elapsed().as_secs_f64()
}
