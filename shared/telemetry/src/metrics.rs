//! The process's metrics: RPC duration histograms (recorded by the layers in [`crate::rpc`])
//! and gauges the services register ([`gauge`]), collected into OTLP form at each export.
//!
//! Histograms are cumulative since the process started, in explicit buckets; recording one
//! value takes one short lock on its series. Nothing is recorded unless metrics are exported.

use std::{
    collections::BTreeMap,
    sync::{Mutex, OnceLock},
    time::SystemTime,
};

use mesh_proto::otlp::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, metric,
    number_data_point,
};

use crate::export::{AttrValue, Attributes, unix_nanos};

/// Bucket bounds of the RPC duration histograms, in milliseconds: fine below a millisecond
/// (a loopback hop) and up to ten seconds (the default deadline).
pub const DURATION_BOUNDS_MS: [f64; 16] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
    10000.0,
];

/// Series of one histogram metric at most; later attribute sets are not recorded (a hostile
/// client must not grow memory by calling made-up methods).
const MAX_SERIES: usize = 1000;

#[derive(Debug, Clone)]
struct Series {
    counts: [u64; DURATION_BOUNDS_MS.len() + 1],
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Series {
    fn new() -> Self {
        Self {
            counts: [0; DURATION_BOUNDS_MS.len() + 1],
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }

    fn record(&mut self, value: f64) {
        // Bucket i holds (bounds[i-1], bounds[i]]; the last one everything above.
        let bucket = DURATION_BOUNDS_MS.partition_point(|&bound| bound < value);
        self.counts[bucket] += 1;
        self.count += 1;
        self.sum += value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }
}

struct HistogramMetric {
    name: &'static str,
    description: &'static str,
    series: Mutex<BTreeMap<Attributes, Series>>,
}

/// A gauge read at each export.
struct GaugeMetric {
    name: &'static str,
    description: &'static str,
    unit: &'static str,
    read: Box<dyn Fn() -> i64 + Send + Sync>,
}

#[derive(Default)]
struct Registry {
    histograms: Mutex<Vec<&'static HistogramMetric>>,
    gauges: Mutex<Vec<GaugeMetric>>,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

/// When the cumulative series began.
fn start_time() -> SystemTime {
    static START: OnceLock<SystemTime> = OnceLock::new();
    *START.get_or_init(SystemTime::now)
}

/// A duration histogram in milliseconds.
pub(crate) struct DurationHistogram {
    metric: OnceLock<&'static HistogramMetric>,
    name: &'static str,
    description: &'static str,
}

impl DurationHistogram {
    pub(crate) const fn new(name: &'static str, description: &'static str) -> Self {
        Self {
            metric: OnceLock::new(),
            name,
            description,
        }
    }

    fn metric(&self) -> &'static HistogramMetric {
        self.metric.get_or_init(|| {
            let _ = start_time();
            let metric: &'static HistogramMetric = Box::leak(Box::new(HistogramMetric {
                name: self.name,
                description: self.description,
                series: Mutex::new(BTreeMap::new()),
            }));
            if let Ok(mut all) = registry().histograms.lock() {
                all.push(metric);
            }
            metric
        })
    }

    /// Records `ms` under `attributes`.
    pub(crate) fn record(&self, attributes: Attributes, ms: f64) {
        let metric = self.metric();
        let Ok(mut series) = metric.series.lock() else {
            return;
        };
        let len = series.len();
        match series.get_mut(&attributes) {
            Some(s) => s.record(ms),
            None if len < MAX_SERIES => {
                let mut s = Series::new();
                s.record(ms);
                series.insert(attributes, s);
            }
            None => {}
        }
    }
}

/// Registers a gauge read at every export: `read` returns its current value (an open-stream
/// count, a queue depth). Cheap to keep even when nothing is exported.
pub fn gauge(
    name: &'static str,
    description: &'static str,
    unit: &'static str,
    read: impl Fn() -> i64 + Send + Sync + 'static,
) {
    if let Ok(mut gauges) = registry().gauges.lock() {
        gauges.retain(|g| g.name != name);
        gauges.push(GaugeMetric {
            name,
            description,
            unit,
            read: Box::new(read),
        });
    }
}

/// Every metric as it stands now, in OTLP form.
pub(crate) fn collect() -> Vec<Metric> {
    let now = unix_nanos(SystemTime::now());
    let start = unix_nanos(start_time());
    let mut out = Vec::new();
    let histograms: Vec<&'static HistogramMetric> = registry()
        .histograms
        .lock()
        .map(|h| h.clone())
        .unwrap_or_default();
    for metric in histograms {
        let snapshot: Vec<(Attributes, Series)> = match metric.series.lock() {
            Ok(series) => series.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => continue,
        };
        if snapshot.is_empty() {
            continue;
        }
        let data_points = snapshot
            .into_iter()
            .map(|(attributes, s)| HistogramDataPoint {
                attributes: attributes.iter().map(|(k, v)| v.key_value(k)).collect(),
                start_time_unix_nano: start,
                time_unix_nano: now,
                count: s.count,
                sum: Some(s.sum),
                bucket_counts: s.counts.to_vec(),
                explicit_bounds: DURATION_BOUNDS_MS.to_vec(),
                flags: 0,
                min: Some(s.min),
                max: Some(s.max),
            })
            .collect();
        out.push(Metric {
            name: metric.name.into(),
            description: metric.description.into(),
            unit: "ms".into(),
            data: Some(metric::Data::Histogram(Histogram {
                data_points,
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
            })),
        });
    }
    if let Ok(gauges) = registry().gauges.lock() {
        for g in gauges.iter() {
            out.push(Metric {
                name: g.name.into(),
                description: g.description.into(),
                unit: g.unit.into(),
                data: Some(metric::Data::Gauge(Gauge {
                    data_points: vec![NumberDataPoint {
                        attributes: Vec::new(),
                        start_time_unix_nano: start,
                        time_unix_nano: now,
                        value: Some(number_data_point::Value::AsInt((g.read)())),
                        flags: 0,
                    }],
                })),
            });
        }
    }
    out
}

/// An attribute list of string values and one integer status code.
pub(crate) fn rpc_attributes(service: &str, method: &str, code: i32) -> Attributes {
    vec![
        ("rpc.grpc.status_code", AttrValue::Int(i64::from(code))),
        ("rpc.method", AttrValue::Str(crate::export::intern(method))),
        (
            "rpc.service",
            AttrValue::Str(crate::export::intern(service)),
        ),
        ("rpc.system", AttrValue::Str(crate::export::intern("grpc"))),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values land in the right buckets (upper bounds inclusive), with count, sum, min, max;
    /// each attribute set is its own series; gauges are read at collection.
    #[test]
    fn histogram_and_gauge() {
        static H: DurationHistogram = DurationHistogram::new("test.duration", "a test");
        for ms in [0.05, 0.1, 0.3, 7.0, 20_000.0] {
            H.record(rpc_attributes("s", "M", 0), ms);
        }
        H.record(rpc_attributes("s", "M", 14), 1.0);
        gauge("test.gauge", "a gauge", "{item}", || 42);
        let metrics = collect();
        let hist = metrics
            .iter()
            .find(|m| m.name == "test.duration")
            .expect("histogram exported");
        let Some(metric::Data::Histogram(h)) = &hist.data else {
            panic!("not a histogram: {hist:?}");
        };
        assert_eq!(h.data_points.len(), 2);
        let ok = h
            .data_points
            .iter()
            .find(|p| p.count == 5)
            .expect("the OK series");
        assert_eq!(ok.bucket_counts.len(), DURATION_BOUNDS_MS.len() + 1);
        assert_eq!(ok.bucket_counts[0], 2, "0.05 and 0.1 are ≤ 0.1");
        assert_eq!(ok.bucket_counts[2], 1, "0.3 is in (0.25, 0.5]");
        assert_eq!(ok.bucket_counts[6], 1, "7 is in (5, 10]");
        assert_eq!(ok.bucket_counts[DURATION_BOUNDS_MS.len()], 1, "overflow");
        assert_eq!((ok.min, ok.max), (Some(0.05), Some(20_000.0)));
        assert!((ok.sum.unwrap_or(0.0) - 20_007.45).abs() < 1e-6);
        let g = metrics
            .iter()
            .find(|m| m.name == "test.gauge")
            .expect("gauge exported");
        let Some(metric::Data::Gauge(g)) = &g.data else {
            panic!("not a gauge");
        };
        assert_eq!(
            g.data_points[0].value,
            Some(number_data_point::Value::AsInt(42))
        );
    }
}
