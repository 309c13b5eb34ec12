// CPU feature detection (cpuid + xgetbv) and the Linux AMX permission request.
// Generic code: compiled for baseline x86-64, safe to call on any CPU.
#pragma once

#include <cstdint>

namespace fiddler {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, avx512_bf16 = false;
  bool amx_tile = false, amx_bf16 = false;
  bool os_avx = false;      // XCR0 enables YMM state
  bool os_avx512 = false;   // XCR0 enables opmask + ZMM state
  bool amx_permitted = false;  // arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) succeeded
  int physical_cores = 1;   // distinct (package, core) pairs among the CPUs this process may run on
  int logical_cpus = 1;     // CPUs in the affinity mask

  // Usable instruction-set levels (hardware and OS support both present).
  bool can_avx2() const { return avx2 && fma && os_avx; }
  bool can_avx512_bf16() const {
    return avx512f && avx512bw && avx512vl && avx512dq && avx512_bf16 && os_avx512 && can_avx2();
  }
  bool can_amx() const { return amx_tile && amx_bf16 && amx_permitted && can_avx512_bf16(); }
};

// Detected once (thread-safe); the first call also asks Linux for AMX tile-data permission when the CPU
// has AMX, which must happen before any thread touches a tile register.
const CpuFeatures& GetCpuFeatures();

// One logical CPU id per physical core, for optional pinning of pool threads.
int PhysicalCoreCpuIds(int* out, int max_out);

}  // namespace fiddler
