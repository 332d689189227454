//! Detection rules over the decision stream, emitting `event.kind: alert` documents:
//! a burst of denials in one cgroup, and the first allowed connection of a policy to a
//! destination (IP and port) it has not been seen to reach. Thresholds come from the
//! policy (`spec.alerts`). Destinations seen are kept per policy under
//! `/run/enforcer/seen`, so a restarted controller does not alert on all of them again.
use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::{Duration, Instant},
};

use crate::{
    events::{AlertDetail, Category, Enforcer, Event, EventInfo, Kind, Rule, Type},
    model::policy::Alerts,
    state::SeenStore,
};

pub struct Detector {
    store: SeenStore,
    /// Recent denials per cgroup id.
    denials: HashMap<u64, VecDeque<Instant>>,
    /// When a cgroup last raised a burst alert: one alert per window.
    last_burst: HashMap<u64, Instant>,
    seen: HashMap<String, HashSet<String>>,
}

impl Detector {
    pub fn new(store: SeenStore) -> Self {
        Self { store, denials: HashMap::new(), last_burst: HashMap::new(), seen: HashMap::new() }
    }

    /// The alerts `event` raises under `alerts`, observed at `now`.
    pub fn observe(&mut self, event: &Event, alerts: &Alerts, now: Instant) -> Vec<Event> {
        let mut out = Vec::new();
        let verdict = event.verdict();
        let cgroup = event.cgroup.as_ref().and_then(|c| c.id).unwrap_or(0);
        if let (Some(burst), "deny" | "audit-deny") = (alerts.denial_burst, verdict) {
            let window = Duration::from_secs(burst.window_secs);
            let recent = self.denials.entry(cgroup).or_default();
            recent.push_back(now);
            while recent.front().is_some_and(|&t| now.duration_since(t) >= window) {
                recent.pop_front();
            }
            let quiet = self.last_burst.get(&cgroup).is_none_or(|&t| now.duration_since(t) >= window);
            if recent.len() >= burst.count as usize && quiet {
                self.last_burst.insert(cgroup, now);
                let message = format!("{} denials within {}s", recent.len(), burst.window_secs);
                let detail = AlertDetail { count: Some(recent.len()), window_secs: Some(burst.window_secs) };
                out.push(alert(event, "denial-burst", message, detail));
            }
        }
        let is_connect = event.event.action == "network-connect";
        if alerts.new_destination
            && verdict == "allow"
            && is_connect
            && let Some(dest) = &event.destination
        {
            let policy = event.policy.as_ref().and_then(|p| p.name.clone()).unwrap_or_default();
            let destination = format!("{} {}", dest.ip, dest.port);
            if self.first_sight(&policy, &destination) {
                let message = format!("first connection of policy {policy} to {} port {}", dest.ip, dest.port);
                out.push(alert(event, "new-destination", message, AlertDetail::default()));
            }
        }
        out
    }

    /// Records a destination; true when the policy had not reached it before.
    fn first_sight(&mut self, policy: &str, destination: &str) -> bool {
        if !self.seen.contains_key(policy) {
            self.seen.insert(policy.to_string(), self.store.load(policy).into_iter().collect());
        }
        let set = self.seen.get_mut(policy).expect("inserted above");
        if !set.insert(destination.to_string()) {
            return false;
        }
        self.store.append(policy, destination);
        true
    }
}

/// An alert built from the event that raised it: who, where, under which policy.
fn alert(event: &Event, rule: &str, message: String, detail: AlertDetail) -> Event {
    Event {
        timestamp: event.timestamp.clone(),
        event: EventInfo {
            kind: Kind::Alert,
            category: [Category::Network],
            action: rule.into(),
            kind_of: [Type::Info],
            outcome: None,
            reason: None,
        },
        message: Some(message),
        rule: Some(Rule { name: rule.into(), id: None }),
        enforcer: Some(Enforcer { alert: Some(detail), ..Enforcer::default() }),
        policy: event.policy.clone(),
        cgroup: event.cgroup.clone(),
        process: event.process.clone(),
        user: event.user.clone(),
        host: event.host.clone(),
        destination: event.destination.clone(),
        ..Event::default()
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, path::PathBuf};

    use super::*;
    use crate::{
        events::{Cgroup, Destination, PolicyRef},
        model::policy::Burst,
    };

    fn decision(verdict: &'static str, cgroup: u64) -> Event {
        Event {
            timestamp: "t".into(),
            event: EventInfo::decision(Category::Network, "network-connect", verdict == "deny"),
            enforcer: Some(Enforcer { verdict: Some(verdict), ..Enforcer::default() }),
            cgroup: Some(Cgroup { path: "/t".into(), id: Some(cgroup) }),
            policy: Some(PolicyRef { name: Some("p".into()), mode: None }),
            ..Event::default()
        }
    }

    fn denial(cgroup: u64) -> Event {
        decision("deny", cgroup)
    }

    fn allowed(ip: &str, port: u16) -> Event {
        Event { destination: Some(Destination { ip: ip.into(), port }), ..decision("allow", 1) }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("enforcer-alerts-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_burst_alerts_at_its_threshold_not_below_and_once_per_window() {
        let alerts = Alerts { denial_burst: Some(Burst { count: 3, window_secs: 10 }), new_destination: false };
        let mut d = Detector::new(SeenStore::new(dir("burst")));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(d.observe(&denial(1), &alerts, at(0)).is_empty());
        assert!(d.observe(&denial(1), &alerts, at(1)).is_empty(), "2 of 3: below the threshold");
        assert!(d.observe(&denial(2), &alerts, at(1)).is_empty(), "other cgroups count on their own");
        let fired = d.observe(&denial(1), &alerts, at(2));
        assert_eq!(fired.len(), 1, "the 3rd denial within 10s fires");
        assert_eq!(fired[0].event.kind, Kind::Alert);
        assert_eq!(fired[0].event.action, "denial-burst");
        assert!(d.observe(&denial(1), &alerts, at(3)).is_empty(), "one alert per window");
        // Old denials leave the window: 3 new ones are needed again.
        assert!(d.observe(&denial(1), &alerts, at(30)).is_empty());
        assert!(d.observe(&denial(1), &alerts, at(31)).is_empty());
        assert_eq!(d.observe(&denial(1), &alerts, at(32)).len(), 1);
    }

    #[test]
    fn first_connection_to_a_destination_alerts_once_even_after_a_restart() {
        let alerts = Alerts { denial_burst: None, new_destination: true };
        let seen = dir("seen");
        let now = Instant::now();
        let mut d = Detector::new(SeenStore::new(seen.clone()));
        let fired = d.observe(&allowed("10.0.0.1", 443), &alerts, now);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].destination.as_ref().map(|d| d.port), Some(443));
        assert!(d.observe(&allowed("10.0.0.1", 443), &alerts, now).is_empty());
        assert_eq!(d.observe(&allowed("10.0.0.1", 80), &alerts, now).len(), 1, "another port is another destination");
        let mut restarted = Detector::new(SeenStore::new(seen.clone()));
        assert!(restarted.observe(&allowed("10.0.0.1", 443), &alerts, now).is_empty(), "remembered across restarts");
        let off = Alerts { denial_burst: None, new_destination: false };
        assert!(restarted.observe(&allowed("10.9.9.9", 1), &off, now).is_empty());
        let _ = fs::remove_dir_all(seen);
    }
}
