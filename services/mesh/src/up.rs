//! `mesh up`: all three services on one machine, each as its own child process.
//!
//! Each service runs as `mesh <service>` so that it has its own process, log stream and
//! lifecycle, as in a cluster; they talk over real gRPC on loopback. `mesh up` starts them,
//! waits until each reports `SERVING`, prints how to call them, and supervises them: SIGTERM or
//! Ctrl-C drains all three (each with its own grace period) and exits 0; if one dies, it says
//! which and why, stops the others and exits 1.

use std::{
    io,
    net::SocketAddr,
    process::{ExitStatus, Stdio},
    time::Duration,
};

use std::path::{Path, PathBuf};

use mesh_runtime::{
    ClientTlsConfig, ServerConfig,
    tls::{
        ClientTls,
        dev::{DevCa, DevFiles},
    },
};
use mesh_telemetry::LogFormat;
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    process::{Child, Command},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Set by `mesh up` on each service it starts: its own process id. A service that finds it
/// asks the kernel to send it SIGTERM when `mesh up` dies, however it dies (SIGKILL, a crash,
/// a closed terminal), so no service outlives its launcher holding ports and files.
pub(crate) const SUPERVISOR_ENV: &str = "MESH_SUPERVISOR_PID";

/// In a service started by `mesh up`: drain and exit when `mesh up` dies (Linux's
/// parent-death signal; the process that started us is `mesh up`'s main thread, which lives as
/// long as it does). If it is already gone, exits at once.
pub(crate) fn die_with_supervisor() {
    let Some(supervisor) = std::env::var(SUPERVISOR_ENV)
        .ok()
        .and_then(|pid| pid.parse::<i32>().ok())
    else {
        return;
    };
    #[cfg(target_os = "linux")]
    {
        if let Err(err) = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM) {
            tracing::warn!(error = %err, "cannot ask to be stopped with mesh up");
        }
        // It may have died between starting us and the call above.
        if nix::unistd::getppid().as_raw() != supervisor {
            tracing::error!("mesh up, which started this service, is gone: exiting");
            std::process::exit(1);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = supervisor;
}

/// Where `mesh up` serves the browser console.
const DEFAULT_CONSOLE_LISTEN: &str = "127.0.0.1:8080";

/// Flags of `mesh up`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct UpArgs {
    /// Address of the aggregator, the public facade.
    #[arg(long, env = "MESH_AGGREGATOR_LISTEN", default_value = mesh_aggregator::DEFAULT_LISTEN)]
    aggregator_listen: SocketAddr,

    /// Address of the auth service.
    #[arg(long, env = "MESH_AUTH_LISTEN", default_value = mesh_auth::DEFAULT_LISTEN)]
    auth_listen: SocketAddr,

    /// Address of the users service.
    #[arg(long, env = "MESH_USERS_LISTEN", default_value = mesh_users::DEFAULT_LISTEN)]
    users_listen: SocketAddr,

    /// Folder for the services' local state (auth's database and development signing key,
    /// users' database).
    #[arg(long, env = "MESH_DATA_DIR", default_value = ".mesh")]
    data_dir: std::path::PathBuf,

    /// How long each service may take to report SERVING before `mesh up` gives up.
    #[arg(long, env = "MESH_READY_TIMEOUT", default_value = "30s",
          value_parser = mesh_runtime::parse_duration)]
    ready_timeout: Duration,

    /// Serve TLS: make a development CA and a certificate per service in `<data-dir>/tls`
    /// (new each run), run auth and users with mutual TLS (each requires a certificate from
    /// that CA, and users and the aggregator present theirs) and the facade with TLS.
    #[arg(long, env = "MESH_UP_TLS")]
    tls: bool,

    /// Address of the browser console: a page that calls the aggregator over gRPC-Web (the
    /// aggregator allows this origin through CORS).
    #[arg(long, env = "MESH_CONSOLE_LISTEN", default_value = DEFAULT_CONSOLE_LISTEN)]
    console_listen: SocketAddr,

    /// Do not serve the browser console.
    #[arg(long, env = "MESH_UP_NO_CONSOLE")]
    no_console: bool,

    /// Receive the services' traces in `mesh up` itself: print each finished trace as a
    /// waterfall (one line per span, indented under its parent) and append it to
    /// `<data-dir>/traces.jsonl` as OTLP JSON. Overrides the traces endpoint of the
    /// `OTEL_*` variables; metrics and logs still go where those say.
    #[arg(long, env = "MESH_UP_TRACES")]
    traces: bool,

    /// Settings passed to every service.
    #[command(flatten)]
    server: ServerConfig,
}

/// The development certificates of one `mesh up --tls` run.
struct DevPki {
    ca: PathBuf,
    services: Vec<(&'static str, DevFiles)>,
}

impl DevPki {
    fn make(dir: &Path) -> Result<Self, UpError> {
        let ca = DevCa::new("mesh up development CA").map_err(UpError::Tls)?;
        let ca_path = dir.join("ca.pem");
        let mut services = Vec::new();
        for name in ["auth", "users", "aggregator"] {
            let pem = ca
                .issue(&[name, "localhost", "127.0.0.1", "::1"])
                .map_err(UpError::Tls)?;
            services.push((
                name,
                mesh_runtime::tls::dev::write(dir, name, &pem).map_err(UpError::Tls)?,
            ));
        }
        std::fs::write(&ca_path, ca.cert_pem()).map_err(|source| {
            UpError::Tls(mesh_runtime::tls::TlsError::Read {
                path: ca_path.clone(),
                source,
            })
        })?;
        Ok(Self {
            ca: ca_path,
            services,
        })
    }

    fn files(&self, name: &str) -> Option<&DevFiles> {
        self.services
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, files)| files)
    }

    /// What `mesh up` itself presents when it checks the services' health.
    fn client(&self) -> Result<ClientTls, UpError> {
        let own = self.files("aggregator");
        ClientTls::load(
            Some(&self.ca),
            own.map(|f| f.cert.as_path()),
            own.map(|f| f.key.as_path()),
        )
        .map_err(UpError::Tls)
    }
}

/// Why `mesh up` failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpError {
    /// The path of the running executable is unknown, so the services cannot be started.
    #[error("cannot find the mesh executable")]
    CurrentExe(#[source] io::Error),
    /// A setting that cannot be the same for all three services.
    #[error("{0}")]
    PerService(&'static str),
    /// The development certificates could not be made or read.
    #[error("TLS")]
    Tls(#[source] mesh_runtime::tls::TlsError),
    /// No random secret could be made for the aggregator's service identity.
    #[error("cannot make a service-client secret: {0}")]
    Secret(String),
    /// The trace receiver of `--traces` could not be started.
    #[error("cannot receive traces (--traces)")]
    Traces(#[source] io::Error),
    /// The console's address could not be bound.
    #[error(
        "cannot serve the console on {addr} (another program has it? --console-listen or --no-console)"
    )]
    Console {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A service could not be started.
    #[error("cannot start {name}")]
    Spawn {
        /// The service.
        name: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A service did not report SERVING in time.
    #[error("{name} did not report SERVING within {timeout:?}")]
    NotReady {
        /// The service.
        name: &'static str,
        /// The time it had.
        timeout: Duration,
    },
    /// A service exited on its own.
    #[error("{name} exited unexpectedly ({status})")]
    Died {
        /// The service.
        name: &'static str,
        /// Its exit status.
        status: ExitStatus,
    },
    /// A service did not exit cleanly after SIGTERM.
    #[error("{names} did not shut down cleanly")]
    UncleanShutdown {
        /// The services, comma-separated.
        names: String,
    },
    /// Waiting on a child failed.
    #[error("cannot wait for {name}")]
    Wait {
        /// The service.
        name: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// One supervised service process.
#[derive(Debug)]
struct Service {
    name: &'static str,
    addr: SocketAddr,
    child: Child,
}

/// Runs the three services until SIGTERM/SIGINT or until one of them dies.
pub(crate) async fn run(args: UpArgs, log_format: LogFormat) -> Result<(), UpError> {
    let exe = std::env::current_exe().map_err(UpError::CurrentExe)?;
    // Backends first, the facade last, as a cluster's readiness gates would order them.
    let plan = [
        ("auth", args.auth_listen),
        ("users", args.users_listen),
        ("aggregator", args.aggregator_listen),
    ];
    // Each service gets its own certificate and probe port, or none: one value for all three
    // cannot work.
    let server = &args.server;
    if server.tls_cert.is_some()
        || server.tls_key.is_some()
        || server.tls_client_ca.is_some()
        || server.health_listen.is_some()
    {
        return Err(UpError::PerService(
            "--tls-cert, --tls-key, --tls-client-ca and --health-listen (or their MESH_* \
             variables) are per service; mesh up makes certificates with --tls",
        ));
    }
    let secret = RunSecret::generate()?;
    let pki = if args.tls {
        Some(DevPki::make(&args.data_dir.join("tls"))?)
    } else {
        None
    };
    let checker = pki
        .as_ref()
        .map(DevPki::client)
        .transpose()?
        .unwrap_or_default();
    // The console's port is taken first: its origin is what the aggregator must allow.
    let console = if args.no_console {
        None
    } else {
        let listener = crate::console::bind(args.console_listen)
            .await
            .map_err(|source| UpError::Console {
                addr: args.console_listen,
                source,
            })?;
        let addr = listener.local_addr().unwrap_or(args.console_listen);
        Some((listener, format!("http://{addr}")))
    };
    // The page's origin as the browser names it: on loopback, `localhost` as well.
    let origins: Vec<String> = console
        .as_ref()
        .map(|(listener, origin)| {
            let mut origins = vec![origin.clone()];
            if let Ok(addr) = listener.local_addr()
                && addr.ip().is_loopback()
            {
                origins.push(format!("http://localhost:{}", addr.port()));
            }
            origins
        })
        .unwrap_or_default();
    let waterfall = if args.traces {
        if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            tracing::warn!("--traces with OTEL_SDK_DISABLED=true: the services export no traces");
        }
        Some(
            crate::traces::Waterfall::start(&args.data_dir)
                .await
                .map_err(UpError::Traces)?,
        )
    } else {
        None
    };
    let mut services = Vec::with_capacity(plan.len());
    for (name, addr) in plan {
        let launch = Launch {
            exe: &exe,
            args: &args,
            log_format,
            secret: &secret,
            pki: pki.as_ref(),
            cors_origins: &origins,
            traces: waterfall.as_ref().map(crate::traces::Waterfall::endpoint),
        };
        match spawn(&launch, name, addr) {
            Ok(service) => services.push(service),
            Err(err) => {
                let _ = stop_all(&mut services, &args.server).await;
                return Err(err);
            }
        }
    }

    let shutdown = mesh_runtime::shutdown_signal();
    tokio::pin!(shutdown);

    // Wait for every service to be ready, or for a signal, or for one to die.
    let ready = async {
        for service in services.iter_mut() {
            wait_ready(service, args.ready_timeout, &checker).await?;
        }
        Ok::<_, UpError>(())
    };
    let outcome = tokio::select! {
        result = ready => result.map(|()| true),
        () = &mut shutdown => Ok(false),
    };
    let scheme = if pki.is_some() { "https" } else { "http" };
    let serving_console = console.map(|(listener, origin)| {
        let task = tokio::spawn(crate::console::serve(
            listener,
            url_of(scheme, args.aggregator_listen),
        ));
        (AbortOnDrop(task), origin)
    });
    match outcome {
        Ok(true) => print_banner(
            &args,
            pki.as_ref(),
            serving_console.as_ref().map(|(_, origin)| origin.as_str()),
        ),
        Ok(false) => return stop_all(&mut services, &args.server).await,
        Err(err) => {
            let _ = stop_all(&mut services, &args.server).await;
            return Err(err);
        }
    }

    let died = tokio::select! {
        () = &mut shutdown => None,
        died = first_exit(&mut services) => Some(died),
    };
    match died {
        None => stop_all(&mut services, &args.server).await,
        Some((index, status)) => {
            let service = services.remove(index);
            let err = match status {
                Ok(status) => UpError::Died {
                    name: service.name,
                    status,
                },
                Err(source) => UpError::Wait {
                    name: service.name,
                    source,
                },
            };
            tracing::error!(error = %err, "stopping the other services");
            let _ = stop_all(&mut services, &args.server).await;
            Err(err)
        }
    }
}

/// The client id `mesh up` gives the aggregator at auth.
const AGGREGATOR_CLIENT_ID: &str = "aggregator";

/// A service-client secret for one run of `mesh up`, and the SHA-256 digest auth keeps.
struct RunSecret {
    secret: String,
    digest_hex: String,
}

impl RunSecret {
    fn generate() -> Result<Self, UpError> {
        use sha2::Digest as _;
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes).map_err(|e| UpError::Secret(e.to_string()))?;
        let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let digest_hex = sha2::Sha256::digest(secret.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Self { secret, digest_hex })
    }
}

/// What every service of one `mesh up` run is started with.
struct Launch<'a> {
    exe: &'a Path,
    args: &'a UpArgs,
    log_format: LogFormat,
    secret: &'a RunSecret,
    pki: Option<&'a DevPki>,
    /// The console's origins, which the aggregator allows.
    cors_origins: &'a [String],
    /// Where traces go (`--traces`): the launcher's own OTLP/gRPC receiver.
    traces: Option<&'a str>,
}

fn spawn(launch: &Launch<'_>, name: &'static str, addr: SocketAddr) -> Result<Service, UpError> {
    let &Launch {
        exe,
        args,
        log_format,
        secret,
        pki,
        cors_origins,
        traces,
    } = launch;
    let mut server = args.server.clone();
    let mut client = ClientTlsConfig::default();
    if let Some(files) = pki.and_then(|pki| pki.files(name)) {
        server.tls_cert = Some(files.cert.clone());
        server.tls_key = Some(files.key.clone());
        // The facade takes clients without certificates; auth and users only the mesh's.
        server.tls_client_ca = (name != "aggregator")
            .then(|| pki.map(|p| p.ca.clone()))
            .flatten();
        if name != "auth" {
            client = ClientTlsConfig {
                tls_ca: pki.map(|p| p.ca.clone()),
                tls_client_cert: Some(files.cert.clone()),
                tls_client_key: Some(files.key.clone()),
            };
        }
    }
    let scheme = if pki.is_some() { "https" } else { "http" };
    let mut command = Command::new(exe);
    command
        .arg(name)
        .arg("--listen")
        .arg(addr.to_string())
        // Every shared server setting, as `mesh up` was given it.
        .args(server.to_args())
        .args(client.to_args())
        .arg("--log-format")
        .arg(log_format.to_string())
        .env(SUPERVISOR_ENV, std::process::id().to_string())
        // What mesh up sets for each service, or leaves unset, is not inherited.
        .env_remove("MESH_TLS_CA")
        .env_remove("MESH_TLS_CLIENT_CERT")
        .env_remove("MESH_TLS_CLIENT_KEY")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if matches!(name, "auth" | "users") {
        command.arg("--data-dir").arg(&args.data_dir);
    }
    if matches!(name, "users" | "aggregator") {
        command
            .arg("--auth-url")
            .arg(url_of(scheme, args.auth_listen));
    }
    if name == "aggregator" {
        command
            .arg("--users-url")
            .arg(url_of(scheme, args.users_listen));
        for origin in cors_origins {
            command.arg("--cors-origin").arg(origin);
        }
    }
    // The aggregator's service identity, made up for this run and passed in the environment
    // (command lines are visible to every local user): auth gets the secret's digest only.
    match name {
        "auth" => {
            command.env(
                "MESH_AUTH_SERVICE_CLIENTS",
                format!("{AGGREGATOR_CLIENT_ID}=sha256:{}", secret.digest_hex),
            );
        }
        "aggregator" => {
            command
                .env("MESH_AGGREGATOR_CLIENT_ID", AGGREGATOR_CLIENT_ID)
                .env("MESH_AGGREGATOR_CLIENT_SECRET", &secret.secret);
        }
        _ => {}
    }
    if let Some(endpoint) = traces {
        command
            .env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
            .env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
            .env("OTEL_TRACES_EXPORTER", "otlp");
        // A waterfall soon after the call, unless the environment says otherwise.
        if std::env::var_os("OTEL_BSP_SCHEDULE_DELAY").is_none() {
            command.env("OTEL_BSP_SCHEDULE_DELAY", "200");
        }
    }
    // Text logs get the service's name in front of every line; JSON lines stay valid JSON.
    if log_format == LogFormat::Text {
        command.stderr(Stdio::piped());
    }
    let mut child = command
        .spawn()
        .map_err(|source| UpError::Spawn { name, source })?;
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(prefix_lines(name, stderr));
    }
    tracing::info!(service = name, %addr, pid = child.id(), "started");
    Ok(Service { name, addr, child })
}

/// The URL that reaches a service listening on `addr` from this machine.
fn url_of(scheme: &str, addr: SocketAddr) -> String {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    format!("{scheme}://{addr}")
}

async fn prefix_lines(name: &'static str, stderr: tokio::process::ChildStderr) {
    let mut lines = BufReader::new(stderr).lines();
    let mut out = tokio::io::stderr();
    while let Ok(Some(line)) = lines.next_line().await {
        let _ = out
            .write_all(format!("{name:>10} | {line}\n").as_bytes())
            .await;
    }
}

/// Polls the service's health until it says SERVING, failing if it exits or takes too long.
async fn wait_ready(
    service: &mut Service,
    timeout: Duration,
    tls: &ClientTls,
) -> Result<(), UpError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let scheme = if tls.has_ca() { "https" } else { "http" };
    let endpoint = url_of(scheme, service.addr);
    loop {
        if let Ok(Some(status)) = service.child.try_wait() {
            return Err(UpError::Died {
                name: service.name,
                status,
            });
        }
        if check_serving(&endpoint, tls).await {
            tracing::info!(service = service.name, "serving");
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(UpError::NotReady {
                name: service.name,
                timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn check_serving(endpoint: &str, tls: &ClientTls) -> bool {
    let Ok(uri) = endpoint.parse() else {
        return false;
    };
    let Ok(endpoint) = mesh_runtime::client::endpoint(uri, tls) else {
        return false;
    };
    let Ok(channel) = endpoint
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(1))
        .connect()
        .await
    else {
        return false;
    };
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    matches!(reply, Ok(r) if r.get_ref().status == ServingStatus::Serving as i32)
}

/// Completes when the first service exits, with its index and status.
async fn first_exit(services: &mut [Service]) -> (usize, io::Result<ExitStatus>) {
    let waits = services
        .iter_mut()
        .map(|s| Box::pin(s.child.wait()))
        .collect::<Vec<_>>();
    let (status, index, _) = futures_util::future::select_all(waits).await;
    (index, status)
}

/// Sends SIGTERM to every service and waits for all of them; one that outlives its grace
/// period (plus a margin) is killed.
async fn stop_all(services: &mut [Service], server: &ServerConfig) -> Result<(), UpError> {
    for service in services.iter() {
        if let Some(pid) = service.child.id().and_then(|id| i32::try_from(id).ok()) {
            // An already-exited child is fine: it is reaped below.
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
    let limit = server.grace_period + Duration::from_secs(5);
    let mut unclean = Vec::new();
    for service in services.iter_mut() {
        let status = match tokio::time::timeout(limit, service.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                tracing::warn!(
                    service = service.name,
                    "still running after the grace period; killing"
                );
                let _ = service.child.kill().await;
                service.child.wait().await
            }
        };
        match status {
            Ok(status) if status.success() => {
                tracing::info!(service = service.name, "stopped");
            }
            Ok(status) => {
                tracing::error!(service = service.name, %status, "stopped uncleanly");
                unclean.push(service.name);
            }
            Err(err) => {
                tracing::error!(service = service.name, error = %err, "cannot wait for it");
                unclean.push(service.name);
            }
        }
    }
    if unclean.is_empty() {
        Ok(())
    } else {
        Err(UpError::UncleanShutdown {
            names: unclean.join(", "),
        })
    }
}

/// Aborts the console's task when `mesh up` returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn print_banner(args: &UpArgs, pki: Option<&DevPki>, console: Option<&str>) {
    let agg = args.aggregator_listen;
    let traces = if args.traces {
        format!(
            "\nTraces: each finished trace is printed here as a waterfall and appended to {} \
             (OTLP JSON, one trace per line)\n",
            args.data_dir.join("traces.jsonl").display()
        )
    } else {
        String::new()
    };
    let (how, call) = match pki {
        None => ("plaintext".to_owned(), "-plaintext".to_owned()),
        Some(pki) => (
            format!(
                "TLS, verified with the development CA {}; auth and users take only clients with \
                 a certificate from it, e.g. -cert {} -key {}",
                pki.ca.display(),
                pki.files("aggregator")
                    .map_or_else(String::new, |f| f.cert.display().to_string()),
                pki.files("aggregator")
                    .map_or_else(String::new, |f| f.key.display().to_string()),
            ),
            format!("-cacert {}", pki.ca.display()),
        ),
    };
    let console = match console {
        None => String::new(),
        Some(console) if pki.is_some() => format!(
            "\nOpen the console in a browser: {console}/ (it calls the aggregator over TLS: the \
             browser must trust the development CA)\n"
        ),
        Some(console) => format!("\nOpen the console in a browser: {console}/\n"),
    };
    println!(
        "\nThe mesh is up.\n\
         \n  aggregator  {agg}  (the public facade)\
         \n  auth        {}\
         \n  users       {}\n\
         {console}{traces}\
         \nCall it with grpcurl ({how}; reflection and health on every port):\
         \n  grpcurl {call} {agg} list\
         \n  grpcurl {call} {agg} describe mesh.aggregator.v1.AggregatorService\
         \n  grpcurl {call} -d '{{\"email\":\"ada@example.com\",\"password\":\"correct horse battery\",\"display_name\":\"Ada\"}}' {agg} mesh.aggregator.v1.AggregatorService/SignUp\
         \n  grpcurl {call} -H \"authorization: Bearer $TOKEN\" -d '{{}}' {agg} mesh.aggregator.v1.AggregatorService/GetMe\
         \n  grpcurl {call} -d '{{\"service\":\"mesh.aggregator.v1.AggregatorService\"}}' {agg} grpc.health.v1.Health/Check\n\
         \nCtrl-C or SIGTERM drains and stops all three.\n",
        args.auth_listen, args.users_listen
    );
}
