//! Reads of kernel memory at offsets taken from the running kernel's BTF.
//!
//! Branchless: `bpf_probe_read_kernel` zero-fills its destination when the read
//! faults, so a failed read is simply 0 (a NULL pointer, no inode number) and the
//! verifier sees one path per read instead of a success and a failure path, which in a
//! walk doubled the states at every step.
use aya_ebpf::helpers::generated::bpf_probe_read_kernel;

pub type Ptr = *const u8;

#[inline(always)]
fn read<T: Copy + Default>(base: Ptr, offset: u32) -> T {
    let mut value = T::default();
    // SAFETY: the helper writes at most size_of::<T>() bytes into `value` and zero-fills it on a fault.
    unsafe {
        bpf_probe_read_kernel(
            (&mut value as *mut T).cast(),
            size_of::<T>() as u32,
            base.wrapping_add(offset as usize).cast(),
        )
    };
    value
}

#[inline(always)]
pub fn read_ptr(base: Ptr, offset: u32) -> Ptr {
    read::<usize>(base, offset) as Ptr
}

#[inline(always)]
pub fn read_u32(base: Ptr, offset: u32) -> u32 {
    read(base, offset)
}

#[inline(always)]
pub fn read_u64(base: Ptr, offset: u32) -> u64 {
    read(base, offset)
}

/// A field offset: as the offsets table holds it (u32), or already widened (usize) by
/// a loop that copied it out of the table once.
pub trait Offset: Copy {
    fn bytes(self) -> usize;
}

impl Offset for u32 {
    #[inline(always)]
    fn bytes(self) -> usize {
        self as usize
    }
}

impl Offset for usize {
    #[inline(always)]
    fn bytes(self) -> usize {
        self
    }
}

/// A field of a struct the verifier knows the type of (a hook argument, or a pointer
/// loaded from one such field): a plain load, which the JIT guards against faults (a
/// NULL or bad pointer reads 0), instead of a helper call. The verifier refuses it on
/// a pointer it knows only as a number: use the `read_*` functions for those.
#[inline(always)]
pub fn load_ptr(base: Ptr, offset: impl Offset) -> Ptr {
    // SAFETY: a load the verifier checks against the BTF type of `base`; the JIT guards it against faults (a bad pointer reads 0).
    unsafe { core::ptr::read_volatile(base.wrapping_add(offset.bytes()) as *const Ptr) }
}

#[inline(always)]
pub fn load_u32(base: Ptr, offset: impl Offset) -> u32 {
    // SAFETY: a load the verifier checks against the BTF type of `base`; the JIT guards it against faults (a bad pointer reads 0).
    unsafe { core::ptr::read_volatile(base.wrapping_add(offset.bytes()) as *const u32) }
}

#[inline(always)]
pub fn load_u64(base: Ptr, offset: impl Offset) -> u64 {
    // SAFETY: a load the verifier checks against the BTF type of `base`; the JIT guards it against faults (a bad pointer reads 0).
    unsafe { core::ptr::read_volatile(base.wrapping_add(offset.bytes()) as *const u64) }
}
