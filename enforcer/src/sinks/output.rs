//! Where event lines go: stdout, stderr, or a hash-chained file (`chain`).
use std::{
    io::{self, Write as _},
    path::Path,
};

use super::{
    Outgoing,
    chain::{AuditError, ChainWriter},
};

/// Where event lines go. Files get the hash-chained audit format (`audit`).
pub enum Sink {
    Stdout,
    Stderr,
    File(ChainWriter),
}

/// Size-based rotation of a file sink.
#[derive(Clone, Copy, Debug)]
pub struct Rotation {
    pub max_bytes: u64,
    pub keep: usize,
}

impl Sink {
    /// `-` is stdout; anything else a chained file, continued if it exists.
    pub fn open(target: &str, rotation: Rotation) -> Result<Self, AuditError> {
        if target == "-" {
            return Ok(Self::Stdout);
        }
        ChainWriter::open(Path::new(target), Some(rotation.max_bytes), rotation.keep).map(Self::File)
    }

    /// Writes one event; files buffer until `flush`.
    pub fn write_event(&mut self, event: &Outgoing) -> io::Result<()> {
        match self {
            Self::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(&event.json)?;
                out.write_all(b"\n")?;
                out.flush()
            }
            Self::Stderr => {
                let mut err = io::stderr().lock();
                err.write_all(&event.json)?;
                err.write_all(b"\n")
            }
            Self::File(chain) => chain.append_json(&event.json).map_err(io::Error::other),
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::File(chain) => chain.flush().map_err(io::Error::other),
            _ => Ok(()),
        }
    }
}
