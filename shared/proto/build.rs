//! Compiles `proto/mesh/**.proto` (and the OTLP subset in `otlp/`) with the pure-Rust `protox` compiler (no system `protoc`),
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

const OTLP_FILES: &[&str] = &[
    "opentelemetry/proto/collector/trace/v1/trace_service.proto",
    "opentelemetry/proto/collector/metrics/v1/metrics_service.proto",
];

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

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        // Small starting buffers: what an idle long-lived stream costs (see `codec.rs`).
        .codec_path("crate::codec::MeshCodec")
        .compile_fds(fds)?;

    let bench = protox::compile(BENCH_FILES, [&proto_root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .compile_fds(bench)?;

    // The OTLP subset the telemetry exporter sends (and test collectors receive). Kept apart:
    // it is not a mesh contract, is not served by reflection and is not linted as one.
    let otlp_root = manifest_dir.join("otlp").canonicalize()?;
    println!("cargo:rerun-if-changed={}", otlp_root.display());
    let otlp = protox::compile(OTLP_FILES, [&otlp_root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .compile_fds(otlp)?;
    Ok(())
}
