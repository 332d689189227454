//! The upstream side: pooled UDP sockets with random IDs, TCP for truncated answers,
//! and the servers of /etc/resolv.conf.
use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use hickory_proto::op::{Message, Query};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    sync::oneshot,
    task::AbortHandle,
};
use tracing::debug;

use super::*;

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// How many long-lived UDP sockets an upstream server gets and when one is retired.
#[derive(Clone, Copy, Debug)]
pub(super) struct PoolLimits {
    pub(super) sockets: usize,
    pub(super) queries_per_socket: u32,
    pub(super) lifetime: Duration,
}

/// The UDP sockets to one upstream server. A socket per query cost socket, bind, connect,
/// close, two epoll_ctl calls and a 64 KiB buffer each; these sockets are connected once
/// and shared, and one reader task per socket hands each reply to the query waiting on
/// its ID.
///
/// Spoofing: a forged reply must hit the socket's source port and a pending random ID,
/// and repeat the question. A socket per query drew a fresh port every time; a shared
/// socket keeps its port, so a spoofer who learns it (by a side channel such as SAD
/// DNS's ICMP probing) would get many queries to aim at. Each socket therefore carries
/// at most `queries_per_socket` queries and lives at most `lifetime`, then a fresh
/// socket (a fresh random port from the kernel) takes its place; queries still waiting
/// on the old one finish there. IDs stay random per query (getrandom), never sequential.
pub(super) struct UpstreamPool {
    pub(super) server: SocketAddr,
    pub(super) limits: PoolLimits,
    pub(super) state: Mutex<PoolState>,
}

pub(super) struct PoolState {
    /// Taken in turn; None until first used or after a failed open.
    pub(super) sockets: Vec<Option<Arc<PooledSocket>>>,
    pub(super) next: usize,
}

impl UpstreamPool {
    pub(super) fn new(server: SocketAddr, limits: PoolLimits) -> Self {
        let sockets = (0..limits.sockets.max(1)).map(|_| None).collect();
        Self { server, limits, state: Mutex::new(PoolState { sockets, next: 0 }) }
    }

    /// The next socket in turn, replaced first if it is used up, too old, or its reader
    /// has stopped.
    pub(super) fn socket(&self) -> io::Result<Arc<PooledSocket>> {
        let mut state = lock(&self.state);
        let i = state.next;
        state.next = (i + 1) % state.sockets.len();
        let slot = &mut state.sockets[i];
        let socket = match slot {
            Some(s) if s.usable(&self.limits) => Arc::clone(s),
            _ => {
                // Opened before the old one is let go, so the port differs from it; the
                // old one stays open for the queries still waiting on it.
                let fresh = PooledSocket::open(self.server)?;
                *slot = Some(Arc::clone(&fresh));
                fresh
            }
        };
        socket.carried.fetch_add(1, Ordering::Relaxed);
        Ok(socket)
    }

    /// One query over UDP: `query` is sent with a fresh ID, and the answer is the first
    /// reply with that ID that repeats `question`.
    pub(super) async fn exchange(&self, query: &[u8], question: &Query, timeout: Duration) -> io::Result<Message> {
        let socket = self.socket()?;
        let (waiting, reply) = socket.wait_for(question)?;
        let mut bytes = query.to_vec();
        bytes[..2].copy_from_slice(&waiting.id.to_be_bytes());
        socket.shared.socket.send(&bytes).await?;
        // `waiting` is dropped on every way out, the future's own cancellation included,
        // and takes the entry with it: a late reply then finds no one and is dropped.
        match tokio::time::timeout(timeout, reply).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(io::Error::new(io::ErrorKind::ConnectionAborted, "upstream socket failed")),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no matching reply in time")),
        }
    }
}

/// A connected UDP socket and its reader; the pool and each query using it hold one.
/// When the last holder lets go, the reader stops and the socket closes.
pub(super) struct PooledSocket {
    pub(super) shared: Arc<SocketShared>,
    pub(super) reader: AbortHandle,
    pub(super) born: Instant,
    /// Queries sent on it, for retirement.
    pub(super) carried: AtomicU32,
}

/// What the reader task needs too.
pub(super) struct SocketShared {
    pub(super) socket: UdpSocket,
    pub(super) pending: Mutex<Pending>,
}

#[derive(Default)]
pub(super) struct Pending {
    pub(super) waiters: HashMap<u16, Waiter>,
    /// Tells a waiter's own entry from a later one under the same ID.
    pub(super) next_ticket: u64,
    /// The reader stopped: nothing will be delivered on this socket any more.
    pub(super) closed: bool,
}

pub(super) struct Waiter {
    pub(super) ticket: u64,
    pub(super) question: Query,
    pub(super) reply: oneshot::Sender<Message>,
}

/// A query's entry in `Pending`; removed when this is dropped, unless a later query
/// already holds the ID again.
pub(super) struct Waiting<'a> {
    pub(super) shared: &'a SocketShared,
    pub(super) id: u16,
    pub(super) ticket: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut pending = lock(&self.shared.pending);
        if pending.waiters.get(&self.id).is_some_and(|w| w.ticket == self.ticket) {
            pending.waiters.remove(&self.id);
        }
    }
}

impl PooledSocket {
    pub(super) fn open(server: SocketAddr) -> io::Result<Arc<Self>> {
        let local: SocketAddr = match server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = std::net::UdpSocket::bind(local)?;
        // Connected: the kernel hands us only datagrams from the server's address and port.
        socket.connect(server)?;
        socket.set_nonblocking(true)?;
        let shared = Arc::new(SocketShared { socket: UdpSocket::from_std(socket)?, pending: Mutex::default() });
        let reader = tokio::spawn(read_replies(Arc::clone(&shared))).abort_handle();
        Ok(Arc::new(Self { shared, reader, born: Instant::now(), carried: AtomicU32::new(0) }))
    }

    pub(super) fn usable(&self, limits: &PoolLimits) -> bool {
        self.carried.load(Ordering::Relaxed) < limits.queries_per_socket
            && self.born.elapsed() < limits.lifetime
            && !lock(&self.shared.pending).closed
    }

    /// Takes a random ID no query on this socket is waiting on.
    pub(super) fn wait_for(&self, question: &Query) -> io::Result<(Waiting<'_>, oneshot::Receiver<Message>)> {
        for _ in 0..MAX_ID_DRAWS {
            let id = random_id()?;
            let mut pending = lock(&self.shared.pending);
            if pending.closed {
                return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "upstream socket failed"));
            }
            if pending.waiters.contains_key(&id) {
                continue;
            }
            let ticket = pending.next_ticket;
            pending.next_ticket += 1;
            let (tx, rx) = oneshot::channel();
            pending.waiters.insert(id, Waiter { ticket, question: question.clone(), reply: tx });
            return Ok((Waiting { shared: &self.shared, id, ticket }, rx));
        }
        Err(io::Error::new(io::ErrorKind::WouldBlock, "no free query ID on the upstream socket"))
    }
}

impl Drop for PooledSocket {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Marks the socket closed and fails its waiters (so they try the next server at once)
/// however the reader ends: an error, an abort, or its runtime shutting down.
pub(super) struct ReaderEnd(Arc<SocketShared>);

impl Drop for ReaderEnd {
    fn drop(&mut self) {
        let mut pending = lock(&self.0.pending);
        pending.closed = true;
        pending.waiters.clear();
    }
}

/// The reader: one buffer for the socket's life; a reply leaves it parsed, and only to
/// the query whose ID and question it carries. Anything else is dropped.
pub(super) async fn read_replies(shared: Arc<SocketShared>) {
    let end = ReaderEnd(shared);
    let shared = &end.0;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let n = match shared.socket.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                // On a connected UDP socket these are ICMP reports (port or host
                // unreachable) about the one server it talks to: no use waiting on it.
                debug!(error = %e, "dns upstream socket failed");
                return;
            }
        };
        let datagram = &buf[..n];
        let Some(id) = datagram.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else { continue };
        // Parse only what someone waits for: a flood of stray datagrams stays cheap.
        if !lock(&shared.pending).waiters.contains_key(&id) {
            continue;
        }
        let Some((reply, _)) = parse_prefix(datagram) else { continue };
        let mut pending = lock(&shared.pending);
        if pending.waiters.get(&id).is_some_and(|w| answers(&reply, id, &w.question)) {
            if let Some(waiter) = pending.waiters.remove(&id) {
                // The query may have timed out just now; then the reply goes nowhere.
                let _ = waiter.reply.send(reply);
            }
        }
    }
}

/// One query over its own TCP connection (rare: truncated answers), with a fresh ID.
pub(super) async fn exchange_tcp(
    server: SocketAddr,
    query: &[u8],
    question: &Query,
    timeout: Duration,
) -> io::Result<Message> {
    let id = random_id()?;
    let exchange = async {
        let mut stream = TcpStream::connect(server).await?;
        let len = u16::try_from(query.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(query);
        framed[2..4].copy_from_slice(&id.to_be_bytes());
        stream.write_all(&framed).await?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply).await?;
        matching_reply(&reply, id, question)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "reply does not answer the query"))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no reply in time"))?
}

/// Query IDs, drawn from the kernel's CSPRNG this many bytes at a time: one getrandom per
/// query was a syscall on the hot path. Every ID is used once.
pub(super) const RANDOM_ID_BATCH: usize = 256;

pub(super) struct RandomIds {
    pub(super) bytes: [u8; RANDOM_ID_BATCH],
    pub(super) used: usize,
}

pub(super) static RANDOM_IDS: Mutex<RandomIds> =
    Mutex::new(RandomIds { bytes: [0; RANDOM_ID_BATCH], used: RANDOM_ID_BATCH });

/// A query ID from the kernel's CSPRNG. With an upstream socket's port fixed for its
/// life, the ID is most of what a spoofer must guess: a userspace generator could be
/// predicted from the IDs it has already sent, getrandom's output cannot. Without it the
/// proxy does not forward at all.
pub(super) fn random_id() -> io::Result<u16> {
    let mut ids = lock(&RANDOM_IDS);
    if ids.used + 2 > RANDOM_ID_BATCH {
        fill_random(&mut ids.bytes)?;
        ids.used = 0;
    }
    let at = ids.used;
    ids.used += 2;
    Ok(u16::from_ne_bytes([ids.bytes[at], ids.bytes[at + 1]]))
}

pub(super) fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    getrandom::fill(buf).map_err(|e| io::Error::other(format!("getrandom: {e}")))
}

/// Nameservers from /etc/resolv.conf (port 53), for when the policy lists no upstream.
/// Like glibc, only the first three count.
pub fn resolv_conf_servers(text: &str) -> Vec<SocketAddr> {
    let mut servers: Vec<SocketAddr> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next().and_then(parse_nameserver) else { continue };
        if !servers.contains(&addr) {
            servers.push(addr);
        }
        if servers.len() == RESOLV_CONF_MAX_SERVERS {
            break;
        }
    }
    servers
}

/// `1.1.1.1`, `2606:4700::1111` or a scoped link-local `fe80::1%eth0`.
pub(super) fn parse_nameserver(text: &str) -> Option<SocketAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, 53));
    }
    let (ip, scope) = text.split_once('%')?;
    let ip: Ipv6Addr = ip.parse().ok()?;
    let scope_id = match scope.parse::<u32>() {
        Ok(index) => index,
        Err(_) => {
            let name = std::ffi::CString::new(scope).ok()?;
            // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if index == 0 {
                return None;
            }
            index
        }
    };
    Some(SocketAddr::V6(SocketAddrV6::new(ip, 53, 0, scope_id)))
}
