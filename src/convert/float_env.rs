//! The floating-point environment the conversions compute in.
//!
//! Every kernel, and the scalar reference, assumes Rust's default environment: round to nearest
//! even, subnormals neither flushed to zero (FTZ) nor read as zero (DAZ). A caller may have
//! changed its thread's: PyTorch's `torch.set_flush_denormal(True)` sets DAZ and FTZ on x86, and
//! a thread inherits its creator's, pool workers included. With DAZ, the fp8 decode, whose
//! smallest codes pass through f32 subnormals on their way to an exact value, would read them as
//! zero, and small weights would come out as zeros. So a conversion sets the default for its
//! duration, on each thread that works on it, and puts the caller's back.

/// MXCSR at power-on and in a new Rust program: every exception masked, round to nearest even,
/// FTZ and DAZ off.
#[cfg(target_arch = "x86_64")]
const DEFAULT_MXCSR: u32 = 0x1F80;

/// While it lives, this thread computes in the default environment; dropping it restores what
/// was there before.
pub(super) struct DefaultFloatEnvironment {
    #[cfg(target_arch = "x86_64")]
    saved: u32,
}

impl DefaultFloatEnvironment {
    /// Sets the default environment on this thread if it differs (reading MXCSR costs about as
    /// much as a load; writing it, only where needed, a few dozen cycles).
    pub(super) fn enter() -> DefaultFloatEnvironment {
        #[cfg(target_arch = "x86_64")]
        {
            let saved = read_mxcsr();
            if saved != DEFAULT_MXCSR {
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
        if self.saved != DEFAULT_MXCSR {
            write_mxcsr(self.saved);
        }
    }
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

/// Sets this thread's MXCSR. Not `pure` or `nomem`: the compiler neither drops it nor moves
/// the kernels' loads and stores (and so their arithmetic, which depends on them) across it.
#[cfg(target_arch = "x86_64")]
pub(super) fn write_mxcsr(value: u32) {
    // SAFETY: ldmxcsr loads a 4-byte value from `value`, a live u32. Callers pass the default or
    // a value this thread had, neither of which sets a reserved bit (which would fault).
    unsafe {
        std::arch::asm!("ldmxcsr [{}]", in(reg) &value, options(nostack, preserves_flags, readonly))
    };
}
