//! Prometheus metrics served as text at `/metrics`. A leaf: the process's own counters
//! (sinks, DNS proxy, reloads) are recorded here by their owners, and the kernel's
//! pinned counters come from a `KernelCounters` snapshot the server's owner reads at
//! every scrape (so they survive controller restarts).
use std::{
    collections::BTreeMap,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use enforcer_common::{hook, verdict};

/// Policy reloads (SIGHUP) that were applied, and that were refused.
pub static POLICY_RELOADS: AtomicU64 = AtomicU64::new(0);
pub static POLICY_RELOAD_FAILURES: AtomicU64 = AtomicU64::new(0);

/// A sink's (written, dropped) counters.
type SinkCounters = (Arc<AtomicU64>, Arc<AtomicU64>);

fn sinks() -> &'static Mutex<BTreeMap<String, SinkCounters>> {
    static SINKS: LazyLock<Mutex<BTreeMap<String, SinkCounters>>> = LazyLock::new(Default::default);
    &SINKS
}

/// The (written, dropped) counters of the sink `name`, created on first use.
pub fn sink_counters(name: &str) -> SinkCounters {
    let mut table = sinks().lock().expect("sink counters lock");
    table.entry(name.to_string()).or_insert_with(|| (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)))).clone()
}

/// Counts an event dropped before reaching the sinks (a full internal queue), under
/// `name` in the same table as the sinks' own drops.
pub fn count_dropped(name: &str) {
    sink_counters(name).1.fetch_add(1, Ordering::Relaxed);
}

/// (sink, written, dropped) for every sink this process started.
pub fn sink_counts() -> Vec<(String, u64, u64)> {
    let table = sinks().lock().expect("sink counters lock");
    table.iter().map(|(name, (w, d))| (name.clone(), w.load(Ordering::Relaxed), d.load(Ordering::Relaxed))).collect()
}

/// The kernel's pinned counters at one moment.
#[derive(Clone, Debug, Default)]
pub struct KernelCounters {
    pub cgroups: Vec<CgroupCounters>,
    pub events_lost: u64,
    pub fail_closed: u64,
    pub files_full: u64,
}

/// One confined cgroup: its policy and the decisions of its slot, `(hook, verdict, n)`.
#[derive(Clone, Debug, Default)]
pub struct CgroupCounters {
    pub cgroup: String,
    pub policy: String,
    pub mode: String,
    pub isolated: bool,
    pub decisions: Vec<(u8, u8, u64)>,
}

/// Reads the kernel's counters at a scrape (`None` when nothing is attached).
pub type KernelSource = Arc<dyn Fn() -> Option<KernelCounters> + Send + Sync>;

/// DNS proxy outcomes. The proxy lives in this process, so these are process-wide
/// collectors, registered into every scrape's registry (unlike the kernel counters,
/// they start again at zero with the controller).
pub static DNS_QUERIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new("enforcer_dns_queries_total", "DNS proxy queries by verdict and reason"),
        &["verdict", "reason"],
    )
    .expect("valid metric")
});
pub static DNS_UPSTREAM_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::with_opts(
        HistogramOpts::new("enforcer_dns_upstream_seconds", "Time the upstream resolver took to answer")
            .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
    )
    .expect("valid metric")
});
pub static DNS_DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "enforcer_dns_dropped_packets_total",
        "Packets the DNS proxy dropped unanswered (no readable header, a response, oversize)",
    )
    .expect("valid metric")
});
static DNS_LEARNED: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    IntGaugeVec::new(Opts::new("enforcer_dns_learned_ips", "Addresses DNS answers currently hold open"), &["policy"])
        .expect("valid metric")
});

/// How many addresses DNS answers hold open for `policy` now.
pub fn set_dns_learned(policy: &str, n: usize) {
    DNS_LEARNED.with_label_values(&[policy]).set(i64::try_from(n).unwrap_or(i64::MAX));
}

/// Renders the current metrics in the Prometheus text format.
pub fn render(kernel: Option<&KernelCounters>) -> String {
    let registry = Registry::new();
    let decisions = IntCounterVec::new(
        Opts::new("enforcer_decisions_total", "Decisions by policy, hook and verdict"),
        &["policy", "hook", "verdict"],
    )
    .expect("valid metric");
    let lost = IntCounterVec::new(
        Opts::new("enforcer_events_lost_total", "Events lost: ring buffer full (kernel) or sink error"),
        &["where"],
    )
    .expect("valid metric");
    let fail_closed =
        IntCounter::new("enforcer_fail_closed_total", "Operations denied because a cgroup's policy slot was empty")
            .expect("valid metric");
    let info = IntGaugeVec::new(
        Opts::new("enforcer_policy_info", "Attached policies (value 1)"),
        &["policy", "mode", "cgroup"],
    )
    .expect("valid metric");
    let isolated = IntGaugeVec::new(
        Opts::new("enforcer_isolated", "1 while a cgroup's kill switch is on (enforcer isolate)"),
        &["cgroup"],
    )
    .expect("valid metric");
    let written = IntCounterVec::new(
        Opts::new("enforcer_events_written_total", "Events this controller's sinks wrote"),
        &["sink"],
    )
    .expect("valid metric");
    let dropped = IntCounterVec::new(
        Opts::new("enforcer_events_dropped_total", "Events a sink dropped (queue full or write error)"),
        &["sink"],
    )
    .expect("valid metric");
    registry.register(Box::new(dropped.clone())).expect("unique metric");
    let reloads = IntCounterVec::new(
        Opts::new("enforcer_policy_reloads_total", "Policy reloads (SIGHUP) by result"),
        &["result"],
    )
    .expect("valid metric");
    let build = IntGaugeVec::new(Opts::new("enforcer_build_info", "enforcer build (value 1)"), &["version"])
        .expect("valid metric");
    let files_full = IntCounter::new(
        "enforcer_file_table_full_total",
        "Paths created after attach that the kernel could not list because a file table was full",
    )
    .expect("valid metric");
    registry.register(Box::new(written.clone())).expect("unique metric");
    registry.register(Box::new(reloads.clone())).expect("unique metric");
    registry.register(Box::new(build.clone())).expect("unique metric");
    use std::sync::atomic::Ordering::Relaxed;
    let mut dropped_total = 0;
    for (sink, w, d) in sink_counts() {
        written.with_label_values(&[sink.as_str()]).inc_by(w);
        dropped.with_label_values(&[sink.as_str()]).inc_by(d);
        dropped_total += d;
    }
    reloads.with_label_values(&["ok"]).inc_by(POLICY_RELOADS.load(Relaxed));
    reloads.with_label_values(&["error"]).inc_by(POLICY_RELOAD_FAILURES.load(Relaxed));
    build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    for m in [&decisions, &lost] {
        registry.register(Box::new(m.clone())).expect("unique metric");
    }
    registry.register(Box::new(fail_closed.clone())).expect("unique metric");
    registry.register(Box::new(files_full.clone())).expect("unique metric");
    registry.register(Box::new(info.clone())).expect("unique metric");
    registry.register(Box::new(isolated.clone())).expect("unique metric");
    registry.register(Box::new(DNS_QUERIES.clone())).expect("unique metric");
    registry.register(Box::new(DNS_UPSTREAM_SECONDS.clone())).expect("unique metric");
    registry.register(Box::new(DNS_DROPPED.clone())).expect("unique metric");
    registry.register(Box::new(DNS_LEARNED.clone())).expect("unique metric");

    if let Some(kernel) = kernel {
        for c in &kernel.cgroups {
            isolated.with_label_values(&[c.cgroup.as_str()]).set(i64::from(c.isolated));
            info.with_label_values(&[c.policy.as_str(), c.mode.as_str(), c.cgroup.as_str()]).set(1);
            for &(h, v, count) in &c.decisions {
                if count > 0 || v != verdict::AUDIT_DENY {
                    decisions.with_label_values(&[c.policy.as_str(), hook::name(h), verdict::name(v)]).inc_by(count);
                }
            }
        }
        lost.with_label_values(&["kernel"]).inc_by(kernel.events_lost);
        fail_closed.inc_by(kernel.fail_closed);
        files_full.inc_by(kernel.files_full);
    } else {
        lost.with_label_values(&["kernel"]).inc_by(0);
    }
    lost.with_label_values(&["sink"]).inc_by(dropped_total);

    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out).expect("text encoding");
    String::from_utf8(out).expect("utf-8 metrics")
}

/// Serves `/metrics` until the task is dropped. A minimal HTTP/1.1 responder: one
/// request per connection, which is what Prometheus' scraper sends.
pub async fn serve(listener: tokio::net::TcpListener, kernel: KernelSource) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let kernel = kernel.clone();
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let first_line = request.split(|&b| b == b'\r').next().unwrap_or_default();
            let (status, body) = if first_line.starts_with(b"GET /metrics") {
                ("200 OK", tokio::task::spawn_blocking(move || render(kernel().as_ref())).await.unwrap_or_default())
            } else {
                ("404 Not Found", "not found: try /metrics\n".to_string())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}
