//! One message to many server streams, timed from its sending to its arrival at each: the
//! rounds of `watch`, against the aggregator's WatchProfiles and against the bare echo's
//! broadcast alike, and the CPU each side spent on them (so a load generator at its own limit
//! is told from a slow server).

use std::{
    future::Future,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;
use tokio_stream::StreamExt as _;

use super::{
    BenchError,
    fixtures::setup,
    measure::{Latencies, TICKS_PER_SECOND, proc_stat},
};

/// CPU time (user + system) process `pid` has used so far, in seconds; 0 when unreadable.
pub(super) fn cpu_seconds(pid: u32) -> f64 {
    proc_stat(std::path::Path::new(&format!("/proc/{pid}/stat"))).map_or(0, |s| s.cpu_ticks) as f64
        / TICKS_PER_SECOND
}

/// Write system calls process `pid` has made so far (`syscw` of `/proc/<pid>/io`); 0 when
/// unreadable.
pub(super) fn write_calls(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|line| line.strip_prefix("syscw:")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// CPU the server and the load generator (this process) used while a round was delivered.
#[derive(Debug, Clone, Default)]
pub(super) struct CpuShare {
    /// Wall-clock seconds from the first timed message sent to the last received.
    pub(super) wall_s: f64,
    /// The server process's CPU seconds in that time.
    pub(super) server_s: f64,
    /// This process's CPU seconds in that time.
    pub(super) load_s: f64,
    /// The server's write system calls in that time.
    pub(super) server_writes: u64,
    /// For each message (the untimed first one too), milliseconds from its sending until the
    /// last stream had it.
    pub(super) all_in_ms: Vec<f64>,
}

impl CpuShare {
    /// The server's CPU as cores busy on average.
    pub(super) fn server_cores(&self) -> f64 {
        self.server_s / self.wall_s.max(1e-9)
    }

    /// The load generator's CPU as cores busy on average.
    pub(super) fn load_cores(&self) -> f64 {
        self.load_s / self.wall_s.max(1e-9)
    }

    /// [`Self::all_in_ms`] as text: `12 (first, untimed), 9.5, 10 ms`.
    pub(super) fn all_in(&self) -> String {
        let each: Vec<String> = self.all_in_ms.iter().map(|ms| format!("{ms:.1}")).collect();
        match each.split_first() {
            Some((first, rest)) => format!("{first} (first, untimed), {} ms", rest.join(", ")),
            None => "nothing".into(),
        }
    }
}

/// One round: a first message, then `events` more, each sent once the last has reached all
/// `total` streams, and the time from each of the `events` to each stream. The first one is
/// not timed, on either side: the first message after streams open pays for the buffers and
/// wake-ups every later one finds ready (a bare tonic broadcast takes several times longer for
/// it than for the next), and the goals are about a change to subscribers that are already
/// listening. Its time to the last stream is reported apart ([`CpuShare::all_in_ms`]).
pub(super) struct Round {
    total: usize,
    sent_at: Arc<Vec<OnceLock<Instant>>>,
    received: Arc<AtomicUsize>,
    all_in: Arc<Notify>,
}

impl Round {
    pub(super) fn new(events: usize, total: usize) -> Self {
        Self {
            total,
            sent_at: Arc::new((0..=events).map(|_| OnceLock::new()).collect()),
            received: Arc::new(AtomicUsize::new(0)),
            all_in: Arc::new(Notify::new()),
        }
    }

    /// Reads the round's messages from `stream`, timing each: `tag`, the latencies and the
    /// stream itself, once the stream has had them all (or ended). The stream is handed back
    /// open, so that no stream closes while others still wait for the last message.
    pub(super) fn follow<M, T>(
        &self,
        mut stream: tonic::Streaming<M>,
        tag: T,
    ) -> tokio::task::JoinHandle<(T, Latencies, tonic::Streaming<M>)>
    where
        M: prost::Message + Default + Send + 'static,
        T: Send + 'static,
    {
        let (total, received, all_in, sent_at) = (
            self.total,
            self.received.clone(),
            self.all_in.clone(),
            self.sent_at.clone(),
        );
        tokio::spawn(async move {
            let mut latencies = Latencies::default();
            for (k, sent) in sent_at.iter().enumerate() {
                let Some(Ok(_)) = stream.next().await else {
                    break;
                };
                if let Some(at) = sent.get()
                    && k > 0
                {
                    latencies.record(at.elapsed());
                }
                if received.fetch_add(1, Ordering::SeqCst) + 1 == total * (k + 1) {
                    all_in.notify_one();
                }
            }
            (tag, latencies, stream)
        })
    }

    /// Sends the round's messages with `publish(k)`, each once the last has reached every
    /// stream (60 s at most), and the CPU `server_pid` and this process spent meanwhile.
    pub(super) async fn send<F, Fut>(
        &self,
        what: &str,
        server_pid: u32,
        mut publish: F,
    ) -> Result<CpuShare, BenchError>
    where
        F: FnMut(usize) -> Fut,
        Fut: Future<Output = Result<(), BenchError>>,
    {
        let total = self.total;
        let own = std::process::id();
        let (mut server_before, mut load_before, mut writes_before) = (0.0, 0.0, 0);
        let mut started = Instant::now();
        let mut all_in_ms = Vec::with_capacity(self.sent_at.len());
        for (k, slot) in self.sent_at.iter().enumerate() {
            if k == 1 {
                (server_before, load_before) = (cpu_seconds(server_pid), cpu_seconds(own));
                writes_before = write_calls(server_pid);
                started = Instant::now();
            }
            let sent = Instant::now();
            let _ = slot.set(sent);
            publish(k).await?;
            tokio::time::timeout(Duration::from_secs(60), async {
                while self.received.load(Ordering::SeqCst) < total * (k + 1) {
                    self.all_in.notified().await;
                }
            })
            .await
            .map_err(|_| {
                setup(format!(
                    "message {k} {what}: only {} of {total} streams got it within 60 s",
                    self.received.load(Ordering::SeqCst) - total * k
                ))
            })?;
            all_in_ms.push(sent.elapsed().as_secs_f64() * 1000.0);
        }
        Ok(CpuShare {
            all_in_ms,
            wall_s: started.elapsed().as_secs_f64(),
            server_s: cpu_seconds(server_pid) - server_before,
            load_s: cpu_seconds(own) - load_before,
            server_writes: write_calls(server_pid).saturating_sub(writes_before),
        })
    }
}
