//! `mesh up --traces`: traces on a laptop with no collector and no trace viewer.
//!
//! The launcher runs an OTLP/gRPC trace receiver on a loopback port and points the three
//! services' trace export at it. Each finished trace is printed as a waterfall, one line per
//! span indented under its parent (start offset, duration, status, a bar on the trace's time
//! line, service, name), and appended to `<data-dir>/traces.jsonl` in OTLP's JSON encoding,
//! one `ExportTraceServiceRequest` per line (what the OpenTelemetry Collector's file exporter
//! writes and its `otlpjsonfile` receiver reads).
//!
//! A trace is finished once nothing more of it has arrived for [`QUIET`] past the services'
//! export delay (`OTEL_BSP_SCHEDULE_DELAY`, which `mesh up --traces` sets to 200 ms unless
//! the environment does), or once it is [`LINGER`] old. At most [`MAX_TRACES`] traces of
//! [`MAX_SPANS`] spans each are held, names cut to [`MAX_NAME`] characters: beyond that spans
//! are dropped and counted, so a flood of calls cannot grow the launcher's memory without
//! bound. The receiver listens on loopback only.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, span::SpanKind, status::StatusCode},
};

/// How long past the services' export delay a trace must have been quiet to be printed.
pub(crate) const QUIET: Duration = Duration::from_millis(800);
/// The services' export delay when the environment names none (`mesh up --traces` sets it).
pub(crate) const EXPORT_DELAY: Duration = Duration::from_millis(200);
/// How long a trace that keeps growing is waited for.
pub(crate) const LINGER: Duration = Duration::from_secs(30);
/// Traces held at most while they finish.
pub(crate) const MAX_TRACES: usize = 1_000;
/// Spans held at most of one trace.
pub(crate) const MAX_SPANS: usize = 500;
/// Characters of a span's or service's name shown at most.
pub(crate) const MAX_NAME: usize = 200;
/// Width of the time-line bar, in characters.
const BAR: usize = 24;

/// One span as received, with the resource and scope it came with.
#[derive(Clone)]
struct Received {
    service: String,
    resource: Arc<Resource>,
    scope: Arc<InstrumentationScope>,
    span: Span,
}

struct Pending {
    spans: Vec<Received>,
    last: Instant,
    first: Instant,
}

#[derive(Default)]
struct State {
    traces: HashMap<Vec<u8>, Pending>,
    dropped: u64,
}

/// The receiver, shared by the gRPC service and the task that prints.
#[derive(Clone)]
struct Receiver {
    state: Arc<Mutex<State>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let now = Instant::now();
        let mut state = self
            .state
            .lock()
            .map_err(|_| tonic::Status::internal("receiver state"))?;
        for rs in request.into_inner().resource_spans {
            let resource = Arc::new(rs.resource.unwrap_or_default());
            let service = shown(&service_name(&resource.attributes));
            for ss in rs.scope_spans {
                let scope = Arc::new(ss.scope.unwrap_or_default());
                for span in ss.spans {
                    let full = state.traces.len() >= MAX_TRACES;
                    let State { traces, dropped } = &mut *state;
                    let pending = match traces.get_mut(&span.trace_id) {
                        Some(pending) => pending,
                        None if full => {
                            *dropped += 1;
                            continue;
                        }
                        None => traces.entry(span.trace_id.clone()).or_insert(Pending {
                            spans: Vec::new(),
                            last: now,
                            first: now,
                        }),
                    };
                    if pending.spans.len() >= MAX_SPANS {
                        *dropped += 1;
                        continue;
                    }
                    pending.last = now;
                    let mut span = span;
                    span.name = shown(&span.name);
                    pending.spans.push(Received {
                        service: service.clone(),
                        resource: Arc::clone(&resource),
                        scope: Arc::clone(&scope),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A running receiver: its endpoint, and the tasks that serve and print (ended on drop).
pub(crate) struct Waterfall {
    endpoint: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Waterfall {
    /// Starts the receiver on a free loopback port; finished traces go to standard output
    /// and to `<data_dir>/traces.jsonl`.
    pub(crate) async fn start(data_dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let file = data_dir.join("traces.jsonl");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let receiver = Receiver {
            state: Arc::default(),
        };
        let serve = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        let serving = tokio::spawn(async move {
            if let Err(err) = serve.await {
                tracing::warn!(error = %err, "the trace receiver stopped");
            }
        });
        let delay = std::env::var("OTEL_BSP_SCHEDULE_DELAY")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(EXPORT_DELAY, Duration::from_millis);
        let printing = tokio::spawn(print_finished(receiver, file, delay + QUIET));
        Ok(Self {
            endpoint: format!("http://{addr}"),
            tasks: vec![serving, printing],
        })
    }

    /// The OTLP/gRPC endpoint the services export their traces to.
    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

impl Drop for Waterfall {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Every 200 ms: takes the traces quiet for `quiet` out, prints them and appends them to
/// `file`.
async fn print_finished(receiver: Receiver, file: PathBuf, quiet: Duration) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut reported_drops = 0;
    loop {
        tick.tick().await;
        let now = Instant::now();
        let (finished, dropped) = {
            let Ok(mut state) = receiver.state.lock() else {
                return;
            };
            let done: Vec<Vec<u8>> = state
                .traces
                .iter()
                .filter(|(_, p)| {
                    now.duration_since(p.last) >= quiet || now.duration_since(p.first) >= LINGER
                })
                .map(|(id, _)| id.clone())
                .collect();
            let finished: Vec<Pending> = done
                .iter()
                .filter_map(|id| state.traces.remove(id))
                .collect();
            (finished, state.dropped)
        };
        if dropped > reported_drops {
            tracing::warn!(
                dropped = dropped - reported_drops,
                "trace receiver full: spans dropped"
            );
            reported_drops = dropped;
        }
        if finished.is_empty() {
            continue;
        }
        let mut out = String::new();
        let mut lines = String::new();
        for mut trace in finished {
            trace
                .spans
                .sort_by_key(|r| (r.span.start_time_unix_nano, r.span.end_time_unix_nano));
            out.push_str(&render(&trace.spans));
            out.push('\n');
            lines.push_str(&otlp_json(&trace.spans));
            lines.push('\n');
        }
        // The file first: once a waterfall is on the screen, its trace is in the file.
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)
            .and_then(|mut f| f.write_all(lines.as_bytes()));
        if let Err(err) = appended {
            tracing::warn!(file = %file.display(), error = %err, "cannot append the traces");
        }
        {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(out.as_bytes());
            let _ = stdout.flush();
        }
    }
}

/// A name as the terminal may show it: at most [`MAX_NAME`] characters, control characters
/// (escape sequences) replaced.
fn shown(name: &str) -> String {
    name.chars()
        .take(MAX_NAME)
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

fn service_name(attributes: &[KeyValue]) -> String {
    attributes
        .iter()
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| string_of(kv.value.as_ref()))
        .unwrap_or_else(|| "?".to_owned())
}

fn string_of(value: Option<&AnyValue>) -> Option<String> {
    match value?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

/// The spans whose parent is not in the trace (the root, or children of a caller's span).
fn roots(spans: &[Received]) -> Vec<usize> {
    let ids: HashSet<&[u8]> = spans.iter().map(|r| r.span.span_id.as_slice()).collect();
    (0..spans.len())
        .filter(|&i| {
            let parent = spans[i].span.parent_span_id.as_slice();
            parent.is_empty() || !ids.contains(parent)
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A span's status as the waterfall shows it: the gRPC code's name on RPC spans, `ERROR` on
/// any other failed span, nothing otherwise.
fn status_of(span: &Span) -> String {
    if let Some(code) = span
        .attributes
        .iter()
        .find(|kv| kv.key == "rpc.response.status_code")
        .and_then(|kv| string_of(kv.value.as_ref()))
    {
        return code;
    }
    match span.status.as_ref().map(|s| s.code) {
        Some(code) if code == StatusCode::Error as i32 => "ERROR".to_owned(),
        _ => String::new(),
    }
}

/// The waterfall of one trace, its spans sorted by start time.
fn render(spans: &[Received]) -> String {
    let start = spans
        .iter()
        .map(|r| r.span.start_time_unix_nano)
        .min()
        .unwrap_or(0);
    let end = spans
        .iter()
        .map(|r| r.span.end_time_unix_nano)
        .max()
        .unwrap_or(start);
    let total = end.saturating_sub(start).max(1);
    let ms = |nanos: u64| nanos as f64 / 1e6;
    let mut children: HashMap<&[u8], Vec<usize>> = HashMap::new();
    for (i, r) in spans.iter().enumerate() {
        children
            .entry(r.span.parent_span_id.as_slice())
            .or_default()
            .push(i);
    }
    let top = roots(spans);
    let title = top
        .first()
        .map(|&i| spans[i].span.name.as_str())
        .unwrap_or("?");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  {:>9} {:>9}  {:<18} {:<BAR$}  span",
        "start ms", "took ms", "status", "time line"
    );
    // Depth-first, children in start order (the spans are sorted already).
    let mut stack: Vec<(usize, usize)> = top.iter().rev().map(|&i| (i, 0)).collect();
    let mut seen = HashSet::new();
    while let Some((i, depth)) = stack.pop() {
        if !seen.insert(i) {
            continue;
        }
        let r = &spans[i];
        let s = &r.span;
        // A span may end before it starts (a clock stepped back) or after the trace's end
        // as measured: the bar stays within the line either way.
        let offset = s.start_time_unix_nano.saturating_sub(start);
        let took = s.end_time_unix_nano.saturating_sub(s.start_time_unix_nano);
        let cell = |nanos: u64, up: bool| {
            let scaled = u128::from(nanos.min(total)) * BAR as u128;
            let cell = if up {
                scaled.div_ceil(u128::from(total))
            } else {
                scaled / u128::from(total)
            };
            usize::try_from(cell).unwrap_or(BAR)
        };
        let from = cell(offset, false).min(BAR - 1);
        let to = cell(offset.saturating_add(took), true).clamp(from + 1, BAR);
        let bar: String = (0..BAR)
            .map(|c| if (from..to).contains(&c) { '█' } else { '·' })
            .collect();
        let arrow = if s.kind == SpanKind::Client as i32 {
            "→ "
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "  {:>9.3} {:>9.3}  {:<18} {bar}  {}{} {arrow}{}",
            ms(offset),
            ms(took),
            status_of(s),
            "  ".repeat(depth),
            r.service,
            s.name
        );
        if let Some(kids) = children.get(s.span_id.as_slice()) {
            for &k in kids.iter().rev() {
                stack.push((k, depth + 1));
            }
        }
    }
    // Spans in a cycle of parent ids (a broken exporter) are in no tree: say so.
    let left_out = spans.len() - seen.len();
    let left_out = if left_out > 0 {
        format!(" ({left_out} in a cycle of parents, not shown)")
    } else {
        String::new()
    };
    format!(
        "trace {}  {title}  {:.3} ms  {} spans{left_out}\n{out}",
        hex(&spans[0].span.trace_id),
        ms(total),
        seen.len()
    )
}

/// One trace as an `ExportTraceServiceRequest` in OTLP's JSON encoding (opentelemetry-proto's
/// own serde mapping: hex ids, 64-bit integers as strings, camelCase names): its spans grouped
/// by the resource and scope they came with.
fn otlp_json(spans: &[Received]) -> String {
    let mut groups: Vec<ResourceSpans> = Vec::new();
    let mut keys: Vec<(&Arc<Resource>, &Arc<InstrumentationScope>)> = Vec::new();
    for r in spans {
        let at = keys
            .iter()
            .position(|(res, scope)| Arc::ptr_eq(res, &r.resource) && Arc::ptr_eq(scope, &r.scope));
        let at = at.unwrap_or_else(|| {
            keys.push((&r.resource, &r.scope));
            groups.push(ResourceSpans {
                resource: Some(Resource::clone(&r.resource)),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope::clone(&r.scope)),
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            });
            groups.len() - 1
        });
        if let Some(scope_spans) = groups[at].scope_spans.first_mut() {
            scope_spans.spans.push(r.span.clone());
        }
    }
    serde_json::to_string(&ExportTraceServiceRequest {
        resource_spans: groups,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: u8, parent: Option<u8>, start: u64, end: u64) -> Received {
        Received {
            service: "svc".into(),
            resource: Arc::default(),
            scope: Arc::default(),
            span: Span {
                trace_id: vec![1; 16],
                span_id: vec![id; 8],
                parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
                name: format!("span{id}"),
                start_time_unix_nano: start,
                end_time_unix_nano: end,
                ..Span::default()
            },
        }
    }

    /// Spans that end before they start, at the trace's very end, at u64::MAX, or in a cycle
    /// of parents are drawn (or left out) without a panic.
    #[test]
    fn odd_spans_render() {
        let cases = [
            vec![span(1, None, 100, 200), span(2, Some(1), 200, 200)],
            vec![span(1, None, 100, 200), span(2, Some(1), 150, 120)],
            vec![span(1, None, u64::MAX, u64::MAX)],
            vec![
                span(1, None, 0, u64::MAX),
                span(2, Some(1), u64::MAX - 1, 5),
            ],
            vec![span(1, None, 5, 5)],
            vec![
                span(1, Some(2), 1, 2),
                span(2, Some(1), 1, 2),
                span(3, None, 0, 3),
            ],
        ];
        for spans in cases {
            let mut spans = spans;
            spans.sort_by_key(|r| (r.span.start_time_unix_nano, r.span.end_time_unix_nano));
            let text = render(&spans);
            assert!(text.starts_with("trace 0101"), "{text}");
            for line in text.lines().skip(2) {
                let bar: String = line.chars().filter(|c| matches!(c, '█' | '·')).collect();
                assert_eq!(bar.chars().count(), BAR, "{line}");
                assert!(bar.contains('█'), "{line}");
            }
            assert!(otlp_json(&spans).starts_with("{\"resourceSpans\":["));
        }
        let cycle = render(&[
            span(3, None, 0, 3),
            span(1, Some(2), 1, 2),
            span(2, Some(1), 1, 2),
        ]);
        assert!(cycle.contains("1 spans (2 in a cycle"), "{cycle}");
    }

    /// Names reach the terminal cut and without control characters.
    #[test]
    fn names_are_shown_safely() {
        assert_eq!(shown("a\u{1b}[2Jb"), "a\u{fffd}[2Jb");
        assert_eq!(shown(&"x".repeat(1_000)).chars().count(), MAX_NAME);
    }
}
