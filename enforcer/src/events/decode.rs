//! Kernel records from `ENF_EVENTS`: an `EventHeader` whose `kind` says which record
//! follows. Pure: bytes in, typed records out.
use enforcer_common::{EventHeader, FileEvent, NetEvent, access, change, hook, record};

/// A kernel record.
#[derive(Debug, PartialEq, Eq)]
pub enum KernelEvent {
    Net(NetEvent),
    File(Box<FileEvent>),
}

impl KernelEvent {
    pub fn header(&self) -> &EventHeader {
        match self {
            Self::Net(e) => &e.header,
            Self::File(e) => &e.header,
        }
    }
}

/// Reads a `T` from the front of a record that is exactly `T`'s size.
fn read_exact<T: Copy>(bytes: &[u8]) -> Option<T> {
    // SAFETY: `T` is one of the repr(C) plain-data records of enforcer_common, valid for
    // any bit pattern; the length is checked and the read is unaligned.
    (bytes.len() == size_of::<T>()).then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Decodes one ring-buffer record; `None` for an unknown kind or a record whose size
/// does not match its kind.
pub fn decode(bytes: &[u8]) -> Option<KernelEvent> {
    let header: EventHeader = read_exact(bytes.get(..size_of::<EventHeader>())?)?;
    match header.kind {
        record::NET => read_exact(bytes).map(KernelEvent::Net),
        record::FILE => read_exact(bytes).map(|e| KernelEvent::File(Box::new(e))),
        _ => None,
    }
}

/// A NUL-padded kernel string (a `comm`, a path component).
pub fn c_str(bytes: &[u8]) -> String {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..len]).into_owned()
}

/// `read`, `write`, `exec` names of access bits.
pub fn access_names(bits: u8) -> Vec<&'static str> {
    [(access::READ, "read"), (access::WRITE, "write"), (access::EXEC, "exec")]
        .into_iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, n)| n)
        .collect()
}

/// The path a file event carries: components deepest first, joined from the root.
pub fn event_path(ev: &FileEvent) -> String {
    let parts = (ev.parts as usize).min(ev.path.len());
    let mut out = String::new();
    if ev.truncated != 0 {
        out.push_str("/…");
    }
    for part in ev.path[..parts].iter().rev() {
        let len = part.iter().position(|&b| b == 0).unwrap_or(part.len());
        // A filesystem root crossed on the way up names itself "/".
        if len == 0 || &part[..len] == b"/" {
            continue;
        }
        out.push('/');
        out.push_str(&String::from_utf8_lossy(&part[..len]));
        if len == part.len() {
            out.push('…'); // the kernel keeps 31 bytes of each name
        }
    }
    if out.is_empty() { "/".into() } else { out }
}

/// The ECS `event.action` of a file decision.
pub fn file_action(hook_id: u8, requested: u8, change_kind: u8) -> String {
    match hook_id {
        hook::FILE_EXEC | hook::FILE_MMAP => "file-exec".into(),
        hook::FILE_CHANGE => format!("file-{}", change::name(change_kind)),
        _ if requested & access::WRITE != 0 => "file-write".into(),
        _ => "file-open".into(),
    }
}

#[cfg(test)]
mod tests {
    use enforcer_common::{family, verdict};

    use super::*;

    fn bytes_of<T>(value: &T) -> &[u8] {
        // SAFETY: viewing a plain-data record as its bytes, for the length of the borrow.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
    }

    #[test]
    fn decodes_records_by_their_kind_and_size() {
        let header = EventHeader {
            boot_ns: 1,
            cgroup_id: 2,
            tid: 3,
            pid: 4,
            uid: 5,
            slot: 6,
            rule_id: 7,
            kind: record::NET,
            hook: hook::CONNECT4,
            verdict: verdict::DENY,
            _pad: 0,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
        };
        let ev = NetEvent {
            header,
            family: family::INET,
            protocol: 6,
            port: 443,
            sock_type: 1,
            _pad: 0,
            addr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        assert_eq!(decode(bytes_of(&ev)), Some(KernelEvent::Net(ev)));
        assert_eq!(decode(&bytes_of(&ev)[..10]), None, "shorter than a header");
        assert_eq!(decode(&bytes_of(&ev)[..60]), None, "a net record cut short");
        let unknown = NetEvent { header: EventHeader { kind: 0, ..header }, ..ev };
        assert_eq!(decode(bytes_of(&unknown)), None, "kind 0 is no record");
        let file = FileEvent {
            header: EventHeader { kind: record::FILE, hook: hook::FILE_OPEN, ..header },
            ino: 9,
            dev: 8 << 20,
            requested: access::READ,
            change: change::NONE,
            parts: 1,
            truncated: 0,
            path: [[0; enforcer_common::limits::EVENT_PART_LEN]; enforcer_common::limits::EVENT_PATH_PARTS],
        };
        assert_eq!(decode(bytes_of(&file)), Some(KernelEvent::File(Box::new(file))));
        assert_eq!(c_str(&header.comm), "curl");
    }
}
