//! Call metadata as any client (or environment) may send it: `traceparent`/`tracestate`,
//! `baggage`, `x-request-id`, and the OTEL_* variables. Parsing must answer, never panic; a
//! trace context that is accepted is passed on unchanged, and baggage passed on never grows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_telemetry::{RequestId, Signals, pipeline};
use opentelemetry::{baggage::BaggageExt as _, trace::TraceContextExt as _};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let mut headers = http::HeaderMap::new();
    for name in ["traceparent", "tracestate", "baggage"] {
        if let Some(Ok(value)) = lines.next().map(http::HeaderValue::from_str) {
            headers.insert(name, value);
        }
    }
    let cx = pipeline::extract(&headers);
    let mut passed_on = http::HeaderMap::new();
    pipeline::inject(&cx, &mut passed_on);
    let again = pipeline::extract(&passed_on);
    assert_eq!(again.span().span_context(), cx.span().span_context());
    // Baggage passed on never grows (an entry whose properties the SDK cannot write back in a
    // form it reads again is dropped downstream, which is harmless).
    assert!(again.baggage().len() <= cx.baggage().len());

    if let Some(id) = RequestId::parse(data) {
        assert_eq!(id.as_str().as_bytes(), data);
    }
    // Every variable set to a slice of the input.
    let values: Vec<&str> = text.split('\n').collect();
    let signals = Signals::from_lookup(|key| {
        let i = key.bytes().map(usize::from).sum::<usize>() % values.len().max(1);
        values.get(i).map(|v| (*v).to_owned())
    });
    if signals.traces.is_none() && signals.metrics.is_none() && signals.logs.is_none() {
        return;
    }
    // Something is exported only to an endpoint that some variable named.
    assert!(
        values
            .iter()
            .any(|v| v.trim().starts_with("http://") || v.trim().starts_with("https://"))
    );
});
