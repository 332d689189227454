//! Prometheus metrics, read from the pinned kernel counters at every scrape (so they
//! survive controller restarts), served as text at `/metrics`.
use std::sync::LazyLock;

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::loader::{self, Tables};
use enforcer_common::{counter, hook, verdict};

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
pub fn render() -> String {
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
    for (sink, w, d) in crate::sinks::sink_counts() {
        written.with_label_values(&[sink.as_str()]).inc_by(w);
        dropped.with_label_values(&[sink.as_str()]).inc_by(d);
        dropped_total += d;
    }
    reloads.with_label_values(&["ok"]).inc_by(crate::POLICY_RELOADS.load(Relaxed));
    reloads.with_label_values(&["error"]).inc_by(crate::POLICY_RELOAD_FAILURES.load(Relaxed));
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

    if let Ok(tables) = Tables::open_pinned() {
        for (cgroup_id, slot) in tables.confined() {
            let Some(config) = tables.config(slot) else { continue };
            let slot_info = loader::read_slot_info(slot).unwrap_or_default();
            isolated.with_label_values(&[slot_info.cgroup.as_str()]).set(tables.is_isolated(cgroup_id) as i64);
            let name = config.name_str().to_string();
            info.with_label_values(&[name.as_str(), slot_info.mode.as_str(), slot_info.cgroup.as_str()]).set(1);
            for (h, v, count) in tables.decisions(slot) {
                if count > 0 || v != verdict::AUDIT_DENY {
                    decisions.with_label_values(&[name.as_str(), hook::name(h), verdict::name(v)]).inc_by(count);
                }
            }
        }
        lost.with_label_values(&["kernel"]).inc_by(tables.counter(counter::EVENTS_LOST));
        fail_closed.inc_by(tables.counter(counter::MISSING_POLICY));
        files_full.inc_by(tables.counter(counter::FILES_FULL));
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
pub async fn serve(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
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
                ("200 OK", tokio::task::spawn_blocking(render).await.unwrap_or_default())
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
