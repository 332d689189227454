//! `enforcer probe`: tries network operations and reports what the kernel said. Run it
//! inside a confined cgroup to see a policy at work; the demo and the tests use it as
//! their agent. Each target prints one line: `<target> ok` or `<target> <ERRNO>`.
use std::{
    io,
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    time::Duration,
};

/// One operation to try.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// TCP connect (ok, or ECONNREFUSED when nothing listens: the kernel let it out).
    Tcp(SocketAddr),
    /// UDP socket connect().
    UdpConnect(SocketAddr),
    /// Unconnected UDP sendto().
    UdpSendto(SocketAddr),
    /// TCP Fast Open: sendto(MSG_FASTOPEN) on an unconnected TCP socket.
    TcpFastOpen(SocketAddr),
    /// socket(AF_INET, SOCK_RAW, IPPROTO_ICMP).
    Raw,
    /// socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP): a "ping" socket.
    Icmp,
    /// Open a file with O_PATH (no access asked), then read it through
    /// /proc/self/fd/N: the re-open must be judged like a direct open.
    Reopen(std::path::PathBuf),
    /// A DNS A query for the name, sent with sendto() on an unconnected UDP socket;
    /// `ok` when a NOERROR answer came back from the very address asked (a redirect
    /// that did not restore the source shows as `from-ADDR`), else the RCODE's name.
    DnsUdp(String, SocketAddr),
    /// The same over TCP; the peer's address (getpeername) must be the one asked.
    DnsTcp(String, SocketAddr),
}

impl std::str::FromStr for Probe {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => return Ok(Self::Raw),
            "icmp" => return Ok(Self::Icmp),
            _ => {}
        }
        if let Some(path) = s.strip_prefix("reopen:") {
            return Ok(Self::Reopen(path.into()));
        }
        for (prefix, tcp) in [("dns-udp:", false), ("dns-tcp:", true)] {
            if let Some(rest) = s.strip_prefix(prefix) {
                let (name, server) =
                    rest.split_once('@').ok_or_else(|| format!("{s:?}: expected {prefix}NAME@ADDR:PORT"))?;
                let server: SocketAddr = server.parse().map_err(|e| format!("{s:?}: {e} (IPv6 as [::1]:53)"))?;
                return Ok(if tcp { Self::DnsTcp(name.into(), server) } else { Self::DnsUdp(name.into(), server) });
            }
        }
        let (kind, addr) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected KIND:ADDR:PORT (tcp, udp, sendto, tfo), raw or icmp"))?;
        let addr: SocketAddr = addr.parse().map_err(|e| format!("{s:?}: {e} (IPv6 as tcp:[::1]:80)"))?;
        match kind {
            "tcp" => Ok(Self::Tcp(addr)),
            "udp" => Ok(Self::UdpConnect(addr)),
            "sendto" => Ok(Self::UdpSendto(addr)),
            "tfo" => Ok(Self::TcpFastOpen(addr)),
            other => Err(format!("{s:?}: unknown kind {other:?}: tcp, udp, sendto, tfo, raw or icmp")),
        }
    }
}

fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ETIMEDOUT) | Some(libc::EINPROGRESS) => "ETIMEDOUT".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH".into(),
        Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL".into(),
        Some(n) => format!("errno-{n}"),
        None if e.kind() == io::ErrorKind::TimedOut => "ETIMEDOUT".into(),
        None => e.to_string(),
    }
}

fn local_for(addr: &SocketAddr) -> &'static str {
    if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
}

/// Runs one probe; `Ok(())` when the kernel let the operation through.
pub fn run(probe: &Probe) -> io::Result<()> {
    match probe {
        Probe::Tcp(addr) => match TcpStream::connect_timeout(addr, Duration::from_secs(2)) {
            Ok(_) => Ok(()),
            // Refused by the peer: the packet left, our hooks allowed it.
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Err(e),
            Err(e) => Err(e),
        },
        Probe::UdpConnect(addr) => {
            let sock = UdpSocket::bind(local_for(addr))?;
            sock.connect(addr)?;
            sock.send(b"enforcer-probe").map(|_| ())
        }
        Probe::UdpSendto(addr) => {
            let sock = UdpSocket::bind(local_for(addr))?;
            sock.send_to(b"enforcer-probe", addr).map(|_| ())
        }
        Probe::TcpFastOpen(addr) => tcp_fast_open(addr),
        Probe::Raw => open_close(libc::SOCK_RAW),
        Probe::Icmp => open_close(libc::SOCK_DGRAM),
        Probe::Reopen(path) => {
            use std::os::unix::fs::OpenOptionsExt as _;
            let handle = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH).open(path)?;
            std::fs::read(format!("/proc/self/fd/{}", handle.as_raw_fd())).map(|_| ())
        }
        Probe::DnsUdp(name, server) => {
            let sock = UdpSocket::bind(local_for(server))?;
            sock.set_read_timeout(Some(Duration::from_secs(3)))?;
            let (id, query) = dns_query(name);
            sock.send_to(&query, server)?;
            let mut buf = [0u8; 4096];
            let (n, from) = sock.recv_from(&mut buf)?;
            if from != *server {
                return Err(io::Error::other(format!("from-{from}")));
            }
            dns_rcode(&buf[..n], id)
        }
        Probe::DnsTcp(name, server) => {
            use std::io::{Read as _, Write as _};
            let mut stream = TcpStream::connect_timeout(server, Duration::from_secs(3))?;
            stream.set_read_timeout(Some(Duration::from_secs(3)))?;
            let peer = stream.peer_addr()?;
            if peer != *server {
                return Err(io::Error::other(format!("from-{peer}")));
            }
            let (id, query) = dns_query(name);
            let mut framed = (query.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&query);
            stream.write_all(&framed)?;
            let mut len = [0u8; 2];
            stream.read_exact(&mut len)?;
            let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
            stream.read_exact(&mut reply)?;
            dns_rcode(&reply, id)
        }
    }
}

/// A minimal A query with recursion desired.
fn dns_query(name: &str) -> (u16, Vec<u8>) {
    let id = (std::process::id() as u16) ^ 0x5a5a;
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    (id, q)
}

/// `Ok` for a NOERROR reply to our ID, else the RCODE's name.
fn dns_rcode(reply: &[u8], id: u16) -> io::Result<()> {
    if reply.len() < 12 || reply[..2] != id.to_be_bytes() || reply[2] & 0x80 == 0 {
        return Err(io::Error::other("bad-reply"));
    }
    match reply[3] & 0x0f {
        0 => Ok(()),
        1 => Err(io::Error::other("FORMERR")),
        2 => Err(io::Error::other("SERVFAIL")),
        3 => Err(io::Error::other("NXDOMAIN")),
        5 => Err(io::Error::other("REFUSED")),
        n => Err(io::Error::other(format!("rcode-{n}"))),
    }
}

/// Creates and closes an AF_INET socket of `sock_type` for IPPROTO_ICMP.
fn open_close(sock_type: libc::c_int) -> io::Result<()> {
    let fd = unsafe { libc::socket(libc::AF_INET, sock_type, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    unsafe { libc::close(fd) };
    Ok(())
}

fn tcp_fast_open(addr: &SocketAddr) -> io::Result<()> {
    let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let (storage, len) = sockaddr(addr);
    let payload = b"enforcer-probe";
    let rc = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            libc::MSG_FASTOPEN,
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: 0,
            };
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// The line printed for a probe's outcome.
pub fn outcome(result: &io::Result<()>) -> String {
    match result {
        Ok(()) => "ok".into(),
        Err(e) => errno_name(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_probe_targets() {
        assert_eq!("tcp:127.0.0.1:80".parse(), Ok(Probe::Tcp("127.0.0.1:80".parse().unwrap())));
        assert_eq!("sendto:[::1]:53".parse(), Ok(Probe::UdpSendto("[::1]:53".parse().unwrap())));
        assert_eq!("raw".parse(), Ok(Probe::Raw));
        assert_eq!("icmp".parse(), Ok(Probe::Icmp));
        assert!("ping:1.2.3.4:0".parse::<Probe>().unwrap_err().contains("unknown kind"));
        assert!("tcp:nonsense".parse::<Probe>().is_err());
        assert_eq!("dns-udp:a.test@[::1]:53".parse(), Ok(Probe::DnsUdp("a.test".into(), "[::1]:53".parse().unwrap())));
        assert!("dns-tcp:127.0.0.1:53".parse::<Probe>().unwrap_err().contains("NAME@ADDR"));
    }
}
