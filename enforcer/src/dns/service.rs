//! The controller's side of DNS-aware egress: the proxy's loopback sockets, the
//! addresses its answers open in the kernel (`ENF_LEARN4/6`), and its events.
//!
//! Learned addresses are kept per *binding*, not per policy slot: a reload or a grant
//! writes a new slot, and the addresses an agent already resolved must stay open for
//! the TTL it was given. Every learned clause carries its expiry, which the kernel
//! checks, so an address closes on time even when no controller is running.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, UdpSocket},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use enforcer_common::{Clause, LearnedClauses, limits};

use super::{DnsDecision, DnsVerdict, DomainMatch, Opener, Proxy, ProxyRules};
use crate::{
    bpf::LearnedTables,
    events::{Category, Cgroup, Dns, DnsQuestion, Enforcer, Event, EventInfo, Host, Network, PolicyRef, Rule},
    host::{self, boot_now_ns},
    metrics,
    model::{
        compile::{domain_rule_id, learned_clauses},
        policy::{DomainRule, Mode, Policy},
    },
    sinks::{Outgoing, Publisher},
};

/// The proxy's sockets: UDP and TCP on 127.0.0.1 and ::1, all on one port, which the
/// kernel programs send the cgroup's DNS to.
pub struct DnsListeners {
    pub port: u16,
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
}

/// Binds the proxy's sockets on a free loopback port. IPv6 loopback is optional (a host
/// may have IPv6 off); IPv4 is not.
pub fn bind_listeners() -> anyhow::Result<DnsListeners> {
    let mut last_error = None;
    for _ in 0..32 {
        let udp4 = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the DNS proxy on 127.0.0.1")?;
        let port = udp4.local_addr()?.port();
        let tcp4 = match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            Ok(t) => t,
            Err(e) => {
                last_error = Some(e);
                continue;
            }
        };
        let mut listeners = DnsListeners { port, udp: vec![udp4], tcp: vec![tcp4] };
        match (UdpSocket::bind((Ipv6Addr::LOCALHOST, port)), TcpListener::bind((Ipv6Addr::LOCALHOST, port))) {
            (Ok(u), Ok(t)) => {
                listeners.udp.push(u);
                listeners.tcp.push(t);
            }
            (Err(e), _) | (_, Err(e)) if e.kind() == std::io::ErrorKind::AddrInUse => {
                last_error = Some(e);
                continue;
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!("DNS proxy: no IPv6 loopback ({e}); DNS the agent sends over IPv6 will fail");
            }
        }
        return Ok(listeners);
    }
    Err(anyhow::anyhow!("no loopback port free for the DNS proxy on both TCP and UDP: {last_error:?}"))
}

/// The proxy's view of a policy: its domain rules with their kernel rule ids, and the
/// DNS settings with the upstream filled in.
pub fn proxy_rules(policy: &Policy) -> anyhow::Result<ProxyRules> {
    let mut settings = policy.dns.clone().unwrap_or_default();
    if settings.upstream.is_empty() {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        settings.upstream = super::resolv_conf_servers(&text);
        if settings.upstream.is_empty() {
            anyhow::bail!("the policy names no dns.upstream and /etc/resolv.conf lists no nameserver");
        }
    }
    let domains = policy
        .network
        .domains
        .iter()
        .enumerate()
        .map(|(i, d)| DomainMatch {
            rule_id: domain_rule_id(i),
            rule_name: d.name.clone(),
            action: d.action,
            pattern: d.pattern.clone(),
        })
        .collect();
    Ok(ProxyRules { policy: policy.name.clone(), domains, settings, audit: policy.mode == Mode::Audit })
}

/// What the opener needs of the policy in force.
struct PolicyView {
    name: String,
    mode: Mode,
    /// Allowed queries are events only with `audit.log_allowed`, as allowed connects are.
    log_allowed: bool,
    domains: Vec<DomainRule>,
}

impl PolicyView {
    fn of(policy: &Policy) -> Self {
        Self {
            name: policy.name.clone(),
            mode: policy.mode,
            log_allowed: policy.log_allowed,
            domains: policy.network.domains.clone(),
        }
    }
}

/// Learned addresses stay open this long past the TTL the agent was given: resolvers
/// count TTLs in whole seconds, and a popular name answered again within the grace
/// needs no new kernel write.
pub const EXPIRY_GRACE: Duration = Duration::from_secs(1);

/// Writes answers' addresses into the kernel and reports each query as an event.
pub struct KernelOpener {
    binding: u32,
    view: RwLock<PolicyView>,
    tables: Mutex<LearnedTables>,
    /// (address, rule) -> the expiry last written to the kernel: a popular name is
    /// answered many times within its TTL, and the kernel needs writing only when an
    /// answer would outlive what is there. Cleared at every sweep and reload.
    written: Mutex<HashMap<(IpAddr, u16), u64>>,
    /// Taken at shutdown: the sinks finish only when every publisher is gone.
    publisher: Mutex<Option<Publisher>>,
    cgroup: String,
    cgroup_id: u64,
    host: String,
}

impl KernelOpener {
    /// Merges what `rule_id` opens for `addr` with the entry already there: clauses of
    /// other rules stay until their own expiry; this rule's clauses get the later of the
    /// two expiries (an agent may still hold the earlier answer).
    fn merge(
        existing: Option<LearnedClauses>,
        fresh: &[Clause],
        rule_id: u16,
        now: u64,
    ) -> Result<LearnedClauses, String> {
        let mut kept: Vec<Clause> = Vec::new();
        let mut earlier_expiry = 0;
        if let Some(e) = existing {
            for c in &e.clauses[..(e.count as usize).min(limits::MAX_LEARNED_CLAUSES)] {
                if c.expires_at <= now {
                    continue;
                }
                if c.rule_id == rule_id {
                    earlier_expiry = earlier_expiry.max(c.expires_at);
                } else {
                    kept.push(*c);
                }
            }
        }
        kept.extend(fresh.iter().map(|c| Clause { expires_at: c.expires_at.max(earlier_expiry), ..*c }));
        if kept.len() > limits::MAX_LEARNED_CLAUSES {
            return Err(format!(
                "an address is open for {} port ranges of different domain rules; the kernel holds {}",
                kept.len(),
                limits::MAX_LEARNED_CLAUSES
            ));
        }
        let mut out = LearnedClauses {
            count: kept.len() as u32,
            _pad: 0,
            clauses: [Clause::default(); limits::MAX_LEARNED_CLAUSES],
        };
        out.clauses[..kept.len()].copy_from_slice(&kept);
        Ok(out)
    }

    /// Drops expired learned entries; returns how many addresses stay open.
    pub fn collect_expired(&self) -> usize {
        let now = boot_now_ns();
        self.written.lock().expect("written cache").clear();
        let mut tables = self.tables.lock().expect("learned tables");
        tables.forget(self.binding, |v| {
            v.clauses[..(v.count as usize).min(limits::MAX_LEARNED_CLAUSES)].iter().all(|c| c.expires_at <= now)
        })
    }

    /// A reload renumbers domain rules: carry each learned clause over to the same rule
    /// in the new policy (same name and pattern), and close what the new policy dropped.
    fn renumber(&self, old: &[DomainRule], new: &[DomainRule]) {
        let map: HashMap<u16, u16> = old
            .iter()
            .enumerate()
            .filter_map(|(i, o)| {
                new.iter()
                    .position(|n| {
                        n.action == o.action
                            && n.pattern == o.pattern
                            && n.ports == o.ports
                            && n.protocols == o.protocols
                    })
                    .map(|j| (domain_rule_id(i), domain_rule_id(j)))
            })
            .collect();
        self.written.lock().expect("written cache").clear();
        let mut tables = self.tables.lock().expect("learned tables");
        tables.rewrite(self.binding, |entry| {
            let mut out =
                LearnedClauses { count: 0, _pad: 0, clauses: [Clause::default(); limits::MAX_LEARNED_CLAUSES] };
            for c in &entry.clauses[..(entry.count as usize).min(limits::MAX_LEARNED_CLAUSES)] {
                if let Some(&id) = map.get(&c.rule_id) {
                    out.clauses[out.count as usize] = Clause { rule_id: id, ..*c };
                    out.count += 1;
                }
            }
            out
        });
    }
}

impl Opener for KernelOpener {
    fn open(&self, rule_id: u16, ips: &[(IpAddr, Duration)]) -> Result<(), String> {
        let view = self.view.read().expect("policy view");
        let rule = (rule_id as usize)
            .checked_sub(1)
            .and_then(|i| view.domains.get(i))
            .ok_or_else(|| format!("no domain rule {rule_id}"))?;
        let now = boot_now_ns();
        let mut written = self.written.lock().expect("written cache");
        let mut tables = None;
        for &(ip, ttl) in ips {
            let needed = now + ttl.as_nanos() as u64;
            if written.get(&(ip, rule_id)).is_some_and(|&held| held >= needed) {
                continue;
            }
            let tables = tables.get_or_insert_with(|| self.tables.lock().expect("learned tables"));
            let fresh = learned_clauses(rule, rule_id, needed + EXPIRY_GRACE.as_nanos() as u64);
            let existing = tables.get(self.binding, ip);
            let merged = Self::merge(existing, &fresh, rule_id, now)?;
            tables.set(self.binding, ip, &merged).map_err(|e| e.to_string())?;
            let held = merged.clauses[..merged.count as usize]
                .iter()
                .filter(|c| c.rule_id == rule_id)
                .map(|c| c.expires_at)
                .min();
            written.insert((ip, rule_id), held.unwrap_or(needed));
        }
        Ok(())
    }

    fn record(&self, d: DnsDecision) {
        let view = self.view.read().expect("policy view");
        // As for connects: refusals and audit findings always, allowed queries on request.
        let refused = matches!(d.verdict, DnsVerdict::Refused | DnsVerdict::Failed);
        if d.verdict == DnsVerdict::Allowed && !view.log_allowed {
            return;
        }
        let mut info = EventInfo::decision(Category::Network, "dns-query", refused);
        info.reason = Some(d.reason.into());
        let event = Event {
            timestamp: host::rfc3339_nanos(host::unix_now_ns()),
            event: info,
            enforcer: Some(Enforcer {
                verdict: Some(d.verdict.as_str()),
                hook: Some("dns-proxy"),
                ..Enforcer::default()
            }),
            dns: Some(Dns {
                question: DnsQuestion { name: d.name, qtype: d.qtype },
                resolved_ip: d.resolved.iter().map(IpAddr::to_string).collect(),
            }),
            network: Some(Network { transport: d.transport.into(), family: None, protocol: Some("dns") }),
            policy: Some(PolicyRef { name: Some(view.name.clone()), mode: Some(view.mode.to_string()) }),
            rule: Some(Rule { name: d.rule_name.unwrap_or_else(|| "default".into()), id: Some(d.rule_id.into()) }),
            cgroup: Some(Cgroup { path: self.cgroup.clone(), id: Some(self.cgroup_id) }),
            host: Some(Host { name: self.host.clone() }),
            ..Event::default()
        };
        if let Some(publisher) = self.publisher.lock().expect("publisher").as_ref() {
            publisher.publish(Outgoing::new(&event));
        }
    }
}

/// The running proxy of one confined cgroup.
pub struct DnsService {
    pub port: u16,
    proxy: Arc<Proxy>,
    opener: Arc<KernelOpener>,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

/// How often expired learned addresses are swept from the tables (the kernel already
/// ignores them; this frees the room and keeps the gauge true).
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Starts the proxy on its own thread and runtime, so that DNS latency does not wait
/// on event streaming.
pub fn start(
    listeners: DnsListeners,
    binding: u32,
    policy: &Policy,
    publisher: Publisher,
    cgroup: String,
    cgroup_id: u64,
) -> anyhow::Result<DnsService> {
    let rules = proxy_rules(policy)?;
    let host = host::hostname();
    let opener = Arc::new(KernelOpener {
        binding,
        view: RwLock::new(PolicyView::of(policy)),
        tables: Mutex::new(LearnedTables::open_pinned()?),
        written: Mutex::new(HashMap::new()),
        publisher: Mutex::new(Some(publisher)),
        cgroup,
        cgroup_id,
        host,
    });
    let proxy = Proxy::new(rules, opener.clone());
    let port = listeners.port;
    let (serving, sweeping) = (proxy.clone(), opener.clone());
    let policy_name = policy.name.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new().name("dns-proxy".into()).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dns-proxy")
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => return tracing::error!("DNS proxy runtime: {e}"),
        };
        runtime.block_on(async move {
            let mut udp = Vec::new();
            let mut tcp = Vec::new();
            for s in listeners.udp {
                s.set_nonblocking(true).ok();
                match tokio::net::UdpSocket::from_std(s) {
                    Ok(s) => udp.push(s),
                    Err(e) => tracing::error!("DNS proxy socket: {e}"),
                }
            }
            for s in listeners.tcp {
                s.set_nonblocking(true).ok();
                match tokio::net::TcpListener::from_std(s) {
                    Ok(s) => tcp.push(s),
                    Err(e) => tracing::error!("DNS proxy socket: {e}"),
                }
            }
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(SWEEP_EVERY).await;
                    let open = sweeping.collect_expired();
                    metrics::set_dns_learned(&policy_name, open);
                }
            });
            tokio::select! {
                () = serving.serve(udp, tcp) => {}
                _ = stopped => {}
            }
        });
    })?;
    Ok(DnsService { port, proxy, opener, stop: Mutex::new(Some(stop)) })
}

impl DnsService {
    /// Stops answering and lets go of the event sinks. DNS from the cgroup then fails
    /// (the port stays in the binding and nothing listens): names stop resolving, and
    /// learned addresses close at their expiry.
    pub fn stop(&self) {
        if let Some(stop) = self.stop.lock().expect("stop").take() {
            let _ = stop.send(());
        }
        self.opener.publisher.lock().expect("publisher").take();
    }

    /// Puts a reloaded policy in force for DNS: new names, settings and rule ids.
    pub fn reload(&self, policy: &Policy) -> anyhow::Result<()> {
        let rules = proxy_rules(policy)?;
        let mut view = self.opener.view.write().expect("policy view");
        self.opener.renumber(&view.domains, &policy.network.domains);
        *view = PolicyView::of(policy);
        self.proxy.replace_rules(rules);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clause(rule_id: u16, expires_at: u64) -> Clause {
        Clause { port_lo: 443, port_hi: 443, protocols: 3, action: 1, rule_id, expires_at }
    }

    #[test]
    fn merging_keeps_other_rules_and_the_later_expiry() {
        let mut existing =
            LearnedClauses { count: 3, _pad: 0, clauses: [Clause::default(); limits::MAX_LEARNED_CLAUSES] };
        existing.clauses[0] = clause(1, 500); // this rule, later than the fresh answer
        existing.clauses[1] = clause(2, 300); // another rule, still open
        existing.clauses[2] = clause(3, 50); // expired
        let merged = KernelOpener::merge(Some(existing), &[clause(1, 200)], 1, 100).unwrap();
        let got: Vec<(u16, u64)> =
            merged.clauses[..merged.count as usize].iter().map(|c| (c.rule_id, c.expires_at)).collect();
        assert_eq!(got, vec![(2, 300), (1, 500)]);
    }

    #[test]
    fn merging_refuses_more_clauses_than_the_kernel_holds() {
        let fresh: Vec<Clause> = (0..limits::MAX_LEARNED_CLAUSES as u16 + 1)
            .map(|i| Clause { port_lo: i, port_hi: i, ..clause(1, 900) })
            .collect();
        assert!(KernelOpener::merge(None, &fresh, 1, 100).unwrap_err().contains("kernel holds"));
    }
}
