//! enforcer's kernel programs. One module per hook family; the shared policy lookups
//! are in `policy`, event and counter output in `emit`, kernel memory reads in `kmem`.
#![no_std]
#![no_main]

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
