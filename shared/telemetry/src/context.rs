//! W3C trace context: the `traceparent` and `tracestate` metadata every mesh call carries, the
//! ids of spans, and the sampling decision.
//!
//! `traceparent` is `00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`, lowercase;
//! an all-zero id, version `ff` or any other malformation makes it invalid, and an invalid
//! header is ignored (the call starts a new trace), as the W3C recommendation says.

use std::{cell::Cell, fmt};

/// The `traceparent` metadata key.
pub use mesh_proto::headers::TRACEPARENT;
/// The `tracestate` metadata key.
pub use mesh_proto::headers::TRACESTATE;

/// The longest `tracestate` passed on (the W3C limit is 512 bytes of list members).
const MAX_TRACESTATE: usize = 512;

/// The sampled bit of the trace flags.
const SAMPLED: u8 = 0x01;

/// The context of one span: which trace it belongs to, its own id, and whether it is sampled.
#[derive(Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 16 bytes, never all zero.
    pub trace_id: [u8; 16],
    /// 8 bytes, never all zero.
    pub span_id: [u8; 8],
    /// The W3C trace flags (bit 0: sampled).
    pub flags: u8,
    /// The vendor-specific `tracestate`, passed on unchanged.
    pub trace_state: Option<String>,
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

impl TraceContext {
    /// Parses a `traceparent` value (and the `tracestate` that came with it).
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let bytes = traceparent.as_bytes();
        // Version 00 is exactly 55 characters; a later version may append fields after a '-'.
        if bytes.len() < 55 || (bytes.len() > 55 && bytes[55] != b'-') {
            return None;
        }
        let version = hex_byte(&bytes[0..2])?;
        if version == 0xff || (version == 0 && bytes.len() != 55) {
            return None;
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, b) in trace_id.iter_mut().enumerate() {
            *b = hex_byte(&bytes[3 + 2 * i..5 + 2 * i])?;
        }
        let mut span_id = [0u8; 8];
        for (i, b) in span_id.iter_mut().enumerate() {
            *b = hex_byte(&bytes[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&bytes[53..55])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        let trace_state = tracestate
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE && s.is_ascii())
            .map(str::to_owned);
        Some(Self {
            trace_id,
            span_id,
            flags,
            trace_state,
        })
    }

    /// The context from request metadata (`traceparent`, `tracestate`), if valid.
    pub fn from_headers(headers: &http::HeaderMap) -> Option<Self> {
        let parent = headers.get(TRACEPARENT)?.to_str().ok()?;
        let state = headers.get(TRACESTATE).and_then(|v| v.to_str().ok());
        Self::parse(parent, state)
    }

    /// Writes this context as `traceparent` (and `tracestate`) into `headers`, replacing what
    /// was there.
    pub fn inject(&self, headers: &mut http::HeaderMap) {
        if let Ok(value) = http::HeaderValue::from_str(&self.traceparent()) {
            headers.insert(TRACEPARENT, value);
        }
        match self
            .trace_state
            .as_deref()
            .and_then(|s| http::HeaderValue::from_str(s).ok())
        {
            Some(value) => {
                headers.insert(TRACESTATE, value);
            }
            None => {
                headers.remove(TRACESTATE);
            }
        }
    }

    /// A new root: a new trace id and span id.
    pub fn new_root(sampled: bool) -> Self {
        Self {
            trace_id: random_trace_id(),
            span_id: random_span_id(),
            flags: if sampled { SAMPLED } else { 0 },
            trace_state: None,
        }
    }

    /// A child of this context: the same trace, a new span id, the given sampling decision.
    pub fn child(&self, sampled: bool) -> Self {
        Self {
            trace_id: self.trace_id,
            span_id: random_span_id(),
            flags: (self.flags & !SAMPLED) | if sampled { SAMPLED } else { 0 },
            trace_state: self.trace_state.clone(),
        }
    }

    /// Whether the span is sampled (recorded and exported).
    pub fn is_sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The `traceparent` value.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            self.trace_id_hex(),
            self.span_id_hex(),
            self.flags
        )
    }

    /// The trace id as 32 lowercase hex digits (as trace viewers show it).
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }
}

fn hex_digit(b: u8) -> Option<u8> {
    // Lowercase only, as the W3C format requires.
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
    Some(hex_digit(pair[0])? << 4 | hex_digit(pair[1])?)
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

thread_local! {
    /// A per-thread xorshift state, seeded once from the operating system: ids must be unique,
    /// not secret, and a system call per span would cost more than the span.
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_err() {
        // No entropy source: the clock and the thread still make distinct seeds.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = nanos.to_le_bytes();
    }
    u64::from_le_bytes(bytes) | 1
}

/// The next 64 random bits of this thread (xorshift64*).
fn next_u64() -> u64 {
    RNG.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

fn random_span_id() -> [u8; 8] {
    loop {
        let id = next_u64().to_be_bytes();
        if id != [0; 8] {
            return id;
        }
    }
}

fn random_trace_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&next_u64().to_be_bytes());
    id[8..].copy_from_slice(&random_span_id());
    id
}

/// Which spans are sampled (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    /// Every span.
    AlwaysOn,
    /// No span.
    AlwaysOff,
    /// A share of traces, by trace id, whatever the parent says.
    TraceIdRatio(f64),
    /// The parent's decision when there is a parent, else the root sampler's.
    ParentBased(Root),
}

/// How a parent-based sampler decides for a new trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Root {
    /// Sample every new trace.
    AlwaysOn,
    /// Sample no new trace.
    AlwaysOff,
    /// Sample this share of new traces.
    Ratio(f64),
}

impl Default for Sampler {
    /// OpenTelemetry's default, `parentbased_always_on`.
    fn default() -> Self {
        Self::ParentBased(Root::AlwaysOn)
    }
}

impl Sampler {
    /// The sampler named by `OTEL_TRACES_SAMPLER` with its `OTEL_TRACES_SAMPLER_ARG` (a ratio
    /// from 0 to 1, default 1). Unknown names and bad ratios are an error.
    pub fn parse(name: &str, arg: Option<&str>) -> Result<Self, String> {
        let ratio = || -> Result<f64, String> {
            match arg.map(str::trim).filter(|a| !a.is_empty()) {
                None => Ok(1.0),
                Some(a) => a
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| format!("OTEL_TRACES_SAMPLER_ARG `{a}` is not a ratio 0–1")),
            }
        };
        Ok(match name.trim() {
            "always_on" => Self::AlwaysOn,
            "always_off" => Self::AlwaysOff,
            "traceidratio" => Self::TraceIdRatio(ratio()?),
            "parentbased_always_on" => Self::ParentBased(Root::AlwaysOn),
            "parentbased_always_off" => Self::ParentBased(Root::AlwaysOff),
            "parentbased_traceidratio" => Self::ParentBased(Root::Ratio(ratio()?)),
            other => return Err(format!("unknown OTEL_TRACES_SAMPLER `{other}`")),
        })
    }

    /// Whether a span of trace `trace_id` with `parent` (if any) is sampled.
    pub fn should_sample(&self, parent: Option<&TraceContext>, trace_id: &[u8; 16]) -> bool {
        match (self, parent) {
            (Self::AlwaysOn, _) => true,
            (Self::AlwaysOff, _) => false,
            (Self::TraceIdRatio(r), _) => ratio_sampled(*r, trace_id),
            (Self::ParentBased(_), Some(parent)) => parent.is_sampled(),
            (Self::ParentBased(Root::AlwaysOn), None) => true,
            (Self::ParentBased(Root::AlwaysOff), None) => false,
            (Self::ParentBased(Root::Ratio(r)), None) => ratio_sampled(*r, trace_id),
        }
    }

    /// The context of a new span under `parent` (or of a new trace), sampled as this sampler
    /// says.
    pub fn start(&self, parent: Option<&TraceContext>) -> TraceContext {
        match parent {
            Some(parent) => {
                let sampled = self.should_sample(Some(parent), &parent.trace_id);
                parent.child(sampled)
            }
            None => {
                let mut root = TraceContext::new_root(false);
                if self.should_sample(None, &root.trace_id) {
                    root.flags |= SAMPLED;
                }
                root
            }
        }
    }
}

/// Deterministic by trace id: the low 8 bytes, read as a number, against the ratio of 2^64, so
/// every service that sees the same trace decides the same way.
fn ratio_sampled(ratio: f64, trace_id: &[u8; 16]) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 {
        return false;
    }
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    let bound = (ratio * u64::MAX as f64) as u64;
    u64::from_be_bytes(low) < bound
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// A valid `traceparent` parses and prints back the same; `tracestate` comes along.
    #[test]
    fn round_trip() {
        let ctx = TraceContext::parse(GOOD, Some("congo=t61rcWkgMzE")).expect("valid");
        assert_eq!(ctx.traceparent(), GOOD);
        assert!(ctx.is_sampled());
        assert_eq!(ctx.trace_state.as_deref(), Some("congo=t61rcWkgMzE"));
        let mut headers = http::HeaderMap::new();
        ctx.inject(&mut headers);
        assert_eq!(TraceContext::from_headers(&headers), Some(ctx));
    }

    /// Malformed values are refused: wrong length, uppercase, zero ids, version ff, bad dashes.
    #[test]
    fn hostile_traceparents() {
        let bad = [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473é-00f067aa0ba902b7-01",
        ];
        for value in bad {
            assert_eq!(TraceContext::parse(value, None), None, "{value}");
        }
        // A later version may carry more fields after a dash.
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        assert!(TraceContext::parse(future, None).is_some());
        // An oversized tracestate is dropped, the traceparent kept.
        let long = "k=".to_owned() + &"v".repeat(600);
        let ctx = TraceContext::parse(GOOD, Some(&long)).expect("valid parent");
        assert_eq!(ctx.trace_state, None);
    }

    /// Children keep the trace id, get a new span id, and carry the decision given.
    #[test]
    fn children() {
        let parent = TraceContext::parse(GOOD, None).expect("valid");
        let child = parent.child(false);
        assert_eq!(child.trace_id, parent.trace_id);
        assert_ne!(child.span_id, parent.span_id);
        assert!(!child.is_sampled());
        let roots: std::collections::HashSet<_> = (0..1000)
            .map(|_| TraceContext::new_root(true).trace_id)
            .collect();
        assert_eq!(roots.len(), 1000, "trace ids are unique");
    }

    /// Every sampler name parses; parent-based samplers follow the parent; a ratio samples
    /// about its share of new traces, and the same trace id always gets the same decision.
    #[test]
    fn samplers() {
        let on = TraceContext::parse(GOOD, None).expect("valid");
        let off = on.child(false);
        let pb = Sampler::parse("parentbased_traceidratio", Some("0.1")).expect("parses");
        assert_eq!(pb, Sampler::ParentBased(Root::Ratio(0.1)));
        assert!(pb.should_sample(Some(&on), &on.trace_id));
        assert!(!pb.should_sample(Some(&off), &off.trace_id));
        let sampled = (0..20_000).filter(|_| pb.start(None).is_sampled()).count();
        assert!(
            (1_500..2_500).contains(&sampled),
            "{sampled} of 20000 at 10 %"
        );
        let ratio = Sampler::parse("traceidratio", Some("0.5")).expect("parses");
        let id = TraceContext::new_root(false).trace_id;
        let first = ratio.should_sample(None, &id);
        assert!((0..10).all(|_| ratio.should_sample(None, &id) == first));
        assert_eq!(Sampler::parse("always_off", None), Ok(Sampler::AlwaysOff));
        assert!(!Sampler::AlwaysOff.start(Some(&on)).is_sampled());
        assert!(Sampler::AlwaysOn.start(Some(&off)).is_sampled());
        assert!(Sampler::parse("sometimes", None).is_err());
        assert!(Sampler::parse("traceidratio", Some("1.5")).is_err());
        assert!(Sampler::parse("traceidratio", Some("x")).is_err());
    }
}
