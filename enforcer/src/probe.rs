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
        let (kind, addr) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected KIND:ADDR:PORT (tcp, udp, sendto, tfo), raw or icmp"))?;
        let addr: SocketAddr = addr
            .parse()
            .map_err(|e| format!("{s:?}: {e} (IPv6 as tcp:[::1]:80)"))?;
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
    }
}
