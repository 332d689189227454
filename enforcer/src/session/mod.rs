//! A confinement at work: `attach` and `run` start the same session (confine the
//! cgroup, choose the file backend, open the event stream, start the DNS proxy and the
//! fanotify judge), then serve it (stream decisions to the sinks, reload on SIGHUP)
//! until they stop it.
pub mod backend;
pub mod confine;
pub mod spawn;
pub mod status;

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};
use tracing::{info, warn};

pub use backend::{FileBackendChoice, FileEnforcement, FileOptions};
pub use confine::{Confinement, confine, kill_switch, unconfine, update_grants};

use crate::{
    alerts::Detector,
    dns::service::DnsService,
    events::{self, Enricher},
    fanotify::Fanotify,
    metrics,
    model::{Policy, policy::Mode},
    sinks::{FanOut, Outgoing},
    state,
};

/// Pause after draining the ring, so that one wakeup reads a batch.
const READ_BATCH_PAUSE: Duration = Duration::from_millis(2);
/// Records read per wakeup at most: under a flood the reader yields between batches
/// (reloads and signals are handled meanwhile) and a full ring sheds, counted, in the
/// kernel.
const READ_BATCH: usize = 4096;

/// A confined cgroup with its event stream, DNS proxy and (on the fallback) fanotify
/// judge running.
pub struct Session {
    pub confinement: Confinement,
    mount: PathBuf,
    path: PathBuf,
    ring: RingBuf<MapData>,
    sinks: FanOut,
    fanotify: Option<Fanotify>,
    dns: Option<Arc<DnsService>>,
}

impl Session {
    /// Confines `path` with `policy` and starts everything that serves it; announces
    /// "attached" when enforcement is complete.
    pub fn start(
        mount: &Path,
        path: &Path,
        policy: &Policy,
        opts: &FileOptions,
        sinks: FanOut,
    ) -> anyhow::Result<Self> {
        let mut confinement = confine(mount, path, policy, opts)?;
        let ring = confinement.programs.take_events()?;
        let fanotify = backend::start_fanotify(
            &confinement.files,
            &confinement.display,
            confinement.id,
            Enricher::new(mount, path),
            sinks.publisher(),
        )?;
        let dns = match confinement.dns.take() {
            None => None,
            Some(listeners) => {
                let port = listeners.port;
                let service = crate::dns::service::start(
                    listeners,
                    confinement.binding,
                    policy,
                    sinks.publisher(),
                    confinement.display.clone(),
                    confinement.id,
                )?;
                info!(port, "DNS proxy serving the cgroup's DNS on 127.0.0.1 and ::1");
                Some(Arc::new(service))
            }
        };
        confinement.announce();
        Ok(Self { confinement, mount: mount.into(), path: path.into(), ring, sinks, fanotify, dns })
    }

    /// Reloads the policy file on every SIGHUP (see `reload_on_hangup`).
    pub fn reload_on_hangup(&self, file: PathBuf, mode: Option<Mode>, opts: FileOptions) {
        tokio::spawn(reload_on_hangup(
            self.mount.clone(),
            self.path.clone(),
            file,
            mode,
            opts,
            self.confinement.files.clone(),
            self.dns.clone(),
        ));
    }

    /// Streams decisions to the sinks until `stop` resolves, then stops the DNS proxy
    /// and the fanotify judge (saying so when `warn_on_stop`: enforcement outlives an
    /// attach, but those two parts do not) and lets the sinks write what they hold.
    pub async fn serve(self, stop: impl Future<Output = ()>, warn_on_stop: bool) -> anyhow::Result<Confinement> {
        let Self { confinement, mount, path, ring, sinks, fanotify, dns } = self;
        let enricher = Enricher::new(&mount, &path);
        let stop = async {
            stop.await;
            if let Some(dns) = dns {
                if warn_on_stop {
                    warn!(
                        "the DNS proxy stops with this controller: the cgroup's names stop resolving until it is back"
                    );
                }
                dns.stop();
            }
            if fanotify.is_some() && warn_on_stop {
                warn!("file rules were enforced by fanotify in this controller and stop with it");
            }
            drop(fanotify);
        };
        stream_events(ring, enricher, sinks, stop).await?;
        Ok(confinement)
    }
}

/// Reads decision events from the ring buffer and hands them to the sinks until `stop`
/// resolves; then lets the sinks write what they hold.
async fn stream_events(
    ring: RingBuf<MapData>,
    mut enricher: Enricher,
    sinks: FanOut,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // SAFETY: the RingBuf owns its fd and lives inside the AsyncFd, so the fd stays open
    // for as long as it is registered.
    let mut ring =
        unsafe { AsyncFd::register(ring) }.map_err(|e| anyhow::anyhow!("polling the events ring buffer: {e}"))?;
    let mut detector = Detector::new(state::SeenStore::in_state_dir());
    tokio::pin!(stop);
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("events ring buffer")?;
                if drain(guard.get_inner_mut(), &mut enricher, &mut detector, &sinks, READ_BATCH) {
                    guard.clear_ready();
                }
                // Let events gather: without this a busy agent wakes us once per event.
                // The ring holds about half a second at 100,000 events/s.
                tokio::time::sleep(READ_BATCH_PAUSE).await;
            }
            () = &mut stop => break,
        }
    }
    // Decisions made just before the stop are still in the ring.
    drain(ring.get_mut(), &mut enricher, &mut detector, &sinks, usize::MAX);
    sinks.finish();
    Ok(())
}

/// Reads at most `limit` records; true when the ring is empty.
fn drain(
    ring: &mut RingBuf<MapData>,
    enricher: &mut Enricher,
    detector: &mut Detector,
    sinks: &FanOut,
    limit: usize,
) -> bool {
    let default_alerts = crate::model::policy::Alerts::default();
    for _ in 0..limit {
        let Some(item) = ring.next() else { return true };
        let Some(record) = events::decode::decode(&item) else { continue };
        let event = enricher.to_event(&record);
        let slot = enricher.slot_info(record.header().slot);
        let alerts = slot.spec.as_ref().map_or(&default_alerts, |p| &p.alerts);
        for alert in detector.observe(&event, alerts, std::time::Instant::now()) {
            sinks.publish(Outgoing::new(&alert));
        }
        // Allowed decisions reach the kernel's ring for new-destination alerts too;
        // only log_allowed puts them in the sinks.
        let log_allowed = slot.spec.as_ref().is_none_or(|p| p.log_allowed);
        if record.header().verdict != enforcer_common::verdict::ALLOW || log_allowed {
            sinks.publish(Outgoing::new(&event));
        }
    }
    false
}

/// Reloads the policy file on every SIGHUP; a policy that fails to parse or compile is
/// refused with its file:line:column and the one in force stays.
async fn reload_on_hangup(
    mount: PathBuf,
    path: PathBuf,
    file: PathBuf,
    mode: Option<Mode>,
    opts: FileOptions,
    files: Arc<FileEnforcement>,
    dns: Option<Arc<DnsService>>,
) {
    let Ok(mut hup) = tokio::signal::unix::signal(SignalKind::hangup()) else { return };
    while hup.recv().await.is_some() {
        let result = confine::reload_policy(&file, mode)
            .and_then(|policy| confine::reinstall(&mount, &path, &policy, &opts, &files, dns.as_deref()));
        match result {
            Ok(slot) => {
                metrics::POLICY_RELOADS.fetch_add(1, Ordering::Relaxed);
                info!(policy = %file.display(), slot, "policy reloaded");
            }
            Err(e) => {
                metrics::POLICY_RELOAD_FAILURES.fetch_add(1, Ordering::Relaxed);
                tracing::error!("policy reload refused, the previous policy stays in force: {e:#}");
            }
        }
    }
}

/// SIGTERM or SIGINT.
pub async fn terminated() {
    let mut term = tokio::signal::unix::signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
}

/// Serves `/metrics` at `addr`, with the kernel's counters read at every scrape.
pub async fn start_metrics(addr: Option<&str>) -> anyhow::Result<()> {
    if let Some(addr) = addr {
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening for metrics on {addr}"))?;
        info!(addr = %listener.local_addr()?, "serving metrics at /metrics");
        tokio::spawn(metrics::serve(listener, Arc::new(status::kernel_counters)));
    }
    Ok(())
}
