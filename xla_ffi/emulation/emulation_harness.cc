// Test harness: the AVX512_BF16 and AMX kernels compiled against isa_emulation.h (-DFIDDLER_ISA_EMULATION),
// driven single-threaded over arbitrary row splits. Built and loaded by tests/test_kernel_emulation.py.
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "kernels.h"

namespace fiddler {
int g_prefetch_bytes = 0;
}

extern "C" int fj_emu_expert_ffn(int path, const uint16_t* x, int64_t n, int64_t hidden, int64_t ffn,
                                 const uint16_t* w1, const uint16_t* w3, const uint16_t* w2, float* y,
                                 int64_t nsplit, int group_kib, int variant) {
  fiddler::g_amx_group_kib = group_kib;
  fiddler::g_amx_variant = variant;
  const fiddler::PathKernels* k = path == 3 ? &fiddler::avx512::kKernels : &fiddler::amx::kKernels;
  std::vector<unsigned char> xa(k->act_bytes(n, hidden)), ha(k->act_bytes(n, ffn));
  // Poison the packed buffers: every byte the kernels read must have been written.
  for (auto& b : xa) b = 0xff;
  for (auto& b : ha) b = 0xff;
  const void* xact = x;
  if (!k->direct_x) {
    for (int64_t s = 0; s < nsplit; ++s) k->pack(x, hidden, nullptr, n, n * s / nsplit, n * (s + 1) / nsplit, xa.data());
    xact = xa.data();
  }
  for (int64_t s = 0; s < nsplit; ++s)
    k->phase1(xact, n, hidden, w1, w3, ffn, ffn * s / nsplit, ffn * (s + 1) / nsplit, ha.data());
  fiddler::OutView o{y, hidden, true};
  for (int64_t s = 0; s < nsplit; ++s)
    k->phase2(ha.data(), n, ffn, w2, hidden, hidden * s / nsplit, hidden * (s + 1) / nsplit, o);
  return 0;
}

// Blocked AMX variant knobs (a value < 0 leaves one unchanged).
extern "C" void fj_emu_set_amx_blocking(int kc, int mb, int pass, int prefetch, int blocked_from, int pipeline) {
  if (kc >= 0) fiddler::g_amx_kc = kc;
  if (mb >= 0) fiddler::g_amx_mb = mb;
  if (pass >= 0) fiddler::g_amx_pass = pass;
  if (prefetch >= 0) fiddler::g_amx_prefetch = prefetch;
  if (blocked_from >= 0) fiddler::g_amx_blocked_from = blocked_from;
  if (pipeline >= 0) fiddler::g_amx_pipeline = pipeline;
}
