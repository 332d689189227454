//! Event fan-out: each sink runs on its own thread behind a bounded queue, so a slow or
//! dead sink never stalls the ring-buffer reader or the other sinks; what a full queue
//! or a failed write drops is counted per sink (in `metrics`). Sinks: an `output::Sink`
//! (stdout, stderr or a hash-chained file, see `chain`) and syslog (RFC 5424 over UDP
//! or a unix datagram socket).
pub mod chain;
pub mod output;
pub mod syslog;

use std::{
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, SyncSender, TrySendError},
    },
    thread,
};

use crate::{events::Event, metrics};

pub use output::{Rotation, Sink};
pub use syslog::SyslogTarget;

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
    /// Serializes the event: the one serialization every sink shares.
    pub fn new(event: &Event) -> Self {
        Self {
            json: Arc::new(serde_json::to_vec(event).expect("an Event serializes")),
            timestamp: event.timestamp.as_str().into(),
            action: event.event.action.as_str().into(),
            denied: event.event.is_denied(),
        }
    }
}

/// Events a sink may have queued before new ones are dropped (and counted).
pub const QUEUE_DEPTH: usize = 65_536;

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
        let (written, dropped) = metrics::sink_counters(&name);
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
        let transport = syslog::Transport::open(target)?;
        self.spawn(target.sink_name(), move |event| transport.send(&syslog::rfc5424(&event, &host)), || Ok(()));
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
        let event = Outgoing::new(&Event::default());
        for _ in 0..total {
            fan.publish(event.clone());
        }
        let _ = release_tx.send(());
        fan.finish();
        assert_eq!(fast_seen.load(Ordering::Relaxed), total, "the fast sink got every event");
        let counts = metrics::sink_counts();
        let (_, written, dropped) = counts.iter().find(|(n, ..)| n == "stuck-test").unwrap();
        assert_eq!(written + dropped, total, "every event is either written or counted as dropped");
        assert!(*dropped >= 999, "the stuck sink's full queue dropped events: {dropped}");
    }
}
