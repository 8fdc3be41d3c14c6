//! The harness the end-to-end tests share: the real `mesh up` binary on free loopback ports.

use std::{net::SocketAddr, process::Stdio, time::Duration};

use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
    sync::mpsc,
};

/// Tests that start the real binaries at once, at most: as many as the largest of the files
/// ran at once when each was a binary of its own, so their deadlines see the same machine.
pub(crate) static PROCESS_TESTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// A place among [`PROCESS_TESTS`], held for the whole test.
pub(crate) async fn process_test() -> tokio::sync::SemaphorePermit<'static> {
    PROCESS_TESTS
        .acquire()
        .await
        .expect("the semaphore is never closed")
}

/// The three services: `mesh up`'s name for each and its gRPC service.
pub(crate) const SERVICES: [(&str, &str); 3] = [
    ("aggregator", mesh_aggregator::SERVICE_NAME),
    ("auth", mesh_auth::SERVICE_NAME),
    ("users", mesh_users::SERVICE_NAME),
];

/// A running `mesh up` on free loopback ports.
pub(crate) struct MeshUp {
    pub(crate) child: Child,
    _data: tempfile::TempDir,
    pub(crate) addrs: Vec<(&'static str, &'static str, SocketAddr)>,
    pub(crate) stderr: mpsc::UnboundedReceiver<String>,
    /// What `mesh up` prints on standard output after its banner, line by line.
    pub(crate) stdout: mpsc::UnboundedReceiver<String>,
    /// What `mesh up` printed once the mesh was up.
    pub(crate) banner: String,
}

impl MeshUp {
    /// Starts `mesh up` on free ports. A port picked here can be taken by another process
    /// before the child binds it; then `mesh up` fails at once and is started again on new
    /// ports (a few times at most).
    pub(crate) async fn start(grace: &str) -> Self {
        Self::start_with(grace, &[]).await
    }

    /// Starts `mesh up` with `env` added to its environment (and so its children's).
    pub(crate) async fn start_with(grace: &str, env: &[(&str, String)]) -> Self {
        Self::start_args(grace, env, &[]).await
    }

    /// Starts `mesh up --tls`: development certificates in its data folder, mutual TLS
    /// between the services, TLS on the facade.
    pub(crate) async fn start_tls(grace: &str, env: &[(&str, String)]) -> Self {
        Self::start_args(grace, env, &["--tls"]).await
    }

    /// Starts `mesh up` with `env` added to its environment and `args` to its flags.
    pub(crate) async fn start_args(grace: &str, env: &[(&str, String)], args: &[&str]) -> Self {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Self::try_start(grace, env, args).await {
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

    async fn try_start(grace: &str, env: &[(&str, String)], args: &[&str]) -> Result<Self, String> {
        let addrs: Vec<_> = SERVICES
            .iter()
            .map(|(short, full)| (*short, *full, mesh_testkit::free_addr()))
            .collect();
        let data = tempfile::tempdir().expect("data dir");
        let mut command = Command::new(env!("CARGO_BIN_EXE_mesh"));
        command
            .arg("up")
            .arg("--grace-period")
            .arg(grace)
            .arg("--data-dir")
            .arg(data.path())
            // The console on a port of its own for each run (the banner names it).
            .args(["--console-listen", "127.0.0.1:0"])
            .args(args);
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
                if line.contains("grpcurl ") && line.contains("Health/Check") {
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
        let (out_tx, stdout) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = out_lines.next_line().await {
                let _ = out_tx.send(line);
            }
        });
        Ok(Self {
            child,
            _data: data,
            addrs,
            stderr,
            stdout,
            banner,
        })
    }

    /// The data folder `mesh up` was given.
    pub(crate) fn data_dir(&self) -> &std::path::Path {
        self._data.path()
    }

    /// The development certificates of `mesh up --tls`: `ca.pem`, and `<service>.pem` with
    /// `<service>-key.pem`.
    pub(crate) fn tls_dir(&self) -> std::path::PathBuf {
        self._data.path().join("tls")
    }

    /// The console's URL, as the banner gives it.
    pub(crate) fn console_url(&self) -> String {
        self.banner
            .lines()
            .find_map(|line| line.split_once("Open the console in a browser: "))
            .map(|(_, rest)| {
                rest.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
            .unwrap_or_else(|| panic!("the banner names the console:\n{}", self.banner))
    }

    pub(crate) fn addr(&self, short: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(s, _, _)| *s == short)
            .map(|(_, _, a)| *a)
            .expect("known service")
    }

    pub(crate) fn signal(&self, signal: Signal) {
        let pid = i32::try_from(self.child.id().expect("running")).expect("pid fits");
        nix::sys::signal::kill(Pid::from_raw(pid), signal).expect("signal mesh up");
    }

    /// Collects log lines until one contains `needle`.
    pub(crate) async fn wait_for_log(&mut self, needle: &str) -> String {
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
