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

#[derive(Default)]
pub(crate) struct Counters {
    pub requests: AtomicU64,
    pub streams_started: AtomicU64,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub active: AtomicU64,
    pub waiting: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    ttft_buckets: [AtomicU64; TTFT_BUCKETS.len() + 1],
    ttft_sum_nanos: AtomicU64,
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
        let secs = ttft.as_secs_f64();
        let i = TTFT_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(TTFT_BUCKETS.len());
        self.ttft_buckets[i].fetch_add(1, Relaxed);
        self.ttft_sum_nanos
            .fetch_add(ttft.as_nanos().min(u128::from(u64::MAX)) as u64, Relaxed);
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
    let name = "vllm:time_to_first_token_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Histogram of time to first token in seconds.\n# TYPE {name} histogram"
    );
    let mut cumulative = 0;
    for (i, bound) in TTFT_BUCKETS.iter().enumerate() {
        cumulative += c.ttft_buckets[i].load(Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{bound:?}\",model_name=\"{model}\"}} {cumulative}"
        );
    }
    cumulative += c.ttft_buckets[TTFT_BUCKETS.len()].load(Relaxed);
    let sum = c.ttft_sum_nanos.load(Relaxed) as f64 / 1e9;
    let _ = writeln!(
        out,
        "{name}_bucket{{le=\"+Inf\",model_name=\"{model}\"}} {cumulative}\n\
         {name}_sum{{model_name=\"{model}\"}} {sum:?}\n\
         {name}_count{{model_name=\"{model}\"}} {cumulative}"
    );
    out
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
