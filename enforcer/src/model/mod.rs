//! The pure core: policy files in, kernel table entries out. Nothing here touches the
//! kernel's BPF objects or any other layer of the crate; `file_tables` reads the
//! filesystem (stat, readlink) to turn paths into inodes, nothing else.
//!
//! - `parse`: YAML to a validated `policy::Policy`, errors with file:line:column;
//! - `compile`: a policy's network rules to LPM-trie entries;
//! - `file_tables`: a policy's file rules to inode tables, and the model of the walk;
//! - `grants`: time-limited extra rules and the policy they make.
pub mod compile;
pub mod file_tables;
pub mod grants;
pub mod parse;
pub mod policy;

pub use compile::{CompiledPolicy, compile_policy};
pub use parse::{PolicyError, parse_policy_file, parse_policy_str};
pub use policy::Policy;
