#![no_std]
//! The kernel programs live in `main.rs` (a `bpfel-unknown-none` binary built by
//! aya-build); this empty library lets `enforcer` declare a build-dependency on us.
