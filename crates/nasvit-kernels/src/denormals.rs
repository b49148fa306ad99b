//! Denormal handling of the kernels' threads (x86 MXCSR flush-to-zero + denormals-are-zero).

/// MXCSR's flush-to-zero and denormals-are-zero bits.
#[cfg(target_arch = "x86_64")]
const FTZ_DAZ: u32 = (1 << 15) | (1 << 6);

#[cfg(target_arch = "x86_64")]
fn mxcsr() -> u32 {
    let mut csr: u32 = 0;
    // SAFETY: stmxcsr writes only the 4-byte local `csr`.
    unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags)) };
    csr
}

#[cfg(target_arch = "x86_64")]
fn set_mxcsr(csr: u32) {
    // SAFETY: ldmxcsr reads the 4-byte local `csr` into this thread's MXCSR; callers only change the denormal
    // bits (FTZ, DAZ), which change how later float operations of this thread round denormals, nothing about
    // memory.
    unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags)) };
}

/// Sets this thread's floating-point mode to flush denormal results and inputs to zero (x86 MXCSR FTZ + DAZ; a
/// no-op elsewhere), for good: the engine's pool workers (`kernels::pool`) run with it. With the supernet's
/// initial layer scales (1e-4) products fall into the denormal range, where Intel cores take a microcode assist
/// per operation: the `init` weights of `bench_runtimes` ran 15-20 % slower than the `random` ones before this.
/// Values below 1.2e-38 become 0, far under the tolerances the engine is held to.
pub fn flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    set_mxcsr(mxcsr() | FTZ_DAZ);
}

/// `flush_denormals` on the calling thread for the guard's life, then the caller's own mode again.
pub struct FlushDenormals(#[cfg(target_arch = "x86_64")] u32);

impl FlushDenormals {
    pub fn new() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let saved = mxcsr();
            set_mxcsr(saved | FTZ_DAZ);
            FlushDenormals(saved)
        }
        #[cfg(not(target_arch = "x86_64"))]
        FlushDenormals()
    }
}

impl Default for FlushDenormals {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for FlushDenormals {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        set_mxcsr(self.0);
    }
}
