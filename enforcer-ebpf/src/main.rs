//! enforcer's kernel programs. One module per hook family; the shared policy lookups
//! are in `policy`, event and counter output in `emit`, kernel memory reads in `kmem`.
#![no_std]
#![no_main]
// Map keys are passed as the helpers take them, by reference: a key built by value in
// an argument is a different instruction sequence, and every instruction on the
// file_open path is measured (`cargo xtask bench`).
#![allow(clippy::needless_borrows_for_generic_args)]

mod emit;
mod files;
mod kmem;
mod maps;
mod net;
mod policy;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
