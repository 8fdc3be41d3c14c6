//! The process's metrics, through the OpenTelemetry SDK's meter provider: RPC call durations
//! (recorded by the layers in [`crate::rpc`]) and gauges the services register ([`gauge`]).
//!
//! - `rpc.server.call.duration` and `rpc.client.call.duration`: histograms in seconds, by
//!   `rpc.system.name` (`grpc`), `rpc.method` (`pkg.Service/Method`) and
//!   `rpc.response.status_code` (`OK`, `UNAUTHENTICATED`, …), plus `server.address` and
//!   `server.port` on the client side, as the current RPC semantic conventions name them.
//!   A path that is not one of the mesh's methods counts as `_OTHER`, so a caller calling
//!   made-up methods adds no series (the SDK would keep up to 2,000 per instrument, each
//!   holding its attributes for the life of the process).
//! - The Tokio runtime's own figures: `tokio.runtime.workers`, `tokio.runtime.alive_tasks`,
//!   `tokio.runtime.global_queue_depth` and `tokio.runtime.worker.busy_time` (seconds the
//!   workers spent busy, summed: its rate over the worker count is how busy they are).
//!
//! Nothing is recorded unless metrics are exported.

use std::sync::{Mutex, OnceLock};

use opentelemetry::{
    KeyValue, global,
    metrics::{Histogram, ObservableCounter, ObservableGauge},
};

use crate::rpc::code_name;

/// The instrumentation scope of every metric the mesh makes.
const SCOPE: &str = "mesh";

/// Bucket bounds of the duration histograms, in seconds: fine below a millisecond (a loopback
/// hop) and up to ten seconds (the default deadline).
const DURATION_BOUNDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

struct Durations {
    server: Histogram<f64>,
    client: Histogram<f64>,
}

/// Made from the global meter provider at the first call recorded, which comes after
/// [`crate::Telemetry::start`] has set it.
fn durations() -> &'static Durations {
    static DURATIONS: OnceLock<Durations> = OnceLock::new();
    DURATIONS.get_or_init(|| {
        let meter = global::meter(SCOPE);
        Durations {
            server: meter
                .f64_histogram("rpc.server.call.duration")
                .with_description("Duration of gRPC calls served, by method and status code")
                .with_unit("s")
                .with_boundaries(DURATION_BOUNDS.to_vec())
                .build(),
            client: meter
                .f64_histogram("rpc.client.call.duration")
                .with_description(
                    "Duration of gRPC calls made to other services, by method and status code",
                )
                .with_unit("s")
                .with_boundaries(DURATION_BOUNDS.to_vec())
                .build(),
        }
    })
}

/// Records one finished call of `name` (`pkg.Service/Method`) that took `seconds`. The
/// attributes borrow what the call already holds: nothing is allocated per call.
pub(crate) fn record_call(
    server: bool,
    name: &std::sync::Arc<str>,
    code: i32,
    peer: Option<&(std::sync::Arc<str>, u16)>,
    seconds: f64,
) {
    let durations = durations();
    let histogram = if server {
        &durations.server
    } else {
        &durations.client
    };
    let system = KeyValue::new("rpc.system.name", "grpc");
    let method = KeyValue::new("rpc.method", std::sync::Arc::clone(name));
    let status = KeyValue::new("rpc.response.status_code", code_name(code));
    match peer {
        Some((host, port)) => histogram.record(
            seconds,
            &[
                system,
                method,
                status,
                KeyValue::new("server.address", std::sync::Arc::clone(host)),
                KeyValue::new("server.port", i64::from(*port)),
            ],
        ),
        None => histogram.record(seconds, &[system, method, status]),
    }
}

/// The gauges registered so far: kept for the life of the process.
fn kept() -> &'static Mutex<Vec<ObservableGauge<i64>>> {
    static KEPT: OnceLock<Mutex<Vec<ObservableGauge<i64>>>> = OnceLock::new();
    KEPT.get_or_init(|| Mutex::new(Vec::new()))
}

/// Registers a gauge read at every export: `read` returns its current value (an open-stream
/// count, a queue depth). Without metrics export it is never read.
pub fn gauge(
    name: &'static str,
    description: &'static str,
    unit: &'static str,
    read: impl Fn() -> i64 + Send + Sync + 'static,
) {
    let gauge = global::meter(SCOPE)
        .i64_observable_gauge(name)
        .with_description(description)
        .with_unit(unit)
        .with_callback(move |observer| observer.observe(read(), &[]))
        .build();
    if let Ok(mut kept) = kept().lock() {
        kept.push(gauge);
    }
}

/// One of the runtime's figures: name, description, unit, how it is read.
type RuntimeFigure = (
    &'static str,
    &'static str,
    &'static str,
    fn(&tokio::runtime::RuntimeMetrics) -> usize,
);

/// Gauges of the runtime the caller runs on, and the time its workers spent busy.
pub(crate) fn runtime_gauges() {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let figures: [RuntimeFigure; 3] = [
        (
            "tokio.runtime.workers",
            "Worker threads of the Tokio runtime",
            "{thread}",
            tokio::runtime::RuntimeMetrics::num_workers,
        ),
        (
            "tokio.runtime.alive_tasks",
            "Tasks alive on the Tokio runtime",
            "{task}",
            tokio::runtime::RuntimeMetrics::num_alive_tasks,
        ),
        (
            "tokio.runtime.global_queue_depth",
            "Tasks waiting in the Tokio runtime's global queue",
            "{task}",
            tokio::runtime::RuntimeMetrics::global_queue_depth,
        ),
    ];
    for (name, description, unit, read) in figures {
        let metrics = runtime.metrics();
        gauge(name, description, unit, move || {
            i64::try_from(read(&metrics)).unwrap_or(i64::MAX)
        });
    }
    static BUSY: OnceLock<ObservableCounter<f64>> = OnceLock::new();
    let metrics = runtime.metrics();
    BUSY.get_or_init(move || {
        global::meter(SCOPE)
            .f64_observable_counter("tokio.runtime.worker.busy_time")
            .with_description("Time the Tokio runtime's workers spent busy, summed over workers")
            .with_unit("s")
            .with_callback(move |observer| {
                let busy: f64 = (0..metrics.num_workers())
                    .map(|w| metrics.worker_total_busy_duration(w).as_secs_f64())
                    .sum();
                observer.observe(busy, &[]);
            })
            .build()
    });
}
