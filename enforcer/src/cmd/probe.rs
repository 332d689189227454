//! `enforcer probe`: tries network operations and reports what the kernel said. Run it
//! inside a confined cgroup to see a policy at work; the demo and the tests use it as
//! their agent. Each target prints one line: `<target> ok` or `<target> <ERRNO>`.
use std::{
    io,
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    time::Duration,
};

use crate::cli::Probe;
use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, SockaddrLike as _, SockaddrStorage, socket};
use nix::unistd::Pid;

fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ETIMEDOUT) | Some(libc::EINPROGRESS) => "ETIMEDOUT".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH".into(),
        Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL".into(),
        Some(libc::EAFNOSUPPORT) => "EAFNOSUPPORT".into(),
        Some(libc::ESRCH) => "ESRCH".into(),
        Some(libc::ENOENT) => "ENOENT".into(),
        Some(n) => format!("errno-{n}"),
        None if e.kind() == io::ErrorKind::TimedOut => "ETIMEDOUT".into(),
        None => e.to_string(),
    }
}

fn local_for(addr: &SocketAddr) -> &'static str {
    if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
}

/// Runs one probe and returns its line: `<target> ok`, `<target> <ERRNO>`, or for a
/// flood `<target> passed=N refused=M`.
pub fn line(probe: &Probe) -> String {
    if let Probe::Flood { tcp, addr, millis } = probe {
        let (passed, refused) = flood(*tcp, addr, Duration::from_millis(*millis));
        return format!("{probe} passed={passed} refused={refused}");
    }
    format!("{probe} {}", outcome(&run(probe)))
}

/// Runs one probe; `Ok(())` when the kernel let the operation through.
fn run(probe: &Probe) -> io::Result<()> {
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
        Probe::Raw => open_close(SockType::Raw),
        Probe::Icmp => open_close(SockType::Datagram),
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
        Probe::Ptrace(pid) => nix::sys::ptrace::seize(Pid::from_raw(*pid as i32), nix::sys::ptrace::Options::empty())
            .map_err(io::Error::from),
        Probe::VmRead(pid) => {
            let mut byte = [0u8; 1];
            let remote = [nix::sys::uio::RemoteIoVec { base: 0x1000, len: 1 }];
            match nix::sys::uio::process_vm_readv(
                Pid::from_raw(*pid as i32),
                &mut [io::IoSliceMut::new(&mut byte)],
                &remote,
            ) {
                // Past the permission check: the address is simply not mapped.
                Ok(_) | Err(nix::errno::Errno::EFAULT | nix::errno::Errno::EIO) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        Probe::Signal(pid) => nix::sys::signal::kill(Pid::from_raw(*pid as i32), None).map_err(io::Error::from),
        Probe::Unix(target) => {
            use std::os::unix::net::{SocketAddr as UnixAddr, UnixStream};
            let addr = match target.strip_prefix('@') {
                Some(name) => {
                    use std::os::linux::net::SocketAddrExt as _;
                    UnixAddr::from_abstract_name(name.as_bytes())?
                }
                None => UnixAddr::from_pathname(target)?,
            };
            UnixStream::connect_addr(&addr).map(drop)
        }
        Probe::Socket(family) => {
            let (family, sock_type, protocol) = match family.as_str() {
                "netlink-route" => (AddressFamily::Netlink, SockType::Raw, Some(SockProtocol::NetlinkRoute)),
                "netlink-uevent" => (AddressFamily::Netlink, SockType::Raw, Some(SockProtocol::NetlinkKObjectUEvent)),
                "vsock" => (AddressFamily::Vsock, SockType::Stream, None),
                "alg" => (AddressFamily::Alg, SockType::SeqPacket, None),
                "packet" => (AddressFamily::Packet, SockType::Datagram, None),
                other => return Err(io::Error::other(format!("unknown-family-{other}"))),
            };
            socket(family, sock_type, SockFlag::SOCK_CLOEXEC, protocol).map(drop).map_err(io::Error::from)
        }
        Probe::Flood { .. } => unreachable!("line() runs floods"),
        Probe::Read(path) => std::fs::read(path).map(drop),
        Probe::Link(from, to) => std::fs::hard_link(from, to),
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

/// Connects (TCP) or sends (UDP) to `addr` in a tight loop for `how_long`; returns how
/// many operations the kernel let through and how many it refused with EPERM.
fn flood(tcp: bool, addr: &SocketAddr, how_long: Duration) -> (u64, u64) {
    let (mut passed, mut refused) = (0, 0);
    let udp = UdpSocket::bind(local_for(addr)).ok();
    let until = std::time::Instant::now() + how_long;
    while std::time::Instant::now() < until {
        let result = if tcp {
            TcpStream::connect_timeout(addr, Duration::from_secs(1)).map(drop)
        } else {
            udp.as_ref().map_or(Ok(()), |s| s.send_to(b"enforcer-flood", addr).map(drop))
        };
        match result {
            Ok(()) => passed += 1,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => refused += 1,
            // Refused by the peer: the kernel let it out.
            Err(_) => passed += 1,
        }
    }
    (passed, refused)
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
fn open_close(sock_type: SockType) -> io::Result<()> {
    socket(AddressFamily::Inet, sock_type, SockFlag::SOCK_CLOEXEC, SockProtocol::Icmp)
        .map(drop)
        .map_err(io::Error::from)
}

/// sendto(MSG_FASTOPEN) on an unconnected TCP socket: the connect and the first data in
/// one call, which the connect hooks must judge like a connect.
fn tcp_fast_open(addr: &SocketAddr) -> io::Result<()> {
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let sock = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    let to = SockaddrStorage::from(*addr);
    let payload = b"enforcer-probe";
    // SAFETY: the socket is ours and open; `payload` and `to` outlive the call and their
    // lengths are theirs. Raw sendto: nix has no MSG_FASTOPEN.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            libc::MSG_FASTOPEN,
            to.as_ptr(),
            to.len(),
        )
    };
    if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The line printed for a probe's outcome.
fn outcome(result: &io::Result<()>) -> String {
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
