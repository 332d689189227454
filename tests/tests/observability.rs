//! Metrics as operators see them: a real Prometheus scrapes the controller, and a
//! policy reload on SIGHUP is applied or refused and counted.
use std::time::{Duration, Instant};

use enforcer_tests::*;

fn curl(url: &str) -> Option<String> {
    let out = std::process::Command::new("curl").args(["-sf", "--max-time", "2", url]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn metric(addr: &str, series: &str) -> f64 {
    let body = curl(&format!("http://{addr}/metrics")).expect("scrape /metrics");
    body.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
}

/// A Prometheus server on loopback, killed (and its data removed) on drop.
struct Prometheus {
    child: std::process::Child,
    dir: std::path::PathBuf,
    web: String,
}

impl Prometheus {
    fn scraping(target: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("enforcer-prom-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: enforcer\n    static_configs:\n      - targets: ['{target}']\n"),
        )
        .unwrap();
        let web = format!("127.0.0.1:{}", free_port());
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={web}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus is installed by `cargo xtask setup`");
        Self { child, dir, web }
    }

    /// Waits until an instant query returns a sample >= `at_least`.
    fn wait_for(&self, query: &str, at_least: f64) -> serde_json::Value {
        let url = format!(
            "http://{}/api/v1/query?query={}",
            self.web,
            query.replace('"', "%22").replace('{', "%7B").replace('}', "%7D").replace(',', "%2C")
        );
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < Duration::from_secs(60) {
            if let Some(body) = curl(&url) {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                if let Some(sample) = v["data"]["result"].as_array().and_then(|r| r.first()) {
                    let value: f64 = sample["value"][1].as_str().unwrap().parse().unwrap();
                    if value >= at_least {
                        return sample.clone();
                    }
                }
                last = body;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("Prometheus never returned {query} >= {at_least}; last answer: {last}");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_real_prometheus_scrapes_the_decision_counters() {
    let cg = TestCgroup::new("prom");
    let port = loopback_port("127.0.0.1");
    let addr = format!("127.0.0.1:{}", free_port());
    let p = policy("prom", "enforce", "    default: deny\n");
    let _c = Controller::attach(cg.arg(), &p, &["--metrics-addr", &addr]);
    let t = [format!("tcp:127.0.0.1:{port}")];
    for _ in 0..3 {
        probe_in(&cg.path, &t);
    }
    let prom = Prometheus::scraping(&addr);
    let sample = prom.wait_for(r#"enforcer_decisions_total{policy="prom",hook="connect4",verdict="deny"}"#, 3.0);
    assert_eq!(sample["metric"]["job"], "enforcer", "{sample}");
    prom.wait_for(r#"enforcer_policy_info{policy="prom",mode="enforce"}"#, 1.0);
    prom.wait_for("enforcer_build_info", 1.0);
}

#[test]
fn sighup_reloads_the_policy_and_a_bad_one_is_refused() {
    let cg = TestCgroup::new("reload");
    let port = loopback_port("127.0.0.1");
    let t = [format!("tcp:127.0.0.1:{port}")];
    let addr = format!("127.0.0.1:{}", free_port());
    let p = policy("reload", "enforce", "    default: deny\n");
    let c = Controller::attach(cg.arg(), &p, &["--metrics-addr", &addr]);
    assert_eq!(probe_in(&cg.path, &t), vec!["EPERM"]);
    let hangup =
        || nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.child.id() as i32), nix::sys::signal::Signal::SIGHUP);
    let wait_for = |series: &str, value: f64| {
        let start = Instant::now();
        while metric(&addr, series) < value {
            assert!(start.elapsed() < Duration::from_secs(10), "{series} never reached {value}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    std::fs::write(&p.0, format!("apiVersion: enforcer/v1\nkind: AgentPolicy\nmetadata:\n  name: reload\nspec:\n  network:\n    allow:\n      - ip: 127.0.0.1\n        ports: [{port}]\n")).unwrap();
    hangup().expect("SIGHUP to the controller");
    wait_for(r#"enforcer_policy_reloads_total{result="ok"}"#, 1.0);
    assert_eq!(probe_in(&cg.path, &t), vec!["ok"], "the reloaded policy is in force");

    std::fs::write(&p.0, "apiVersion: enforcer/v1\nkind: AgentPolicy\nmetadata:\n  name: reload\nspec:\n  network:\n    allow:\n      - ip: 127.0.0.1/40\n").unwrap();
    hangup().expect("SIGHUP to the controller");
    wait_for(r#"enforcer_policy_reloads_total{result="error"}"#, 1.0);
    assert_eq!(probe_in(&cg.path, &t), vec!["ok"], "a refused reload leaves the policy in force");
    let logs = c.stderr_lines.lock().unwrap().join("\n");
    assert!(logs.contains(&format!("{}:8:13: ", p.arg())), "the refusal names file:line:column: {logs}");
}

/// rsyslogd in the foreground with a UDP and a unix-socket input, each written to its
/// own file; killed (and its files removed) on drop.
struct Rsyslog {
    child: std::process::Child,
    dir: std::path::PathBuf,
    udp_port: u16,
}

impl Rsyslog {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("enforcer-rsyslog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let udp_port = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().port()
        };
        let d = dir.display();
        std::fs::write(
            dir.join("rsyslog.conf"),
            format!(
                "global(workDirectory=\"{d}\")\n\
                 module(load=\"imudp\")\n\
                 module(load=\"imuxsock\" SysSock.Use=\"off\")\n\
                 ruleset(name=\"udp\") {{ action(type=\"omfile\" file=\"{d}/udp.log\" template=\"RSYSLOG_SyslogProtocol23Format\") }}\n\
                 ruleset(name=\"unix\") {{ action(type=\"omfile\" file=\"{d}/unix.log\" template=\"RSYSLOG_SyslogProtocol23Format\") }}\n\
                 input(type=\"imudp\" address=\"127.0.0.1\" port=\"{udp_port}\" ruleset=\"udp\")\n\
                 input(type=\"imuxsock\" Socket=\"{d}/log.sock\" ruleset=\"unix\" UseSpecialParser=\"off\")\n"
            ),
        )
        .unwrap();
        let child = std::process::Command::new("rsyslogd")
            .args(["-n", "-f"])
            .arg(dir.join("rsyslog.conf"))
            .arg("-i")
            .arg(dir.join("pid"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("rsyslogd is installed by `cargo xtask setup`");
        let start = Instant::now();
        while !dir.join("log.sock").exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "rsyslogd did not open its socket");
            std::thread::sleep(Duration::from_millis(50));
        }
        // The UDP input binds on its own schedule and UDP sent before that is lost:
        // wait until a datagram makes it through.
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_log = dir.join("udp.log");
        while !std::fs::read_to_string(&udp_log).unwrap_or_default().contains("rsyslog-ready") {
            assert!(start.elapsed() < Duration::from_secs(20), "rsyslogd's UDP input never received anything");
            let _ = sender.send_to(b"<13>1 - - test - - - rsyslog-ready", ("127.0.0.1", udp_port));
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { child, dir, udp_port }
    }

    fn wait_line(&self, file: &str, needle: &str) -> String {
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            if start.elapsed() > Duration::from_secs(10) {
                let listing: Vec<_> = std::fs::read_dir(&self.dir)
                    .map(|d| d.flatten().map(|e| e.file_name()).collect())
                    .unwrap_or_default();
                panic!(
                    "no line with {needle} in {file}: {text:?}; dir {listing:?}; rsyslogd alive: {:?}",
                    std::process::Command::new("kill")
                        .arg("-0")
                        .arg(self.child.id().to_string())
                        .status()
                        .map(|s| s.success())
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn events_reach_a_real_rsyslog_over_udp_and_a_unix_socket() {
    let cg = TestCgroup::new("syslog");
    let port = loopback_port("127.0.0.1");
    let syslog = Rsyslog::start();
    let udp = format!("udp://127.0.0.1:{}", syslog.udp_port);
    let unix = format!("unix://{}", syslog.dir.join("log.sock").display());
    let p = policy("syslog", "enforce", "    default: deny\n");
    let c = Controller::attach(cg.arg(), &p, &["--syslog", &udp, "--syslog", &unix]);
    let t = [format!("tcp:127.0.0.1:{port}")];
    assert_eq!(probe_in(&cg.path, &t), vec!["EPERM"]);
    let needle = format!("\"port\":{port}");
    for file in ["udp.log", "unix.log"] {
        let line = syslog.wait_line(file, &needle);
        assert!(line.starts_with("<108>1 "), "RFC 5424, facility log-audit, severity warning: {line}");
        assert!(line.contains(" enforcer ") && line.contains(" network-connect - {"), "{line}");
    }
    // The file sink got the same event.
    c.wait_event("in the file sink too", |e| e["destination"]["port"] == port);
}
