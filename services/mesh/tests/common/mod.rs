//! The harness the end-to-end tests share: the real `mesh up` binary on free loopback ports.
// Each test binary uses its own part of the harness.
#![allow(dead_code, unreachable_pub)]

use std::{net::SocketAddr, process::Stdio, time::Duration};

use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
    sync::mpsc,
};

/// The three services: `mesh up`'s name for each and its gRPC service.
pub const SERVICES: [(&str, &str); 3] = [
    ("aggregator", "mesh.aggregator.v1.AggregatorService"),
    ("auth", "mesh.auth.v1.AuthService"),
    ("users", "mesh.users.v1.UserService"),
];

/// A running `mesh up` on free loopback ports.
pub struct MeshUp {
    pub child: Child,
    _data: tempfile::TempDir,
    pub addrs: Vec<(&'static str, &'static str, SocketAddr)>,
    pub stderr: mpsc::UnboundedReceiver<String>,
}

pub fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

impl MeshUp {
    /// Starts `mesh up` on free ports. A port picked here can be taken by another process
    /// before the child binds it; then `mesh up` fails at once and is started again on new
    /// ports (a few times at most).
    pub async fn start(grace: &str) -> Self {
        Self::start_with(grace, &[]).await
    }

    /// Starts `mesh up` with `env` added to its environment (and so its children's).
    pub async fn start_with(grace: &str, env: &[(&str, String)]) -> Self {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Self::try_start(grace, env).await {
                Ok(mesh) => return mesh,
                Err(output) if output.contains("Address already in use") => failures.push(output),
                Err(output) => panic!("mesh up ended before it was up:\n{output}"),
            }
        }
        panic!(
            "mesh up could not bind its ports three times:\n{}",
            failures.join("\n---\n")
        );
    }

    async fn try_start(grace: &str, env: &[(&str, String)]) -> Result<Self, String> {
        let addrs: Vec<_> = SERVICES
            .iter()
            .map(|(short, full)| (*short, *full, free_addr()))
            .collect();
        let data = tempfile::tempdir().expect("data dir");
        let mut command = Command::new(env!("CARGO_BIN_EXE_mesh"));
        command
            .arg("up")
            .arg("--grace-period")
            .arg(grace)
            .arg("--data-dir")
            .arg(data.path());
        for (short, _, addr) in &addrs {
            command
                .arg(format!("--{short}-listen"))
                .arg(addr.to_string());
        }
        command
            .env_remove("RUST_LOG")
            .env("MESH_LOG_FORMAT", "text");
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn mesh up");

        let (err_tx, mut stderr) = mpsc::unbounded_channel();
        let mut err_lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = err_lines.next_line().await {
                if std::env::var_os("TEST_LOG").is_some() {
                    eprintln!("{line}");
                }
                let _ = err_tx.send(line);
            }
        });
        let mut out_lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let banner = tokio::time::timeout(Duration::from_secs(60), async {
            let mut text = String::new();
            while let Ok(Some(line)) = out_lines.next_line().await {
                text.push_str(&line);
                text.push('\n');
                if line.contains("grpcurl -plaintext") && line.contains("Health/Check") {
                    return Some(text);
                }
            }
            None
        })
        .await
        .expect("mesh up reports it is up within 60 s");
        let Some(banner) = banner else {
            // Ended: collect what it said on stderr.
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
            let mut said = String::new();
            while let Ok(Some(line)) =
                tokio::time::timeout(Duration::from_secs(2), stderr.recv()).await
            {
                said.push_str(&line);
                said.push('\n');
            }
            return Err(said);
        };
        for (_, _, addr) in &addrs {
            assert!(
                banner.contains(&addr.to_string()),
                "banner names {addr}:\n{banner}"
            );
        }
        tokio::spawn(async move { while let Ok(Some(_)) = out_lines.next_line().await {} });
        Ok(Self {
            child,
            _data: data,
            addrs,
            stderr,
        })
    }

    pub fn addr(&self, short: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(s, _, _)| *s == short)
            .map(|(_, _, a)| *a)
            .expect("known service")
    }

    pub fn signal(&self, signal: Signal) {
        let pid = i32::try_from(self.child.id().expect("running")).expect("pid fits");
        nix::sys::signal::kill(Pid::from_raw(pid), signal).expect("signal mesh up");
    }

    /// Collects log lines until one contains `needle`.
    pub async fn wait_for_log(&mut self, needle: &str) -> String {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let line = self.stderr.recv().await.expect("log stream open");
                if line.contains(needle) {
                    return line;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no log line with `{needle}`"))
    }
}
