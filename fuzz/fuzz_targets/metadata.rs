//! Call metadata as any client (or environment) may send it: `traceparent`/`tracestate`,
//! `x-request-id`, and the OTEL_* variables. Parsing must answer, never panic; what is accepted
//! prints back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_telemetry::{ExportConfig, RequestId, TraceContext};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (parent, state) = text.split_once('\n').unwrap_or((&text, ""));
    if let Some(ctx) = TraceContext::parse(parent, Some(state)) {
        let again = TraceContext::parse(&ctx.traceparent(), ctx.trace_state.as_deref());
        assert_eq!(again.as_ref(), Some(&ctx));
    }
    if let Some(id) = RequestId::parse(data) {
        assert_eq!(id.as_str().as_bytes(), data);
    }
    // Every variable set to a slice of the input.
    let values: Vec<&str> = text.split('\n').collect();
    let config = ExportConfig::from_lookup("users", |key| {
        let i = key.bytes().map(usize::from).sum::<usize>() % values.len().max(1);
        values.get(i).map(|v| (*v).to_owned())
    });
    assert!(config.max_batch <= config.max_queue);
});
