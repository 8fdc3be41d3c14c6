//! [`TestPki`]: a certificate authority made for one test (or one benchmark run) and the
//! certificates it writes, on [`mesh_runtime::tls::dev`]; and the TLS counterparts of the
//! plaintext helpers: [`https`], [`tls_channel`], [`wait_for_health_tls`] and
//! [`start_aggregator_tls`].

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use mesh_runtime::{
    ClientTlsConfig, ServerConfig,
    testing::{TestServer, health_status},
    tls::{
        ClientTls,
        dev::{self, DevCa, DevFiles, Pem},
    },
};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

/// The names of the leaves [`TestPki::leaf`] issues: what a client dialling a loopback server
/// checks.
const LOOPBACK: [&str; 2] = ["localhost", "127.0.0.1"];

/// A test's certificate authority and the files it writes into its folder: the CA's
/// certificate, a server leaf that [`TestPki::serve`] serves and a client leaf that
/// [`TestPki::client_config`] and [`TestPki::mesh_client`] present; more leaves (expired ones,
/// ones for other names) on demand.
#[derive(Debug)]
pub struct TestPki {
    dir: PathBuf,
    ca: DevCa,
    /// The CA's certificate (PEM, `<dir>/<name>.pem`): what clients trust and what mutual
    /// servers check client certificates against.
    pub ca_path: PathBuf,
    /// A leaf for `localhost` and `127.0.0.1` (`<dir>/server.pem`), served by
    /// [`TestPki::serve`].
    pub server_leaf: DevFiles,
    /// A leaf for `mesh-client` (`<dir>/client.pem`), presented by the clients of
    /// [`TestPki::client_config`] and [`TestPki::mesh_client`].
    pub client_leaf: DevFiles,
}

impl TestPki {
    /// A new CA named `name`, its certificate written as `<dir>/<name>.pem`, with a server
    /// and a client leaf beside it.
    pub fn new(dir: &Path, name: &str) -> Self {
        let ca = DevCa::new(name).expect("CA");
        let ca_path = dir.join(format!("{name}.pem"));
        std::fs::create_dir_all(dir).expect("folder");
        std::fs::write(&ca_path, ca.cert_pem()).expect("write CA");
        let write = |file: &str, names: &[&str]| {
            dev::write(dir, file, &ca.issue(names).expect("leaf")).expect("write leaf")
        };
        let server_leaf = write("server", &LOOPBACK);
        let client_leaf = write("client", &["mesh-client"]);
        Self {
            dir: dir.to_owned(),
            ca,
            ca_path,
            server_leaf,
            client_leaf,
        }
    }

    /// A new leaf for `localhost` and `127.0.0.1`, not written anywhere.
    pub fn leaf_pem(&self) -> Pem {
        self.leaf_pem_named(&LOOPBACK)
    }

    /// A new leaf for exactly `names`, not written anywhere.
    pub fn leaf_pem_named(&self, names: &[&str]) -> Pem {
        self.ca.issue(names).expect("leaf")
    }

    /// A new leaf for `localhost` and `127.0.0.1`, written as `<dir>/<file>.pem` (and its
    /// key beside it).
    pub fn leaf(&self, file: &str) -> DevFiles {
        self.leaf_named(file, &LOOPBACK)
    }

    /// A new leaf for exactly `names`, written as `<dir>/<file>.pem`.
    pub fn leaf_named(&self, file: &str, names: &[&str]) -> DevFiles {
        dev::write(&self.dir, file, &self.leaf_pem_named(names)).expect("write leaf")
    }

    /// A leaf for `localhost` and `127.0.0.1` that expired yesterday (valid for the nine days
    /// before), written as `<dir>/<file>.pem`.
    pub fn expired(&self, file: &str) -> DevFiles {
        let day = Duration::from_secs(86_400);
        let now = SystemTime::now();
        let pem = self
            .ca
            .issue_valid(&LOOPBACK, now - 10 * day, now - day)
            .expect("expired leaf");
        dev::write(&self.dir, file, &pem).expect("write leaf")
    }

    /// `server` serving TLS with the server leaf; when `mutual`, requiring client
    /// certificates from this CA.
    pub fn serve(&self, server: &mut ServerConfig, mutual: bool) {
        serve_tls(
            server,
            &self.server_leaf,
            mutual.then_some(self.ca_path.as_path()),
        );
    }

    /// A calling service's TLS settings: trusting this CA, presenting the client leaf.
    pub fn client_config(&self) -> ClientTlsConfig {
        self.client_config_as(&self.client_leaf)
    }

    /// A calling service's TLS settings: trusting this CA, presenting `identity`.
    pub fn client_config_as(&self, identity: &DevFiles) -> ClientTlsConfig {
        ClientTlsConfig {
            tls_ca: Some(self.ca_path.clone()),
            tls_client_cert: Some(identity.cert.clone()),
            tls_client_key: Some(identity.key.clone()),
        }
    }

    /// A client trusting this CA, presenting `identity` (none: no client certificate).
    pub fn client(&self, identity: Option<&DevFiles>) -> ClientTls {
        ClientTls::load(
            Some(&self.ca_path),
            identity.map(|f| f.cert.as_path()),
            identity.map(|f| f.key.as_path()),
        )
        .expect("client TLS")
    }

    /// A client trusting this CA, presenting the client leaf: one a mutual server takes.
    pub fn mesh_client(&self) -> ClientTls {
        self.client(Some(&self.client_leaf))
    }
}

/// `server` serving TLS with `files`; requiring client certificates from the CA at
/// `client_ca` when given.
pub fn serve_tls(server: &mut ServerConfig, files: &DevFiles, client_ca: Option<&Path>) {
    server.tls_cert = Some(files.cert.clone());
    server.tls_key = Some(files.key.clone());
    server.tls_client_ca = client_ca.map(Path::to_owned);
}

/// `https://addr`.
pub fn https(addr: SocketAddr) -> http::Uri {
    format!("https://{addr}").parse().expect("URL")
}

/// A channel to `https://addr` with `tls` (connected lazily; each call times out after 5 s).
pub fn tls_channel(addr: SocketAddr, tls: &ClientTls) -> Channel {
    mesh_runtime::client::endpoint(https(addr), tls)
        .expect("endpoint")
        .timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// Waits (at most 20 s) until a fresh TLS connection with `tls` finds `name` (`""`: the
/// server as a whole) SERVING at `addr`.
pub async fn wait_for_health_tls(addr: SocketAddr, tls: &ClientTls, name: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = health_status(&tls_channel(addr, tls), name).await;
        if status.as_ref().ok() == Some(&(ServingStatus::Serving as i32)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name:?} at {addr} not serving over TLS: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts the aggregator with `config` (which serves TLS) and waits until it reports SERVING
/// to a client with `tls`.
pub async fn start_aggregator_tls(config: mesh_aggregator::Config, tls: &ClientTls) -> TestServer {
    let server = crate::mesh::spawn_aggregator(config).await;
    wait_for_health_tls(server.addr, tls, mesh_aggregator::SERVICE_NAME).await;
    server
}
