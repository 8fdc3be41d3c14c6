//! The real binaries as processes on loopback, for tests that need what only a process shows:
//! its own memory, its own signals, its own exit.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use mesh_runtime::testing::{connect, health_status};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::mesh::CLIENT_SECRET;

/// A free loopback address (the port may be taken by the time it is bound; rare).
pub fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

/// One service as its own process (`mesh <service> …`), killed when dropped.
#[derive(Debug)]
pub struct ServiceProcess {
    /// The process.
    pub child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// A channel to it.
    pub channel: Channel,
}

/// A figure of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`, …); 0 where there is none.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                let rest = line.strip_prefix(field)?.strip_prefix(':')?;
                rest.split_whitespace().next()?.parse().ok()
            })
        })
        .unwrap_or(0)
}

impl ServiceProcess {
    /// Starts `exe` with `args` (which must make it listen on `addr`) and waits until its own
    /// service name (`name`) reports SERVING.
    pub async fn start(exe: &Path, args: &[String], addr: SocketAddr, name: &str) -> Self {
        let mut command = Command::new(exe);
        command
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        if std::env::var_os("TEST_LOG").is_none() {
            command.stderr(Stdio::null());
        }
        let child = command.spawn().expect("spawn the mesh binary");
        let process = Self {
            child,
            addr,
            channel: connect(addr).await,
        };
        process.wait_for(name, ServingStatus::Serving).await;
        process
    }

    /// Waits (30 s at most) until `name` reports `want`.
    pub async fn wait_for(&self, name: &str, want: ServingStatus) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if health_status(&self.channel, name).await.ok() == Some(want as i32) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} at {} never reported {want:?}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Its resident memory now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS")
    }

    /// The most resident memory it has had, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM")
    }
}

/// `mesh auth`'s flags: listening on `addr`, state under `data`, the aggregator's service client
/// (with [`CLIENT_SECRET`]).
pub fn auth_args(addr: SocketAddr, data: &Path) -> Vec<String> {
    vec![
        "auth".into(),
        "--listen".into(),
        addr.to_string(),
        "--data-dir".into(),
        data.display().to_string(),
        "--service-client".into(),
        format!("aggregator=plain:{CLIENT_SECRET}"),
    ]
}

/// `mesh users`' flags: listening on `addr`, state under `data`, auth at `auth`.
pub fn users_args(addr: SocketAddr, data: &Path, auth: SocketAddr) -> Vec<String> {
    vec![
        "users".into(),
        "--listen".into(),
        addr.to_string(),
        "--data-dir".into(),
        data.display().to_string(),
        "--auth-url".into(),
        format!("http://{auth}"),
    ]
}

/// `mesh aggregator`'s flags: listening on `addr`, auth and users at theirs, its secret
/// [`CLIENT_SECRET`], dependency checks every 200 ms.
pub fn aggregator_args(addr: SocketAddr, auth: SocketAddr, users: SocketAddr) -> Vec<String> {
    vec![
        "aggregator".into(),
        "--listen".into(),
        addr.to_string(),
        "--auth-url".into(),
        format!("http://{auth}"),
        "--users-url".into(),
        format!("http://{users}"),
        "--client-secret".into(),
        CLIENT_SECRET.into(),
        "--dependency-check-interval".into(),
        "200ms".into(),
    ]
}

/// auth, users and the aggregator as three processes of `exe`, sharing a data folder.
#[derive(Debug)]
pub struct ProcessMesh {
    /// auth.
    pub auth: ServiceProcess,
    /// users.
    pub users: ServiceProcess,
    /// The aggregator.
    pub aggregator: ServiceProcess,
    /// The data folder.
    pub data: tempfile::TempDir,
    /// The binary, and the flags added to each service's: what a restart starts again.
    exe: PathBuf,
    extra: Vec<String>,
}

impl ProcessMesh {
    /// Starts the three, each with `extra` flags added, and waits until each is SERVING.
    pub async fn start(exe: &Path, extra: &[&str]) -> Self {
        let data = tempfile::tempdir().expect("data folder");
        let extra: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
        let (auth_addr, users_addr, aggregator_addr) = (free_addr(), free_addr(), free_addr());
        let with = |mut args: Vec<String>| {
            args.extend(extra.iter().cloned());
            args
        };
        let auth = ServiceProcess::start(
            exe,
            &with(auth_args(auth_addr, data.path())),
            auth_addr,
            mesh_proto::service_names::AUTH,
        )
        .await;
        let users = ServiceProcess::start(
            exe,
            &with(users_args(users_addr, data.path(), auth_addr)),
            users_addr,
            mesh_proto::service_names::USERS,
        )
        .await;
        let aggregator = ServiceProcess::start(
            exe,
            &with(aggregator_args(aggregator_addr, auth_addr, users_addr)),
            aggregator_addr,
            mesh_proto::service_names::AGGREGATOR,
        )
        .await;
        Self {
            auth,
            users,
            aggregator,
            data,
            exe: exe.to_owned(),
            extra,
        }
    }

    /// Kills users if it still runs, starts it again on the same address with the same flags
    /// and data folder (what it stored survives), and waits until it is SERVING.
    pub async fn restart_users(&mut self) {
        let _ = self.users.child.kill().await;
        let mut args = users_args(self.users.addr, self.data.path(), self.auth.addr);
        args.extend(self.extra.iter().cloned());
        self.users = ServiceProcess::start(
            &self.exe,
            &args,
            self.users.addr,
            mesh_proto::service_names::USERS,
        )
        .await;
    }

    /// Kills the aggregator if it still runs, starts it again on the same address with the
    /// same flags, and waits until it is SERVING.
    pub async fn restart_aggregator(&mut self) {
        let _ = self.aggregator.child.kill().await;
        let mut args = aggregator_args(self.aggregator.addr, self.auth.addr, self.users.addr);
        args.extend(self.extra.iter().cloned());
        self.aggregator = ServiceProcess::start(
            &self.exe,
            &args,
            self.aggregator.addr,
            mesh_proto::service_names::AGGREGATOR,
        )
        .await;
    }
}
