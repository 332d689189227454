//! The tamper-evident audit trail: every line a file sink writes starts with
//! `{"chain":{"hash":H,"prev":P,"seq":N},` followed by the event's fields. `P` is the
//! hash of the previous line; `H` is SHA-256 over `P`, a newline, and the exact bytes of
//! the line with its `"hash":H,` field removed. Hashing bytes, not a re-serialization,
//! makes the check independent of how the event was serialized. `verify` walks one or
//! more files (rotated segments oldest first) and names the first edited, deleted,
//! inserted or reordered record by file and line.
//!
//! A restarted controller continues the chain from the file's last record; rotation
//! renames `FILE` to `FILE.1` (older ones to `.2`, ...) and the new file's first record
//! links to the last record of the old one.
use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufRead as _, BufReader, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
};

use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// `chain.prev` of the very first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How every chained line begins; the 64 hex digits of its hash follow.
const HASH_PREFIX: &[u8] = br#"{"chain":{"hash":""#;
/// The line without its hash field begins with this.
const UNHASHED_PREFIX: &[u8] = br#"{"chain":{"#;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 over `prev`, a newline and the line without its hash field.
fn line_hash(prev: &str, unhashed: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(unhashed);
    hex(&h.finalize())
}

/// Splits a chained line into its stored hash and the line without the hash field.
fn split_hash(line: &[u8]) -> Option<(&str, Vec<u8>)> {
    let rest = line.strip_prefix(HASH_PREFIX)?;
    let (hash, rest) = (rest.get(..64)?, rest.get(64..)?);
    let rest = rest.strip_prefix(b"\",")?;
    let hash = std::str::from_utf8(hash).ok().filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))?;
    let mut unhashed = Vec::with_capacity(line.len());
    unhashed.extend_from_slice(UNHASHED_PREFIX);
    unhashed.extend_from_slice(rest);
    Some((hash, unhashed))
}

/// The chain fields of a line that verifies against its own hash.
struct Link {
    hash: String,
    prev: String,
    seq: u64,
}

/// Checks a line's own hash. Err says what is wrong with it.
fn check_line(line: &str) -> Result<Link, String> {
    let record: Value =
        serde_json::from_str(line).map_err(|e| format!("not a JSON record ({e}): inserted or damaged"))?;
    let (Some(prev), Some(seq)) =
        (record.pointer("/chain/prev").and_then(Value::as_str), record.pointer("/chain/seq").and_then(Value::as_u64))
    else {
        return Err("record has no chain fields: inserted".into());
    };
    let (hash, unhashed) = split_hash(line.as_bytes()).ok_or("record has no chain hash in front: inserted")?;
    if line_hash(prev, &unhashed) != hash {
        return Err("record edited: its contents do not match its hash".into());
    }
    Ok(Link { hash: hash.to_string(), prev: prev.to_string(), seq })
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot continue the audit chain of {path}: its last line is not a chained record \
         ({reason}); move the file aside or verify it with `enforcer audit verify`"
    )]
    Unchainable { path: PathBuf, reason: String },
}

/// Appends chained records to a file, rotating it by size.
pub struct ChainWriter {
    path: PathBuf,
    /// Buffered: callers `flush` when their queue runs dry.
    file: io::BufWriter<File>,
    size: u64,
    prev: String,
    seq: u64,
    max_bytes: Option<u64>,
    keep: usize,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AuditError + '_ {
    move |source| AuditError::Io { path: path.to_path_buf(), source }
}

/// The chain position after the last record of `path` (None when empty or missing).
fn chain_tail(path: &Path) -> Result<Option<(String, u64)>, AuditError> {
    let Ok(file) = File::open(path) else { return Ok(None) };
    let mut last = None;
    for line in BufReader::new(file).lines() {
        let line = line.map_err(io_err(path))?;
        if !line.trim().is_empty() {
            last = Some(line);
        }
    }
    let Some(line) = last else { return Ok(None) };
    let link = check_line(&line).map_err(|reason| AuditError::Unchainable { path: path.into(), reason })?;
    Ok(Some((link.hash, link.seq)))
}

impl ChainWriter {
    /// Opens `path` for appending; `max_bytes` rotates before a record would pass it,
    /// keeping `keep` older files.
    pub fn open(path: &Path, max_bytes: Option<u64>, keep: usize) -> Result<Self, AuditError> {
        // Only a regular file is resumed and rotated: /dev/null must never be renamed,
        // and reading the tail of a FIFO would block.
        let regular = fs::metadata(path).map(|m| m.is_file()).unwrap_or(true);
        let max_bytes = max_bytes.filter(|_| regular);
        let tail = if regular { chain_tail(path)? } else { None };
        let (prev, seq) = match tail {
            Some((hash, seq)) => (hash, seq + 1),
            None if !regular => (GENESIS.to_string(), 0),
            None => match chain_tail(&rotated(path, 1))? {
                // A rotation happened and the new file was never written.
                Some((hash, seq)) => (hash, seq + 1),
                None => (GENESIS.to_string(), 0),
            },
        };
        let mut file = OpenOptions::new().create(true).append(true).open(path).map_err(io_err(path))?;
        let size = if regular { file.seek(SeekFrom::End(0)).map_err(io_err(path))? } else { 0 };
        Ok(Self {
            path: path.into(),
            file: io::BufWriter::with_capacity(1 << 16, file),
            size,
            prev,
            seq,
            max_bytes,
            keep: keep.max(1),
        })
    }

    /// Appends one record (buffered: call `flush` when no more are waiting).
    pub fn append(&mut self, record: &Value) -> Result<(), AuditError> {
        self.append_json(&serde_json::to_vec(record).expect("serializable"))
    }

    /// Appends an event already serialized as a JSON object (with no "chain" key).
    pub fn append_json(&mut self, event: &[u8]) -> Result<(), AuditError> {
        let fields = event.strip_prefix(b"{").unwrap_or(b"}");
        let chain = format!(r#"{{"chain":{{"prev":"{}","seq":{}}}"#, self.prev, self.seq);
        let mut unhashed = Vec::with_capacity(chain.len() + event.len() + 1);
        unhashed.extend_from_slice(chain.as_bytes());
        if fields != b"}" {
            unhashed.push(b',');
        }
        unhashed.extend_from_slice(fields);
        let hash = line_hash(&self.prev, &unhashed);
        let mut line = Vec::with_capacity(unhashed.len() + 80);
        line.extend_from_slice(HASH_PREFIX);
        line.extend_from_slice(hash.as_bytes());
        line.extend_from_slice(b"\",");
        line.extend_from_slice(&unhashed[UNHASHED_PREFIX.len()..]);
        line.push(b'\n');
        if self.max_bytes.is_some_and(|max| self.size > 0 && self.size + line.len() as u64 > max) {
            self.rotate()?;
        }
        self.file.write_all(&line).map_err(io_err(&self.path))?;
        self.size += line.len() as u64;
        self.prev = hash;
        self.seq += 1;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), AuditError> {
        self.file.flush().map_err(io_err(&self.path))
    }

    fn rotate(&mut self) -> Result<(), AuditError> {
        self.flush()?;
        for n in (1..self.keep).rev() {
            let from = rotated(&self.path, n);
            if from.exists() {
                fs::rename(&from, rotated(&self.path, n + 1)).map_err(io_err(&from))?;
            }
        }
        fs::rename(&self.path, rotated(&self.path, 1)).map_err(io_err(&self.path))?;
        let file = OpenOptions::new().create(true).append(true).open(&self.path).map_err(io_err(&self.path))?;
        self.file = io::BufWriter::with_capacity(1 << 16, file);
        self.size = 0;
        Ok(())
    }
}

impl Drop for ChainWriter {
    fn drop(&mut self) {
        let _ = self.file.flush();
    }
}

/// `FILE.n`
pub fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// What `verify` found wrong first.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {problem}")]
pub struct Tampering {
    pub file: String,
    pub line: usize,
    pub problem: String,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    /// The chain did not start at genesis: earlier segments were not given.
    pub starts_mid_chain: bool,
}

/// Verifies files holding one chain, oldest first.
pub fn verify(files: &[PathBuf]) -> Result<Verified, Tampering> {
    let mut previous: Option<(String, u64)> = None;
    let mut records = 0;
    let mut starts_mid_chain = false;
    for path in files {
        let file = path.display().to_string();
        let fail = |line: usize, problem: String| Tampering { file: file.clone(), line, problem };
        let text = fs::read_to_string(path).map_err(|e| fail(0, format!("cannot read: {e}")))?;
        // Where each seq stands, to tell a reordering from a deletion.
        let seq_lines: Vec<(u64, usize)> = text
            .lines()
            .enumerate()
            .filter_map(|(i, l)| Some((serde_json::from_str::<Value>(l).ok()?.pointer("/chain/seq")?.as_u64()?, i + 1)))
            .collect();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            let Link { hash, prev, seq } = check_line(line).map_err(|problem| fail(n, problem))?;
            let (hash, prev) = (hash.as_str(), prev.as_str());
            match &previous {
                None if prev != GENESIS => starts_mid_chain = true,
                None => {}
                Some((prev_hash, prev_seq)) if prev != prev_hash => {
                    let missing = prev_seq + 1;
                    let later = seq_lines.iter().find(|&&(s, l)| s == missing && l > n).map(|&(_, l)| l);
                    let problem = if seq <= *prev_seq {
                        format!("record inserted or reordered (seq {seq} follows {prev_seq})")
                    } else if let (true, Some(at)) = (seq > missing, later) {
                        format!("records reordered: seq {missing} should be here but stands at line {at}")
                    } else if seq > missing {
                        format!("{} record(s) deleted before this one (seq {seq} follows {prev_seq})", seq - missing)
                    } else {
                        "record inserted or replaced: it does not link to the record before it".into()
                    };
                    return Err(fail(n, problem));
                }
                Some(_) => {}
            }
            previous = Some((hash.to_string(), seq));
            records += 1;
        }
    }
    Ok(Verified { records, starts_mid_chain })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Dir(PathBuf);
    impl Dir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("enforcer-audit-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn write(path: &Path, n: u64) {
        let mut w = ChainWriter::open(path, None, 3).unwrap();
        for i in 0..n {
            w.append(&json!({ "event": { "action": "network-connect" }, "i": i })).unwrap();
        }
    }

    fn lines(path: &Path) -> Vec<String> {
        fs::read_to_string(path).unwrap().lines().map(String::from).collect()
    }

    fn set_lines(path: &Path, lines: &[String]) {
        fs::write(path, lines.join("\n") + "\n").unwrap();
    }

    fn problem(path: &Path) -> String {
        verify(&[path.to_path_buf()]).expect_err("tampering must be found").to_string()
    }

    #[test]
    fn an_untouched_chain_verifies_and_survives_a_restart() {
        let d = Dir::new("ok");
        let f = d.0.join("events.jsonl");
        write(&f, 3);
        write(&f, 2); // a restarted controller continues the chain
        assert_eq!(verify(std::slice::from_ref(&f)), Ok(Verified { records: 5, starts_mid_chain: false }));
        let seqs: Vec<u64> = lines(&f)
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["chain"]["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn each_kind_of_tampering_is_named_with_its_line() {
        let d = Dir::new("tamper");
        let f = d.0.join("events.jsonl");
        write(&f, 5);
        let original = lines(&f);

        let mut edited = original.clone();
        edited[2] = edited[2].replace("network-connect", "network-sendmsg");
        set_lines(&f, &edited);
        let p = problem(&f);
        assert!(p.ends_with(":3: record edited: its contents do not match its hash"), "{p}");

        let mut deleted = original.clone();
        deleted.remove(1);
        set_lines(&f, &deleted);
        let p = problem(&f);
        assert!(p.ends_with(":2: 1 record(s) deleted before this one (seq 2 follows 0)"), "{p}");

        let mut reordered = original.clone();
        reordered.swap(1, 2);
        set_lines(&f, &reordered);
        let p = problem(&f);
        assert!(p.ends_with(":2: records reordered: seq 1 should be here but stands at line 3"), "{p}");

        // An inserted record with a correct hash of its own still breaks the next link.
        let mut inserted = original.clone();
        // A copy of record 1 with other contents and its own hash recomputed.
        let (_, unhashed) = split_hash(original[1].as_bytes()).unwrap();
        let unhashed = String::from_utf8(unhashed).unwrap().replace("\"i\":1", "\"i\":99");
        let prev = serde_json::from_str::<Value>(&original[1]).unwrap()["chain"]["prev"].as_str().unwrap().to_string();
        let forged = format!(
            "{{\"chain\":{{\"hash\":\"{}\",{}",
            line_hash(&prev, unhashed.as_bytes()),
            &unhashed[UNHASHED_PREFIX.len()..]
        );
        assert!(check_line(&forged).is_ok(), "the forged record is self-consistent");
        inserted.insert(2, forged);
        set_lines(&f, &inserted);
        let p = problem(&f);
        assert!(p.ends_with(":3: record inserted or reordered (seq 1 follows 1)"), "{p}");

        let mut plain = original.clone();
        plain.insert(1, r#"{"event":{"action":"network-connect"}}"#.into());
        set_lines(&f, &plain);
        assert!(problem(&f).ends_with(":2: record has no chain fields: inserted"), "{}", problem(&f));
    }

    #[test]
    fn rotation_keeps_one_chain_across_files() {
        let d = Dir::new("rotate");
        let f = d.0.join("events.jsonl");
        let mut w = ChainWriter::open(&f, Some(400), 3).unwrap();
        for i in 0..12 {
            w.append(&json!({ "i": i, "pad": "x".repeat(60) })).unwrap();
        }
        drop(w);
        let files = vec![rotated(&f, 3), rotated(&f, 2), rotated(&f, 1), f.clone()];
        assert!(files.iter().all(|p| p.exists()), "expected three rotated files and the live one");
        assert!(!rotated(&f, 4).exists(), "keep = 3");
        let v = verify(&files).unwrap();
        assert!(v.starts_mid_chain, "the oldest segments were rotated away");
        assert!(v.records >= 4);
        // Dropping a middle segment is a deletion.
        let gap = vec![rotated(&f, 3), rotated(&f, 1), f.clone()];
        assert!(verify(&gap).unwrap_err().problem.contains("deleted"));
    }

    #[test]
    fn never_rotates_or_resumes_a_device() {
        let mut w = ChainWriter::open(Path::new("/dev/null"), Some(10), 3).unwrap();
        for i in 0..5 {
            w.append(&json!({ "i": i, "pad": "x".repeat(40) })).unwrap();
        }
        assert!(Path::new("/dev/null").exists() && !rotated(Path::new("/dev/null"), 1).exists());
    }

    #[test]
    fn refuses_to_continue_a_damaged_file() {
        let d = Dir::new("damaged");
        let f = d.0.join("events.jsonl");
        write(&f, 2);
        let mut l = lines(&f);
        l[1] = l[1].replace("network-connect", "x");
        set_lines(&f, &l);
        let err = ChainWriter::open(&f, None, 3).err().expect("must refuse");
        assert!(err.to_string().contains("do not match its hash"), "{err}");
    }
}
