// AVX512_BF16 path (vdpbf16ps): the decode / small-batch path. Memory-bound for small n, so each thread streams
// its weight rows exactly once (8 rows at a time, 64 bytes per row per step) and dots them with all n tokens,
// whose bf16 rows stay in L1/L2. Activations: bf16 row-major [n, k]; x is read in place.
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kernels.h"

#if defined(FIDDLER_ISA_EMULATION)
#include "emulation/isa_emulation.h"
#else
#include <immintrin.h>
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#endif

#include "bf16_math.h"

namespace fiddler {
namespace avx512 {
namespace {

constexpr int kRows = 8;    // weight rows per micro-kernel (phase 1: 4 of w1 + 4 of w3)
constexpr int kTokens = 2;  // tokens per micro-kernel

inline __m512bh AsBf16(__m512i v) {
#if defined(FIDDLER_ISA_EMULATION)
  return EmuAsBf16(v);
#else
  return (__m512bh)v;
#endif
}

// A bf16 row is its pointer (avx512_dot.inc's accessors).
inline __m512bh RowWeights(const uint16_t* w, int64_t c) { return AsBf16(_mm512_loadu_si512(w + c)); }
inline __m512bh RowWeightsMasked(const uint16_t* w, int64_t c, __mmask32 m) {
  return AsBf16(_mm512_maskz_loadu_epi16(m, w + c));
}
inline const uint16_t* RowAt(const uint16_t* w, int64_t i) { return w + i; }
inline float RowSum(const uint16_t*, float sum) { return sum; }

#include "avx512_dot.inc"

size_t ActBytes(int64_t n, int64_t k) { return static_cast<size_t>(n * k) * sizeof(uint16_t); }

void Pack(const uint16_t* x, int64_t k, const int32_t* idx, int64_t /*n*/, int64_t t0, int64_t t1,
          void* act) {
  uint16_t* dst = static_cast<uint16_t*>(act);
  for (int64_t t = t0; t < t1; ++t) {
    std::memcpy(dst + t * k, x + (idx ? idx[t] : t) * k, static_cast<size_t>(k) * sizeof(uint16_t));
  }
}

using Act = uint16_t;
inline Act StoreH(float v) { return F32ToBf16(v); }

#include "row_kernel_phases.inc"

}  // namespace

const PathKernels kKernels = {"avx512_bf16", true, kRows / 2, ActBytes, Pack, Phase1, Phase2};

}  // namespace avx512
}  // namespace fiddler
