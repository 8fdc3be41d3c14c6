//! Compiles `proto/mesh/**.proto` with the pure-Rust `protox` compiler (no system `protoc`),
//! writes the encoded descriptor set for server reflection, and generates messages, clients and
//! servers with tonic's code generator.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

const FILES: &[&str] = &[
    "mesh/auth/v1/auth.proto",
    "mesh/users/v1/users.proto",
    "mesh/aggregator/v1/aggregator.proto",
];

/// `mesh bench`'s bare echo: built apart, with tonic's own codec, as the baseline.
const BENCH_FILES: &[&str] = &["mesh/bench/v1/echo.proto"];

/// Server methods whose answers are encoded once and shared by many streams: the generated
/// server takes `mesh_proto::codec::Encoded` of the response message from them. On the wire
/// and in the clients nothing changes.
const SHARED_RESPONSES: &[(&str, &str)] =
    &[("mesh.aggregator.v1.AggregatorService", "WatchProfiles")];

/// tonic's generator, with the servers of [`SHARED_RESPONSES`] answering `Encoded` messages.
struct SharedResponses {
    clients: Box<dyn prost_build::ServiceGenerator>,
    servers: Box<dyn prost_build::ServiceGenerator>,
}

impl prost_build::ServiceGenerator for SharedResponses {
    fn generate(&mut self, service: prost_build::Service, buf: &mut String) {
        self.clients.generate(service.clone(), buf);
        let mut service = service;
        let name = format!("{}.{}", service.package, service.proto_name);
        for method in &mut service.methods {
            if SHARED_RESPONSES.contains(&(name.as_str(), method.proto_name.as_str())) {
                // A message of the service's own package: its Rust name is a plain identifier.
                assert!(
                    !method.output_type.contains(':'),
                    "{name}.{}: a shared response must be a message of the same package",
                    method.proto_name
                );
                method.output_type =
                    format!("crate::codec::Encoded<super::{}>", method.output_type);
            }
        }
        self.servers.generate(service, buf);
    }

    fn finalize(&mut self, buf: &mut String) {
        self.clients.finalize(buf);
        self.servers.finalize(buf);
    }

    fn finalize_package(&mut self, package: &str, buf: &mut String) {
        self.clients.finalize_package(package, buf);
        self.servers.finalize_package(package, buf);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto").canonicalize()?;
    println!("cargo:rerun-if-changed={}", proto_root.display());

    let fds = protox::compile(FILES, [&proto_root])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("mesh_descriptor.bin"), fds.encode_to_vec())?;

    // One descriptor set per package as well (its file and the well-known types it imports), so
    // that each server's reflection describes its own contract and nothing else.
    for file in FILES {
        let package: Vec<_> = fds
            .file
            .iter()
            .filter(|f| f.name() == *file || !f.name().starts_with("mesh/"))
            .cloned()
            .collect();
        let stem = file.split('/').nth(1).ok_or("unexpected proto path")?;
        let set = prost_types::FileDescriptorSet { file: package };
        fs::write(
            out_dir.join(format!("{stem}_descriptor.bin")),
            set.encode_to_vec(),
        )?;
    }

    // Small starting buffers: what an idle long-lived stream costs (see `codec.rs`).
    let tonic = || tonic_prost_build::configure().codec_path("crate::codec::MeshCodec");
    let mut config = prost_build::Config::new();
    config.service_generator(Box::new(SharedResponses {
        clients: tonic().build_server(false).service_generator(),
        servers: tonic().build_client(false).service_generator(),
    }));
    config.compile_fds(fds)?;

    let bench = protox::compile(BENCH_FILES, [&proto_root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .compile_fds(bench)?;

    Ok(())
}
