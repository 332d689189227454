//! Event fan-out: each sink runs on its own thread behind a bounded queue, so a slow or
//! dead sink never stalls the ring-buffer reader or the other sinks; what a full queue
//! or a failed write drops is counted per sink. Sinks: the event `Sink` (stdout, stderr
//! or a hash-chained file) and syslog (RFC 5424 over UDP or a unix datagram socket).
use std::{
    collections::BTreeMap,
    io,
    net::UdpSocket,
    os::unix::net::UnixDatagram,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, SyncSender, TrySendError},
    },
    thread,
};

use serde_json::Value;

use crate::events::Sink;

/// One event for the sinks: serialized once on the reader thread and shared, with the
/// few fields a syslog header needs.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub json: Arc<Vec<u8>>,
    pub timestamp: Arc<str>,
    pub action: Arc<str>,
    pub denied: bool,
}

impl Outgoing {
    pub fn new(event: &Value) -> Self {
        let text = |ptr: &str| -> Arc<str> { event.pointer(ptr).and_then(Value::as_str).unwrap_or("-").into() };
        Self {
            json: Arc::new(serde_json::to_vec(event).expect("serializable")),
            timestamp: text("/@timestamp"),
            action: text("/event/action"),
            denied: event.pointer("/event/type/0").and_then(Value::as_str) == Some("denied"),
        }
    }
}

/// Events a sink may have queued before new ones are dropped (and counted).
pub const QUEUE_DEPTH: usize = 65_536;

/// A sink's (written, dropped) counters.
type SinkCounters = (Arc<AtomicU64>, Arc<AtomicU64>);

/// Per-sink counters by sink name, for metrics.
fn counters() -> &'static Mutex<BTreeMap<String, SinkCounters>> {
    static COUNTERS: OnceLock<Mutex<BTreeMap<String, SinkCounters>>> = OnceLock::new();
    COUNTERS.get_or_init(Default::default)
}

/// (sink, written, dropped) for every sink this process started.
pub fn sink_counts() -> Vec<(String, u64, u64)> {
    counters()
        .lock()
        .expect("counters lock")
        .iter()
        .map(|(name, (w, d))| (name.clone(), w.load(Ordering::Relaxed), d.load(Ordering::Relaxed)))
        .collect()
}

/// Counts an event dropped before reaching the sinks (a full internal queue), under
/// `name` in the same table as the sinks' own drops.
pub fn count_dropped(name: &str) {
    let mut table = counters().lock().expect("counters lock");
    let entry =
        table.entry(name.to_string()).or_insert_with(|| (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))));
    entry.1.fetch_add(1, Ordering::Relaxed);
}

/// Where syslog messages go.
#[derive(Clone, Debug)]
pub enum SyslogTarget {
    Udp(std::net::SocketAddr),
    Unix(std::path::PathBuf),
}

impl std::str::FromStr for SyslogTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(addr) = s.strip_prefix("udp://") {
            return addr.parse().map(Self::Udp).map_err(|e| format!("{s:?}: {e} (expected udp://HOST:PORT)"));
        }
        if let Some(path) = s.strip_prefix("unix://") {
            return Ok(Self::Unix(path.into()));
        }
        Err(format!("{s:?}: expected udp://HOST:PORT or unix:///PATH (e.g. unix:///dev/log)"))
    }
}

/// RFC 5424: facility 13 (log audit); denials at severity warning, the rest notice.
/// The JSON event is the message.
pub fn rfc5424(event: &Outgoing, host: &str) -> Vec<u8> {
    let pri = 13 * 8 + if event.denied { 4 } else { 5 };
    // RFC 5424 allows at most 6 fractional digits; ours has 9.
    let timestamp = match event.timestamp.split_once('.') {
        Some((secs, frac)) if frac.len() > 7 => format!("{secs}.{}Z", &frac[..6]),
        _ => event.timestamp.to_string(),
    };
    let host = if host.is_empty() { "-" } else { host };
    let mut line =
        format!("<{pri}>1 {timestamp} {host} enforcer {} {} - ", std::process::id(), event.action).into_bytes();
    line.extend_from_slice(&event.json);
    line
}

enum Transport {
    Udp(UdpSocket, std::net::SocketAddr),
    Unix(UnixDatagram, std::path::PathBuf),
}

impl Transport {
    fn open(target: &SyslogTarget) -> io::Result<Self> {
        Ok(match target {
            SyslogTarget::Udp(addr) => {
                let local = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
                Self::Udp(UdpSocket::bind(local)?, *addr)
            }
            SyslogTarget::Unix(path) => Self::Unix(UnixDatagram::unbound()?, path.clone()),
        })
    }

    fn send(&self, line: &[u8]) -> io::Result<()> {
        match self {
            Self::Udp(sock, addr) => sock.send_to(line, addr).map(|_| ()),
            Self::Unix(sock, path) => sock.send_to(line, path).map(|_| ()),
        }
    }
}

/// The running sinks.
pub struct FanOut {
    queues: Vec<(SyncSender<Outgoing>, Arc<AtomicU64>)>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl FanOut {
    pub fn new() -> Self {
        Self { queues: Vec::new(), threads: Vec::new() }
    }

    /// Runs `write` for every queued event and `flush` whenever the queue runs dry, so
    /// a burst is written in large blocks and a quiet stream still reaches the disk.
    fn spawn(
        &mut self,
        name: String,
        mut write: impl FnMut(Outgoing) -> io::Result<()> + Send + 'static,
        mut flush: impl FnMut() -> io::Result<()> + Send + 'static,
    ) {
        let written = Arc::new(AtomicU64::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        counters().lock().expect("counters lock").insert(name.clone(), (written.clone(), dropped.clone()));
        let (tx, rx) = mpsc::sync_channel::<Outgoing>(QUEUE_DEPTH);
        let dropped_on_error = dropped.clone();
        let thread = thread::Builder::new()
            .name(format!("sink-{name}"))
            .spawn(move || {
                let record = |result: io::Result<()>| match result {
                    Ok(()) => written.fetch_add(1, Ordering::Relaxed),
                    Err(_) => dropped_on_error.fetch_add(1, Ordering::Relaxed),
                };
                while let Ok(event) = rx.recv() {
                    record(write(event));
                    while let Ok(event) = rx.try_recv() {
                        record(write(event));
                    }
                    let _ = flush();
                }
            })
            .expect("spawn sink thread");
        self.queues.push((tx, dropped));
        self.threads.push(thread);
    }

    pub fn add_event_sink(&mut self, name: &str, sink: Sink) {
        let sink = Arc::new(Mutex::new(sink));
        let flushing = sink.clone();
        self.spawn(
            name.to_string(),
            move |event| sink.lock().expect("sink lock").write_event(&event),
            move || flushing.lock().expect("sink lock").flush(),
        );
    }

    pub fn add_syslog(&mut self, target: &SyslogTarget, host: String) -> io::Result<()> {
        let transport = Transport::open(target)?;
        let name = match target {
            SyslogTarget::Udp(a) => format!("syslog-udp:{a}"),
            SyslogTarget::Unix(p) => format!("syslog-unix:{}", p.display()),
        };
        self.spawn(name, move |event| transport.send(&rfc5424(&event, &host)), || Ok(()));
        Ok(())
    }

    /// A handle that queues events from another thread (the fanotify backend). Drop it
    /// before `finish`, which waits for the queues to close.
    pub fn publisher(&self) -> Publisher {
        Publisher(self.queues.clone())
    }

    /// Queues an event for every sink; never blocks.
    pub fn publish(&self, event: Outgoing) {
        publish_to(&self.queues, event)
    }
}

#[derive(Clone)]
pub struct Publisher(Vec<(SyncSender<Outgoing>, Arc<AtomicU64>)>);

impl Publisher {
    pub fn publish(&self, event: Outgoing) {
        publish_to(&self.0, event)
    }
}

fn publish_to(queues: &[(SyncSender<Outgoing>, Arc<AtomicU64>)], event: Outgoing) {
    {
        let Some(((last_tx, last_dropped), rest)) = queues.split_last() else { return };
        for (tx, dropped) in rest {
            if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(event.clone()) {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        if last_tx.try_send(event).is_err() {
            last_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl FanOut {
    /// Lets the sinks write what is queued, then stops them.
    pub fn finish(self) {
        drop(self.queues);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

impl Default for FanOut {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn formats_rfc5424_with_audit_facility_and_severity_by_verdict() {
        let denied = json!({"@timestamp": "2026-11-23T06:00:00.000000001Z", "event": {"action": "network-connect", "type": ["denied"]}});
        let line = String::from_utf8(rfc5424(&Outgoing::new(&denied), "vm")).unwrap();
        assert!(line.starts_with("<108>1 2026-11-23T06:00:00.000000Z vm enforcer "), "{line}");
        assert!(line.contains(" network-connect - {"), "{line}");
        let allowed = json!({"event": {"action": "network-sendmsg", "type": ["allowed"]}});
        assert!(String::from_utf8(rfc5424(&Outgoing::new(&allowed), "")).unwrap().starts_with("<109>1 - - enforcer "));
    }

    #[test]
    fn parses_syslog_targets() {
        assert!(matches!("udp://127.0.0.1:514".parse(), Ok(SyslogTarget::Udp(_))));
        assert!(
            matches!("unix:///dev/log".parse(), Ok(SyslogTarget::Unix(p)) if p == std::path::Path::new("/dev/log"))
        );
        assert!("tcp://x:1".parse::<SyslogTarget>().is_err());
    }

    #[test]
    fn a_stuck_sink_drops_and_counts_without_blocking_the_others() {
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let fast_seen = Arc::new(AtomicU64::new(0));
        let seen = fast_seen.clone();
        let mut fan = FanOut::new();
        // The stuck sink blocks on its first event until released.
        let release = Mutex::new(Some(release_rx));
        fan.spawn(
            "stuck-test".into(),
            move |_| {
                if let Some(rx) = release.lock().unwrap().take() {
                    let _ = rx.recv();
                }
                Ok(())
            },
            || Ok(()),
        );
        fan.spawn(
            "fast-test".into(),
            move |_| {
                seen.fetch_add(1, Ordering::Relaxed);
                Ok(())
            },
            || Ok(()),
        );
        let total = QUEUE_DEPTH as u64 + 1_000;
        for i in 0..total {
            fan.publish(Outgoing::new(&json!({ "i": i })));
        }
        let _ = release_tx.send(());
        fan.finish();
        assert_eq!(fast_seen.load(Ordering::Relaxed), total, "the fast sink got every event");
        let counts = sink_counts();
        let (_, written, dropped) = counts.iter().find(|(n, ..)| n == "stuck-test").unwrap();
        assert_eq!(written + dropped, total, "every event is either written or counted as dropped");
        assert!(*dropped >= 999, "the stuck sink's full queue dropped events: {dropped}");
    }
}
