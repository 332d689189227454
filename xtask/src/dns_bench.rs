//! `cargo xtask bench`, DNS part (`XTASK_BENCH_ONLY=dns` runs it alone): `dnsperf`
//! against a real `dnsmasq`, straight from the bench's own cgroup and from a confined
//! cgroup whose port-53 traffic the kernel redirects to enforcer's DNS proxy, which
//! forwards to the same dnsmasq; each at full load and at a paced 1,000 queries a
//! second. Rounds alternate between the setups; each figure is a median, compared with
//! the direct figures of the same run. Timings are reported, never asserted.
use std::{
    collections::BTreeMap,
    fs,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

/// The upstream's own loopback address; the DNS tests use 127.0.53.0 and above.
const DNSMASQ_ADDR: &str = "127.0.0.153";
/// Distinct names in the query file, asked in turn.
const NAMES: usize = 1000;
/// Every this-many names also get an AAAA query (dnsmasq answers ::1).
const AAAA_EVERY: usize = 10;
/// Rounds over DNS_SETUPS; each setup's figure is its median.
const DNS_ROUNDS: usize = 3;
/// How long one dnsperf run sends.
const DNS_SECS: u64 = 8;
/// dnsperf queries in flight (`-q`) from its one client (`-c 1`).
const IN_FLIGHT: u32 = 64;
/// The paced load (`-Q`): far below what either setup sustains, so its latencies are
/// the cost of one query rather than time spent queueing behind the others.
const PACED_QPS: u32 = 1000;

struct DnsSetup {
    label: &'static str,
    /// Run in the confined cgroup (through the proxy) rather than the bench's own.
    proxied: bool,
    /// `-Q`; None: as fast as IN_FLIGHT outstanding queries allow.
    qps: Option<u32>,
}

/// Run in this order in every round.
const DNS_SETUPS: [DnsSetup; 4] = [
    DnsSetup { label: "dnsmasq direct, full load", proxied: false, qps: None },
    DnsSetup { label: "through proxy, full load", proxied: true, qps: None },
    DnsSetup { label: "dnsmasq direct, 1,000 qps", proxied: false, qps: Some(PACED_QPS) },
    DnsSetup { label: "through proxy, 1,000 qps", proxied: true, qps: Some(PACED_QPS) },
];

/// A dnsmasq answering every `*.bench.test` name with 127.0.0.1 and ::1, killed on drop.
struct Dnsmasq(Child);

impl Dnsmasq {
    fn start() -> anyhow::Result<Self> {
        let child = Command::new("dnsmasq")
            .args(["--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--bind-interfaces"])
            .arg(format!("--listen-address={DNSMASQ_ADDR}"))
            .args(["--port=53", "--address=/bench.test/127.0.0.1", "--address=/bench.test/::1"])
            .args(["--user=root", "--pid-file=", "--cache-size=10000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting dnsmasq (apt install dnsmasq-base)")?;
        let mut dnsmasq = Self(child);
        let start = Instant::now();
        loop {
            let out = Command::new("dig")
                .args([&format!("@{DNSMASQ_ADDR}"), "+short", "+time=1", "+tries=1", "probe.bench.test", "A"])
                .output()
                .context("running dig (apt install bind9-dnsutils)")?;
            if String::from_utf8_lossy(&out.stdout).trim() == "127.0.0.1" {
                return Ok(dnsmasq);
            }
            if let Some(status) = dnsmasq.0.try_wait()? {
                bail!("dnsmasq on {DNSMASQ_ADDR}:53 exited: {status} (is the port taken?)");
            }
            ensure!(start.elapsed() < Duration::from_secs(5), "dnsmasq on {DNSMASQ_ADDR}:53 did not answer in 5 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One dnsperf run.
struct DnsRun {
    qps: f64,
    p50_ms: f64,
    p99_ms: f64,
    sent: u64,
    lost: u64,
    /// Response code -> answers, from dnsperf's summary.
    rcodes: BTreeMap<String, u64>,
}

/// `dnsperf` at DNSMASQ_ADDR:53 for DNS_SECS, inside `cgroup` when given (joined between
/// fork and exec, as the workers do), at most `qps` a second when given, with `-v` so
/// each answered query prints its latency.
fn dnsperf(queries: &Path, cgroup: Option<&Path>, qps: Option<u32>) -> anyhow::Result<DnsRun> {
    let mut cmd = Command::new("dnsperf");
    cmd.args(["-s", DNSMASQ_ADDR, "-p", "53", "-d"]).arg(queries).args([
        "-l",
        &DNS_SECS.to_string(),
        "-c",
        "1",
        "-q",
        &IN_FLIGHT.to_string(),
        "-v",
    ]);
    if let Some(qps) = qps {
        cmd.args(["-Q", &qps.to_string()]);
    }
    if let Some(cg) = cgroup {
        super::join_cgroup_on_exec(&mut cmd, cg)?;
    }
    let out = cmd.output().context("running dnsperf (apt install dnsperf)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "dnsperf failed: {}{}",
        text.lines().last().unwrap_or(""),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_dnsperf(&text)
}

/// Reads dnsperf 2.10's `-v` output: one `> RCODE name type seconds` line per answered
/// query (2.10 has no latency histogram option), then the statistics block.
fn parse_dnsperf(text: &str) -> anyhow::Result<DnsRun> {
    let mut latencies: Vec<f64> =
        text.lines().filter_map(|l| l.strip_prefix("> ")?.rsplit(' ').next()?.parse().ok()).collect();
    ensure!(!latencies.is_empty(), "dnsperf reported no answered query:\n{text}");
    latencies.sort_by(|a, b| a.total_cmp(b));
    let percentile =
        |p: f64| latencies[((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len()) - 1] * 1e3;
    let field = |name: &str| -> anyhow::Result<&str> {
        text.lines()
            .find_map(|l| l.trim_start().strip_prefix(name))
            .map(str::trim)
            .with_context(|| format!("no \"{name}\" in dnsperf's output"))
    };
    let first_number = |s: &str| -> anyhow::Result<u64> {
        s.split_whitespace().next().and_then(|n| n.parse().ok()).with_context(|| format!("not a count: {s}"))
    };
    // "NOERROR 75309 (90.91%), REFUSED 7530 (9.09%)"
    let mut rcodes = BTreeMap::new();
    for part in field("Response codes:")?.split(", ") {
        let mut words = part.split_whitespace();
        if let (Some(code), Some(n)) = (words.next(), words.next().and_then(|n| n.parse::<u64>().ok())) {
            rcodes.insert(code.to_string(), n);
        }
    }
    Ok(DnsRun {
        qps: field("Queries per second:")?.parse().context("queries per second")?,
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        sent: first_number(field("Queries sent:")?)?,
        lost: first_number(field("Queries lost:")?)?,
        rcodes,
    })
}

/// The policy: `*.bench.test` allowed, dnsmasq upstream, loopback answers allowed (they
/// are all the bench gets), no rate limit.
fn dns_policy() -> String {
    format!(
        "apiVersion: enforcer/v1\nkind: AgentPolicy\nmetadata:\n  name: bench-dns\nspec:\n  network:\n    allow:\n      - domain: \"*.bench.test\"\n  dns:\n    upstream: [\"{DNSMASQ_ADDR}:53\"]\n    allow_private_answers: true\n    queries_per_second: 0\n"
    )
}

/// The proxy's query counters on /metrics, by verdict.
fn proxy_queries(metrics: &str) -> BTreeMap<String, f64> {
    let out = Command::new("curl").args(["-sf", &format!("http://{metrics}/metrics")]).output();
    let body = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let mut by_verdict = BTreeMap::new();
    for line in body.lines().filter(|l| l.starts_with("enforcer_dns_queries_total{")) {
        let verdict = line.split("verdict=\"").nth(1).and_then(|v| v.split('"').next()).unwrap_or("?");
        if let Some(n) = line.rsplit(' ').next().and_then(|n| n.parse::<f64>().ok()) {
            *by_verdict.entry(verdict.to_string()).or_insert(0.0) += n;
        }
    }
    by_verdict
}

pub(super) fn dns_bench(mount: &Path) -> anyhow::Result<()> {
    crate::step(&format!(
        "bench: DNS, dnsperf straight at dnsmasq and through the proxy, {DNS_ROUNDS} x {DNS_SECS}s each"
    ));
    let dir = std::env::temp_dir().join(format!("enforcer-bench-dns-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let cgroup = mount.join(format!("enforcer-bench-dns-{}", std::process::id()));
    fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    let result = dns_bench_in(&cgroup, &dir);
    super::detach(&cgroup);
    let _ = fs::remove_dir(&cgroup);
    let _ = fs::remove_dir_all(&dir);
    result
}

fn dns_bench_in(cgroup: &Path, dir: &Path) -> anyhow::Result<()> {
    let queries = dir.join("queries.txt");
    let mut text = String::new();
    for i in 0..NAMES {
        text.push_str(&format!("n{i}.bench.test A\n"));
        if i % AAAA_EVERY == 0 {
            text.push_str(&format!("n{i}.bench.test AAAA\n"));
        }
    }
    fs::write(&queries, text)?;
    let policy = dir.join("policy.yaml");
    fs::write(&policy, dns_policy())?;
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string();

    let _dnsmasq = Dnsmasq::start()?;
    let mut controller = super::attach_with(cgroup, &policy, &["--events", "/dev/null", "--metrics-addr", &metrics])?;
    let outcome = (|| -> anyhow::Result<Vec<Vec<DnsRun>>> {
        let mut runs: Vec<Vec<DnsRun>> = DNS_SETUPS.iter().map(|_| Vec::new()).collect();
        let mut handled = 0.0;
        for round in 1..=DNS_ROUNDS {
            for (i, setup) in DNS_SETUPS.iter().enumerate() {
                crate::step(&format!("bench: DNS round {round}/{DNS_ROUNDS}: {}", setup.label));
                if !setup.proxied {
                    runs[i].push(dnsperf(&queries, None, setup.qps)?);
                    continue;
                }
                let before = proxy_queries(&metrics);
                let run = dnsperf(&queries, Some(cgroup), setup.qps)?;
                let after = proxy_queries(&metrics);
                let delta: f64 = after.iter().map(|(v, n)| n - before.get(v).copied().unwrap_or(0.0)).sum();
                // The answers look the same either way; the proxy's own counter shows the
                // queries really went through it.
                let answered = run.sent - run.lost;
                ensure!(
                    delta >= answered as f64 * 0.99,
                    "the proxy counted {delta} queries while dnsperf in the confined cgroup had {answered} \
                     answered: the port-53 redirect is not in effect"
                );
                handled += delta;
                runs[i].push(run);
            }
        }
        let verdicts = proxy_queries(&metrics);
        println!(
            "\nDNS proxy: {handled:.0} queries handled in the proxy runs; its counters by verdict: {}",
            verdicts.iter().map(|(v, n)| format!("{v} {n:.0}")).collect::<Vec<_>>().join(", ")
        );
        Ok(runs)
    })();
    super::stop_controller(&mut controller);
    report_dns(&outcome?);
    Ok(())
}

fn report_dns(runs: &[Vec<DnsRun>]) {
    struct Summary {
        qps: f64,
        p50: f64,
        p99: f64,
        sent: u64,
        lost: u64,
        rcodes: BTreeMap<String, u64>,
    }
    let summaries: Vec<Summary> = runs
        .iter()
        .map(|rs| {
            let mut rcodes = BTreeMap::new();
            for r in rs {
                for (code, n) in &r.rcodes {
                    *rcodes.entry(code.clone()).or_insert(0) += n;
                }
            }
            Summary {
                qps: super::median(rs.iter().map(|r| r.qps).collect()),
                p50: super::median(rs.iter().map(|r| r.p50_ms).collect()),
                p99: super::median(rs.iter().map(|r| r.p99_ms).collect()),
                sent: rs.iter().map(|r| r.sent).sum(),
                lost: rs.iter().map(|r| r.lost).sum(),
                rcodes,
            }
        })
        .collect();
    println!(
        "\nDNS: dnsperf -c 1 -q {IN_FLIGHT} at dnsmasq ({DNSMASQ_ADDR}:53), {NAMES} names (A, plus AAAA for every \
         {AAAA_EVERY}th), {DNS_SECS}s per run, median of {DNS_ROUNDS} interleaved rounds; lost and response codes \
         summed over the rounds:"
    );
    println!("  {:<28} {:>8} {:>8} {:>8} {:>16}  response codes", "setup", "qps", "p50 ms", "p99 ms", "lost/sent");
    for (setup, s) in DNS_SETUPS.iter().zip(&summaries) {
        println!(
            "  {:<28} {:>8.0} {:>8.3} {:>8.3} {:>16}  {}",
            setup.label,
            s.qps,
            s.p50,
            s.p99,
            format!("{}/{}", s.lost, s.sent),
            s.rcodes.iter().map(|(c, n)| format!("{c} {n}")).collect::<Vec<_>>().join(", ")
        );
    }
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let ratio = summaries[1].qps / summaries[0].qps;
    println!("\nproxy throughput / dnsmasq throughput at full load: {ratio:.2} (goal: >= 0.50): {}", met(ratio >= 0.5));
    for (direct, proxy, load) in [(0, 1, "full load, includes queueing"), (2, 3, "1,000 qps")] {
        let added = summaries[proxy].p99 - summaries[direct].p99;
        println!("proxy p99 - dnsmasq p99 at {load}: {added:+.3} ms (goal: < 1 ms): {}", met(added < 1.0));
    }
}
