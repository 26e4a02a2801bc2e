// Test kernels for programmatic dependent launch (gpu-check --opt-in pdl; not used by the
// worker). `pdl_late_copy` lets its successor launch at once, then writes late, so a
// successor that reads anything before its griddepcontrol.wait sees the old bytes: with
// it the GPU check shows that the PDL builds of the GEMV and of decode attention read
// their predecessor's output only after the wait, deterministically rather than when a
// race happens to go wrong. `pdl_probe` shows that the overlap happens at all (else
// those checks prove nothing and say so).
#include "common.cuh"

namespace sov {

__device__ __forceinline__ unsigned long long globaltimer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}

}  // namespace sov

// dst[dst_offset ..][.. n] = src[.. n] (bytes), `delay_ns` after the kernel started.
extern "C" __global__ void __launch_bounds__(128)
    pdl_late_copy(const unsigned char* __restrict__ src, unsigned char* dst,
                  long long dst_offset, long long n, long long delay_ns) {
  sov::pdl_trigger();
  sov::pdl_wait();
  const unsigned long long t0 = sov::globaltimer_ns();
  while (sov::globaltimer_ns() - t0 < (unsigned long long)delay_ns) {
  }
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x)
    dst[dst_offset + i] = src[i];
}

// seen = {word 0 of buf before griddepcontrol.wait, after it}.
extern "C" __global__ void __launch_bounds__(32) pdl_probe(const unsigned* buf, unsigned* seen) {
  sov::pdl_trigger();
  const unsigned before = sov::ld_before_wait16(buf).x;
  sov::pdl_wait();
  const unsigned after = *reinterpret_cast<const volatile unsigned*>(buf);
  if (threadIdx.x == 0) {
    seen[0] = before;
    seen[1] = after;
  }
}
