//! Syslog (RFC 5424) over UDP or a unix datagram socket: the off-host copy of events.
use std::{io, net::UdpSocket, os::unix::net::UnixDatagram};

use super::Outgoing;

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

pub(super) enum Transport {
    Udp(UdpSocket, std::net::SocketAddr),
    Unix(UnixDatagram, std::path::PathBuf),
}

impl Transport {
    pub(super) fn open(target: &SyslogTarget) -> io::Result<Self> {
        Ok(match target {
            SyslogTarget::Udp(addr) => {
                let local = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
                Self::Udp(UdpSocket::bind(local)?, *addr)
            }
            SyslogTarget::Unix(path) => Self::Unix(UnixDatagram::unbound()?, path.clone()),
        })
    }

    pub(super) fn send(&self, line: &[u8]) -> io::Result<()> {
        match self {
            Self::Udp(sock, addr) => sock.send_to(line, addr).map(|_| ()),
            Self::Unix(sock, path) => sock.send_to(line, path).map(|_| ()),
        }
    }
}

impl SyslogTarget {
    /// How metrics name this sink.
    pub fn sink_name(&self) -> String {
        match self {
            Self::Udp(a) => format!("syslog-udp:{a}"),
            Self::Unix(p) => format!("syslog-unix:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Category, Event, EventInfo};

    #[test]
    fn formats_rfc5424_with_audit_facility_and_severity_by_verdict() {
        let denied = Event {
            timestamp: "2026-11-23T06:00:00.000000001Z".into(),
            event: EventInfo::decision(Category::Network, "network-connect", true),
            ..Event::default()
        };
        let line = String::from_utf8(rfc5424(&Outgoing::new(&denied), "vm")).unwrap();
        assert!(line.starts_with("<108>1 2026-11-23T06:00:00.000000Z vm enforcer "), "{line}");
        assert!(line.contains(" network-connect - {"), "{line}");
        let allowed = Event {
            timestamp: "-".into(),
            event: EventInfo::decision(Category::Network, "network-sendmsg", false),
            ..Event::default()
        };
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
}
