//! The floating-point environment the conversions compute in.
//!
//! Every kernel, and the scalar reference, assumes Rust's default environment: round to nearest
//! even, subnormals neither flushed to zero (FTZ) nor read as zero (DAZ). A caller may have
//! changed its thread's: PyTorch's `torch.set_flush_denormal(True)` sets DAZ and FTZ on x86, and
//! a thread inherits its creator's, pool workers included. With DAZ, the fp8 decode, whose
//! smallest codes pass through f32 subnormals on their way to an exact value, would read them as
//! zero, and small weights would come out as zeros. So on x86_64 a conversion sets the default
//! for its duration, on each thread that works on it, and puts the caller's back. Elsewhere the
//! environment is left as it is (aarch64's FPCR.FZ would flush those codes the same way).
//!
//! Rust itself assumes the default environment, so code run under another is outside its rules
//! (rust-lang/stdarch#1454): this guard is a best effort that holds in practice, because the
//! guarded work sits in calls that are not inlined across it, whose stores cannot move past the
//! restoring write.

/// MXCSR at power-on and in a new Rust program: every exception masked, round to nearest even,
/// FTZ and DAZ off.
#[cfg(target_arch = "x86_64")]
const DEFAULT_MXCSR: u32 = 0x1F80;
/// MXCSR's exception flags (bits 0-5), which record what happened rather than govern what
/// happens: an inexact result sets one, so a thread in the default usually reads 0x1FA0.
#[cfg(target_arch = "x86_64")]
const EXCEPTION_FLAGS: u32 = 0x3F;

/// While it lives, this thread computes in the default environment; dropping it restores what
/// was there before.
pub(super) struct DefaultFloatEnvironment {
    #[cfg(target_arch = "x86_64")]
    saved: u32,
}

impl DefaultFloatEnvironment {
    /// Sets the default environment on this thread if its controls differ (reading MXCSR costs
    /// about as much as a load; writing it, only where needed, a few dozen cycles).
    pub(super) fn enter() -> DefaultFloatEnvironment {
        #[cfg(target_arch = "x86_64")]
        {
            let saved = read_mxcsr();
            if differs_from_default(saved) {
                write_mxcsr(DEFAULT_MXCSR);
            }
            DefaultFloatEnvironment { saved }
        }
        // Elsewhere (aarch64's FPCR.FZ, say) the environment is left as it is.
        #[cfg(not(target_arch = "x86_64"))]
        DefaultFloatEnvironment {}
    }
}

impl Drop for DefaultFloatEnvironment {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        if differs_from_default(self.saved) {
            write_mxcsr(self.saved);
        }
    }
}

/// Whether `mxcsr`'s controls (not its exception flags) differ from the default's.
#[cfg(target_arch = "x86_64")]
fn differs_from_default(mxcsr: u32) -> bool {
    mxcsr & !EXCEPTION_FLAGS != DEFAULT_MXCSR
}

/// This thread's MXCSR.
#[cfg(target_arch = "x86_64")]
pub(super) fn read_mxcsr() -> u32 {
    let mut value = 0u32;
    // SAFETY: stmxcsr stores the 4-byte register into `value`, a live u32; SSE is part of the
    // x86_64 baseline. Not `nomem`: the compiler keeps memory accesses on their side of it.
    unsafe {
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut value, options(nostack, preserves_flags))
    };
    value
}

/// Sets this thread's MXCSR. Neither `pure`, `nomem` nor `readonly`: the compiler may neither
/// drop it nor move memory accesses across it (arithmetic on registers no asm option orders; see
/// the module's note).
#[cfg(target_arch = "x86_64")]
pub(super) fn write_mxcsr(value: u32) {
    // SAFETY: ldmxcsr loads a 4-byte value from `value`, a live u32. Callers pass the default or
    // a value this thread had, neither of which sets a reserved bit (which would fault).
    unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &value, options(nostack, preserves_flags)) };
}
