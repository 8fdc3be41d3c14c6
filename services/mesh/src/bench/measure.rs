//! Driving calls and recording their latencies: many callers for a fixed time, one HDR
//! histogram per caller (no locks on the hot path), merged when the time is up.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::Serialize;

/// The percentiles every measurement reports and plots.
pub(super) const PERCENTILES: [f64; 9] = [50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99, 100.0];

/// Latencies in microseconds, from 1 µs to 10 minutes, to 3 significant figures.
#[derive(Debug, Clone)]
pub(super) struct Latencies(Histogram<u64>);

/// The largest latency recorded exactly; longer ones are clamped to it.
const MAX_MICROS: u64 = 600_000_000;

impl Default for Latencies {
    fn default() -> Self {
        // Constant bounds that `new_with_bounds` accepts (low ≥ 1, high ≥ 2 × low, 3 figures).
        Self(Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid constant bounds"))
    }
}

impl Latencies {
    /// Records one latency.
    pub(super) fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(MAX_MICROS);
        self.0.saturating_record(micros.clamp(1, MAX_MICROS));
    }

    /// Adds every sample of `other`.
    pub(super) fn merge(&mut self, other: &Self) {
        // Both have the same bounds, so adding cannot fail; a failure would only lose samples.
        let _ = self.0.add(&other.0);
    }

    /// Samples recorded.
    pub(super) fn len(&self) -> u64 {
        self.0.len()
    }

    /// The latency at percentile `p` (0–100), in milliseconds.
    pub(super) fn percentile_ms(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.value_at_percentile(p) as f64 / 1000.0
    }

    /// The mean latency, in milliseconds.
    pub(super) fn mean_ms(&self) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.mean() / 1000.0
    }
}

/// The latency figures of one measurement, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub(super) struct LatencyMs {
    pub(super) p50: f64,
    pub(super) p90: f64,
    pub(super) p99: f64,
    pub(super) p999: f64,
    pub(super) max: f64,
    pub(super) mean: f64,
}

/// One measured series: what ran, how often, how fast.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Measurement {
    /// What was measured (a row of the table, a line of the plot).
    pub(super) name: String,
    /// Calls that succeeded within the measured time.
    pub(super) calls: u64,
    /// Calls that failed.
    pub(super) errors: u64,
    /// The measured time, in seconds.
    pub(super) elapsed_s: f64,
    /// Successful calls per second.
    pub(super) per_second: f64,
    /// Latency summary of the successful calls.
    pub(super) latency_ms: LatencyMs,
    /// `[percentile, milliseconds]` pairs for [`PERCENTILES`].
    pub(super) percentiles: Vec<[f64; 2]>,
}

impl Measurement {
    /// Summarizes `latencies` of calls made over `elapsed`.
    pub(super) fn new(
        name: impl Into<String>,
        latencies: &Latencies,
        errors: u64,
        elapsed: Duration,
    ) -> Self {
        let calls = latencies.len();
        let seconds = elapsed.as_secs_f64();
        Self {
            name: name.into(),
            calls,
            errors,
            elapsed_s: seconds,
            per_second: if seconds > 0.0 {
                calls as f64 / seconds
            } else {
                0.0
            },
            latency_ms: LatencyMs {
                p50: latencies.percentile_ms(50.0),
                p90: latencies.percentile_ms(90.0),
                p99: latencies.percentile_ms(99.0),
                p999: latencies.percentile_ms(99.9),
                max: latencies.percentile_ms(100.0),
                mean: latencies.mean_ms(),
            },
            percentiles: PERCENTILES
                .iter()
                .map(|&p| [p, latencies.percentile_ms(p)])
                .collect(),
        }
    }
}

/// What [`drive`] measured.
#[derive(Debug, Default)]
pub(super) struct Driven {
    pub(super) latencies: Latencies,
    pub(super) errors: u64,
    pub(super) elapsed: Duration,
}

impl Driven {
    /// As a named measurement.
    pub(super) fn measurement(&self, name: impl Into<String>) -> Measurement {
        Measurement::new(name, &self.latencies, self.errors, self.elapsed)
    }
}

/// Runs `call` from `concurrency` callers, each calling again as soon as its call ends: first
/// for `warmup` (not recorded), then for `duration`. A call that returns `false` counts as an
/// error and its latency is not recorded. A call started before the time is up is waited for
/// and counted; the elapsed time runs until the last one ends.
pub(super) async fn drive<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    call: F,
) -> Driven
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    if !warmup.is_zero() {
        run_for(concurrency, warmup, call.clone()).await;
    }
    run_for(concurrency, duration, call).await
}

async fn run_for<F, Fut>(concurrency: usize, duration: Duration, call: F) -> Driven
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|worker| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut latencies = Latencies::default();
                let mut errors = 0;
                while start.elapsed() < duration {
                    let begun = Instant::now();
                    if call(worker).await {
                        latencies.record(begun.elapsed());
                    } else {
                        errors += 1;
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut driven = Driven::default();
    for worker in workers {
        if let Ok((latencies, errors)) = worker.await {
            driven.latencies.merge(&latencies);
            driven.errors += errors;
        }
    }
    driven.elapsed = start.elapsed();
    driven
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    };

    use super::*;

    /// A stat line is read after the name, whatever the name holds; the bench's own process
    /// is read as the kernel sees it.
    #[test]
    fn proc_stat_reads_parent_and_cpu_time() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("stat");
        std::fs::write(
            &path,
            "42 (a (b) c) S 7 42 42 0 -1 0 0 0 0 0 150 25 3 4 20 0\n",
        )
        .expect("write");
        let stat = proc_stat(&path).expect("parsed");
        assert_eq!((stat.parent, stat.cpu_ticks), (7, 175));
        std::fs::write(&path, "42 (short) S 7").expect("write");
        assert!(proc_stat(&path).is_none(), "a cut-off line");
        let own = proc_stat(std::path::Path::new("/proc/self/stat")).expect("own stat");
        assert_eq!(own.parent, std::os::unix::process::parent_id());
    }

    /// Two histograms merged hold every sample of both, and percentiles fall on the samples.
    #[test]
    fn merge_and_percentiles() {
        let mut a = Latencies::default();
        let mut b = Latencies::default();
        for ms in 1..=50 {
            a.record(Duration::from_millis(ms));
        }
        for ms in 51..=100 {
            b.record(Duration::from_millis(ms));
        }
        a.merge(&b);
        assert_eq!(a.len(), 100);
        // Three significant figures: within 0.1 % of the sample.
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 1e-9;
        assert!(
            close(a.percentile_ms(50.0), 50.0),
            "{}",
            a.percentile_ms(50.0)
        );
        assert!(
            close(a.percentile_ms(99.0), 99.0),
            "{}",
            a.percentile_ms(99.0)
        );
        assert!(close(a.percentile_ms(100.0), 100.0));
        assert!(close(a.mean_ms(), 50.5));
    }

    /// Latencies outside the bounds are clamped, not lost; an empty histogram reports zeros.
    #[test]
    fn bounds() {
        let mut l = Latencies::default();
        l.record(Duration::ZERO);
        l.record(Duration::from_secs(3600));
        assert_eq!(l.len(), 2);
        assert!(l.percentile_ms(100.0) >= 599_000.0);
        let empty = Latencies::default();
        assert_eq!((empty.percentile_ms(99.0), empty.mean_ms()), (0.0, 0.0));
        let m = Measurement::new("empty", &empty, 0, Duration::ZERO);
        assert_eq!((m.calls, m.per_second), (0, 0.0));
    }

    /// `drive` runs for its duration (not the warm-up as well), records successes only and
    /// counts failures; the rate divides by the measured time.
    #[tokio::test]
    async fn duration_control() {
        let calls = Arc::new(AtomicU64::new(0));
        let counted = calls.clone();
        let driven = drive(
            3,
            Duration::from_millis(100),
            Duration::from_millis(300),
            move |_| {
                let n = counted.fetch_add(1, Ordering::Relaxed);
                async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    !n.is_multiple_of(4)
                }
            },
        )
        .await;
        assert!(driven.elapsed >= Duration::from_millis(300));
        // Generous: only that the warm-up is not part of the measured time.
        assert!(driven.elapsed < Duration::from_millis(300 + 2000));
        let recorded = driven.latencies.len() + driven.errors;
        assert!(recorded > 0 && recorded < calls.load(Ordering::Relaxed));
        assert!(driven.errors > 0);
        let m = driven.measurement("x");
        assert_eq!(m.calls, driven.latencies.len());
        assert!((m.per_second - m.calls as f64 / m.elapsed_s).abs() < 1e-9);
        assert!(m.latency_ms.p50 >= 5.0);
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
pub(super) const TICKS_PER_SECOND: f64 = 100.0;

/// What the bench reads from a process's `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy)]
pub(super) struct ProcStat {
    /// The parent's pid.
    pub(super) parent: u32,
    /// CPU time used so far, user + system, in clock ticks.
    pub(super) cpu_ticks: u64,
}

/// A process's memory as `/proc` tells it, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Memory {
    /// Resident set (`VmRSS`): private and shared pages.
    pub(super) rss: u64,
    /// Private resident pages (`RssAnon`): the heap, stacks.
    pub(super) anon: u64,
    /// File-backed resident pages (`RssFile`): mostly the binary's code, shared by every
    /// process of the same binary.
    pub(super) file: u64,
    /// Proportional set size (`Pss` of `smaps_rollup`): shared pages split among the
    /// processes that map them.
    pub(super) pss: u64,
}

/// Process `pid`'s [`Memory`]; zeros where unreadable.
pub(super) fn memory(pid: u32) -> Memory {
    let pss = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|rollup| {
            rollup.lines().find_map(|line| {
                let rest = line.strip_prefix("Pss:")?;
                rest.split_whitespace().next()?.parse().ok()
            })
        })
        .unwrap_or(0);
    Memory {
        rss: mesh_testkit::proc_status_kib(pid, "VmRSS"),
        anon: mesh_testkit::proc_status_kib(pid, "RssAnon"),
        file: mesh_testkit::proc_status_kib(pid, "RssFile"),
        pss,
    }
}

/// The children of process `parent`, each with its first argument (a `mesh up`'s children:
/// `auth`, `users`, `aggregator`).
pub(super) fn children(parent: u32) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if proc_stat(&entry.path().join("stat")).is_some_and(|s| s.parent == parent) {
            let name = std::fs::read(entry.path().join("cmdline"))
                .ok()
                .and_then(|cmdline| {
                    cmdline
                        .split(|b| *b == 0)
                        .nth(1)
                        .map(|arg| String::from_utf8_lossy(arg).into_owned())
                })
                .unwrap_or_default();
            found.push((pid, name));
        }
    }
    found.sort_by(|a, b| a.1.cmp(&b.1));
    found
}

/// The `/proc/<pid>/stat` file at `path`; `None` when unreadable (the process is gone).
pub(super) fn proc_stat(path: &std::path::Path) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(path).ok()?;
    // After the parenthesised name (which may hold spaces): state, ppid, …; utime and stime
    // are the 12th and 13th.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let number = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        parent: u32::try_from(number(1)?).ok()?,
        cpu_ticks: number(11)? + number(12)?,
    })
}
