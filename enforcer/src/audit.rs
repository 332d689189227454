//! The tamper-evident audit trail: every record a file sink writes carries
//! `chain.seq`, `chain.prev` (the SHA-256 of the previous record) and `chain.hash` (its
//! own: SHA-256 of `prev` and the record's canonical JSON without `chain.hash`).
//! `verify` walks one or more files (rotated segments oldest first) and names the first
//! edited, deleted, inserted or reordered record by file and line.
//!
//! A restarted controller continues the chain from the file's last record; rotation
//! renames `FILE` to `FILE.1` (older ones to `.2`, ...) and the new file's first record
//! links to the last record of the old one.
use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufRead as _, BufReader, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
};

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// `chain.prev` of the very first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The hash of a record: over `prev` and the record's canonical JSON (keys sorted, as
/// serde_json's map keeps them) with `chain.hash` removed.
fn record_hash(record: &Value) -> String {
    let mut unhashed = record.clone();
    if let Some(chain) = unhashed.get_mut("chain").and_then(Value::as_object_mut) {
        chain.remove("hash");
    }
    hash_unhashed(&unhashed)
}

/// `record_hash` of a record that has no `chain.hash` yet.
fn hash_unhashed(record: &Value) -> String {
    let prev = record.pointer("/chain/prev").and_then(Value::as_str).unwrap_or_default();
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(serde_json::to_vec(record).expect("serializable"));
    hex(&h.finalize())
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}")]
    Io { path: PathBuf, #[source] source: io::Error },
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
    let unchainable = |reason: &str| AuditError::Unchainable { path: path.into(), reason: reason.into() };
    let record: Value = serde_json::from_str(&line).map_err(|e| unchainable(&e.to_string()))?;
    let hash = record.pointer("/chain/hash").and_then(Value::as_str).ok_or_else(|| unchainable("no chain.hash"))?;
    let seq = record.pointer("/chain/seq").and_then(Value::as_u64).ok_or_else(|| unchainable("no chain.seq"))?;
    if record_hash(&record) != hash {
        return Err(unchainable("its hash does not match its contents"));
    }
    Ok(Some((hash.to_string(), seq)))
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
        Ok(Self { path: path.into(), file: io::BufWriter::with_capacity(1 << 16, file), size, prev, seq, max_bytes, keep: keep.max(1) })
    }

    /// Appends one record (buffered: call `flush` when no more are waiting).
    pub fn append(&mut self, mut record: Value) -> Result<(), AuditError> {
        record["chain"] = json!({ "seq": self.seq, "prev": self.prev });
        // Serialize once: the hashed text is the record without chain.hash, and the
        // written line is that text with the hash spliced in as chain's first key
        // (keys serialize sorted). A raw `"chain":{` can only be the top-level key:
        // quotes inside strings are escaped, and no nested object has a "chain" key.
        let unhashed = serde_json::to_vec(&record).expect("serializable");
        let mut h = Sha256::new();
        h.update(self.prev.as_bytes());
        h.update(b"\n");
        h.update(&unhashed);
        let hash = hex(&h.finalize());
        const KEY: &[u8] = b"\"chain\":{";
        let at = unhashed.windows(KEY.len()).position(|w| w == KEY).expect("chain was inserted") + KEY.len();
        let mut line = Vec::with_capacity(unhashed.len() + 80);
        line.extend_from_slice(&unhashed[..at]);
        line.extend_from_slice(format!("\"hash\":\"{hash}\",").as_bytes());
        line.extend_from_slice(&unhashed[at..]);
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
            let record: Value =
                serde_json::from_str(line).map_err(|e| fail(n, format!("not a JSON record ({e}): inserted or damaged")))?;
            let (Some(hash), Some(prev), Some(seq)) = (
                record.pointer("/chain/hash").and_then(Value::as_str),
                record.pointer("/chain/prev").and_then(Value::as_str),
                record.pointer("/chain/seq").and_then(Value::as_u64),
            ) else {
                return Err(fail(n, "record has no chain fields: inserted".into()));
            };
            if record_hash(&record) != hash {
                return Err(fail(n, "record edited: its contents do not match its hash".into()));
            }
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
            w.append(json!({ "event": { "action": "network-connect" }, "i": i })).unwrap();
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
        let seqs: Vec<u64> = lines(&f).iter().map(|l| serde_json::from_str::<Value>(l).unwrap()["chain"]["seq"].as_u64().unwrap()).collect();
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
        let mut forged: Value = serde_json::from_str(&original[1]).unwrap();
        forged["i"] = json!(99);
        forged["chain"]["hash"] = json!(record_hash(&forged));
        inserted.insert(2, serde_json::to_string(&forged).unwrap());
        set_lines(&f, &inserted);
        let p = problem(&f);
        assert!(p.ends_with(":3: record inserted or reordered (seq 1 follows 1)"), "{p}");

        let mut plain = original.clone();
        plain.insert(1, r#"{"event":{"action":"network-connect"}}"#.into());
        set_lines(&f, &plain);
        assert!(problem(&f).ends_with(":2: record has no chain fields: inserted"));
    }

    #[test]
    fn rotation_keeps_one_chain_across_files() {
        let d = Dir::new("rotate");
        let f = d.0.join("events.jsonl");
        let mut w = ChainWriter::open(&f, Some(400), 3).unwrap();
        for i in 0..12 {
            w.append(json!({ "i": i, "pad": "x".repeat(60) })).unwrap();
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
            w.append(json!({ "i": i, "pad": "x".repeat(40) })).unwrap();
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
        assert!(err.to_string().contains("hash does not match"), "{err}");
    }
}
