//! The simulator's own counters, the request tracker that keeps them honest, and `/metrics`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::Semaphore;

use super::SimStats;
use super::config::SimConfig;

/// vLLM's `vllm:time_to_first_token_seconds` buckets.
const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// vLLM's `vllm:inter_token_latency_seconds` buckets.
const ITL_BUCKETS: [f64; 23] = [
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];

/// A histogram of atomics with fixed bounds, rendered in the Prometheus text format.
pub(crate) struct AtomicHistogram {
    bounds: &'static [f64],
    /// One count per bound, then the `+Inf` overflow.
    buckets: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    fn new(bounds: &'static [f64]) -> Self {
        AtomicHistogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str, model: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound:?}\",model_name=\"{model}\"}} {cumulative}"
            );
        }
        cumulative += self.buckets[self.bounds.len()].load(Relaxed);
        let sum = self.sum_nanos.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\",model_name=\"{model}\"}} {cumulative}\n\
             {name}_sum{{model_name=\"{model}\"}} {sum:?}\n\
             {name}_count{{model_name=\"{model}\"}} {cumulative}"
        );
    }
}

/// State shared by every connection of one simulator.
pub(crate) struct Shared {
    pub config: SimConfig,
    /// One permit per running sequence (`timing.max_num_seqs`).
    pub seqs: Arc<Semaphore>,
    pub counters: Counters,
    /// `created` of `/v1/models` entries.
    pub started_unix: u64,
}

impl Shared {
    pub fn new(config: SimConfig) -> Arc<Shared> {
        let started_unix = match config.seed {
            Some(_) => super::SEEDED_CREATED,
            None => super::unix_now(),
        };
        Arc::new(Shared {
            seqs: Arc::new(Semaphore::new(config.timing.max_num_seqs as usize)),
            config,
            counters: Counters::default(),
            started_unix,
        })
    }

    /// Sequences holding a slot right now.
    pub fn running(&self) -> u64 {
        let max = self.config.timing.max_num_seqs as usize;
        max.saturating_sub(self.seqs.available_permits()) as u64
    }
}

pub(crate) struct Counters {
    pub requests: AtomicU64,
    pub streams_started: AtomicU64,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub active: AtomicU64,
    pub waiting: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    ttft: AtomicHistogram,
    /// Gaps between consecutive streamed chunks of a response.
    pub itl: AtomicHistogram,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            requests: AtomicU64::new(0),
            streams_started: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            active: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            ttft: AtomicHistogram::new(&TTFT_BUCKETS),
            itl: AtomicHistogram::new(&ITL_BUCKETS),
        }
    }
}

impl Counters {
    pub fn snapshot(&self) -> SimStats {
        SimStats {
            requests: self.requests.load(Relaxed),
            streams_started: self.streams_started.load(Relaxed),
            completed: self.completed.load(Relaxed),
            cancelled: self.cancelled.load(Relaxed),
            active: self.active.load(Relaxed),
        }
    }

    pub fn observe_ttft(&self, ttft: Duration) {
        self.ttft.observe(ttft);
    }
}

/// Accounts one generation response: `active` while it lives; on drop, `completed` if it
/// reached its end, otherwise `cancelled` (the client went away) with a log line.
pub(crate) struct Tracker {
    shared: Arc<Shared>,
    what: &'static str,
    id: String,
    done: bool,
}

impl Tracker {
    pub fn new(shared: Arc<Shared>, what: &'static str, id: String) -> Tracker {
        shared.counters.active.fetch_add(1, Relaxed);
        Tracker {
            shared,
            what,
            id,
            done: false,
        }
    }

    /// The response reached its planned end (normally or with an injected fault).
    pub fn complete(&mut self) {
        if !self.done {
            self.done = true;
            self.shared.counters.completed.fetch_add(1, Relaxed);
        }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.shared.counters.active.fetch_sub(1, Relaxed);
        if !self.done {
            self.shared.counters.cancelled.fetch_add(1, Relaxed);
            tracing::info!(
                id = %self.id,
                response = self.what,
                "simulated request cancelled: client went away"
            );
        }
    }
}

/// Counts a request in `waiting` until it gets a sequence slot or goes away.
pub(crate) struct WaitingGuard(pub Arc<Shared>);

impl WaitingGuard {
    pub fn new(shared: Arc<Shared>) -> WaitingGuard {
        shared.counters.waiting.fetch_add(1, Relaxed);
        WaitingGuard(shared)
    }
}

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.0.counters.waiting.fetch_sub(1, Relaxed);
    }
}

/// Prometheus text exposition of the simulator counters and a few `vllm:` metrics.
pub(crate) fn render(shared: &Shared) -> String {
    let c = &shared.counters;
    let mut out = String::with_capacity(4096);
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "tokentap_sim_requests_total",
        "counter",
        "Generation and embedding requests received.",
        c.requests.load(Relaxed),
    );
    metric(
        "tokentap_sim_streams_started_total",
        "counter",
        "Streaming responses started.",
        c.streams_started.load(Relaxed),
    );
    metric(
        "tokentap_sim_completed_total",
        "counter",
        "Responses that reached their end.",
        c.completed.load(Relaxed),
    );
    metric(
        "tokentap_sim_cancelled_total",
        "counter",
        "Responses whose client went away before the end.",
        c.cancelled.load(Relaxed),
    );
    metric(
        "tokentap_sim_active_streams",
        "gauge",
        "Responses in progress (queued or generating).",
        c.active.load(Relaxed),
    );
    let model = escape_label(&shared.config.models[0]);
    let mut labelled = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{model_name=\"{model}\"}} {value}"
        );
    };
    labelled(
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
        shared.running(),
    );
    labelled(
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
        c.waiting.load(Relaxed),
    );
    labelled(
        "vllm:prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed.",
        c.prompt_tokens.load(Relaxed),
    );
    labelled(
        "vllm:generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
        c.generation_tokens.load(Relaxed),
    );
    c.ttft.render(
        &mut out,
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &model,
    );
    c.itl.render(
        &mut out,
        "vllm:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        &model,
    );
    out
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
