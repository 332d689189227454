//! enforcer: the user-space controller. Pure modules (`policy`, `compile`) turn YAML
//! into kernel table entries and never touch the kernel; `loader` is the only module
//! that uses aya; the rest wire them to the command line, events and metrics.
pub mod alerts;
pub mod audit;
pub mod btf;
pub mod cgroup;
pub mod compile;
pub mod controller;
pub mod dns;
pub mod doctor;
pub mod events;
pub mod fanotify;
pub mod files;
pub mod grants;
pub mod learned;
pub mod loader;
pub mod metrics;
pub mod policy;
pub mod probe;
pub mod sinks;

use std::sync::atomic::AtomicU64;

/// Policy reloads (SIGHUP) that were applied, and that were refused.
pub static POLICY_RELOADS: AtomicU64 = AtomicU64::new(0);
pub static POLICY_RELOAD_FAILURES: AtomicU64 = AtomicU64::new(0);
