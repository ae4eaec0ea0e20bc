// A kernel the CUDA tests launch on the caller's stream right after an acquire: it reads every
// 32-bit word of a tensor and adds word * (2 * index + 1) into *out (wrapping), a sum that does
// not depend on thread order but does on each word's position. Regenerate checksum.ptx with
// scripts/gen-ptx.sh.
#ifndef __global__
#define __global__ __attribute__((global))
#endif

extern "C" __global__ void strata_test_checksum(const unsigned int *data, unsigned long long words,
                                                unsigned int *out) {
  unsigned long long i = (unsigned long long)__nvvm_read_ptx_sreg_ctaid_x() *
                             __nvvm_read_ptx_sreg_ntid_x() +
                         __nvvm_read_ptx_sreg_tid_x();
  unsigned long long stride =
      (unsigned long long)__nvvm_read_ptx_sreg_nctaid_x() * __nvvm_read_ptx_sreg_ntid_x();
  unsigned int sum = 0;
  for (; i < words; i += stride) {
    sum += data[i] * (unsigned int)(2 * i + 1);
  }
  __atomic_fetch_add(out, sum, __ATOMIC_RELAXED);
}

// Keeps the caller's stream busy for about `cycles` clock cycles, so the host runs far ahead of
// the GPU: a buffer strata reused before the kernels after this one ran would show in their sums.
extern "C" __global__ void strata_test_spin(unsigned long long cycles) {
  unsigned long long start = __nvvm_read_ptx_sreg_clock64();
  while (__nvvm_read_ptx_sreg_clock64() - start < cycles) {
  }
}
