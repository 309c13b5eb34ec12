// Portable scalar path: correct on any x86-64, slow. Activations are fp32 row-major.
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "bf16_math.h"
#include "kernels.h"

namespace fiddler {
namespace generic {
namespace {

size_t ActBytes(int64_t n, int64_t k) { return static_cast<size_t>(n * k) * sizeof(float); }

void Pack(const uint16_t* x, int64_t k, const int32_t* idx, int64_t /*n*/, int64_t t0, int64_t t1,
          void* act) {
  float* dst = static_cast<float*>(act);
  for (int64_t t = t0; t < t1; ++t) {
    const uint16_t* src = x + (idx ? idx[t] : t) * k;
    for (int64_t c = 0; c < k; ++c) dst[t * k + c] = Bf16ToF32(src[c]);
  }
}

float Dot(const uint16_t* w, const float* x, int64_t k) {
  float s = 0.f;
  for (int64_t c = 0; c < k; ++c) s += Bf16ToF32(w[c]) * x[c];
  return s;
}

void Phase1(const void* x_act, int64_t n, int64_t hidden, const uint16_t* w1, const uint16_t* w3,
            int64_t F, int64_t r0, int64_t r1, void* h_act) {
  const float* x = static_cast<const float*>(x_act);
  float* h = static_cast<float*>(h_act);
  for (int64_t j = r0; j < r1; ++j) {
    for (int64_t t = 0; t < n; ++t) {
      float g = Dot(w1 + j * hidden, x + t * hidden, hidden);
      float u = Dot(w3 + j * hidden, x + t * hidden, hidden);
      h[t * F + j] = Silu(g) * u;
    }
  }
}

void Phase2(const void* h_act, int64_t n, int64_t F, const uint16_t* w2, int64_t /*hidden*/, int64_t r0,
            int64_t r1, OutView out) {
  const float* h = static_cast<const float*>(h_act);
  for (int64_t i = r0; i < r1; ++i) {
    for (int64_t t = 0; t < n; ++t) {
      float y = Dot(w2 + i * F, h + t * F, F);
      if (out.f32) {
        static_cast<float*>(out.data)[t * out.ld + i] = y;
      } else {
        static_cast<uint16_t*>(out.data)[t * out.ld + i] = F32ToBf16(y);
      }
    }
  }
}

}  // namespace

const PathKernels kKernels = {"generic", false, 1, ActBytes, Pack, Phase1, Phase2};

}  // namespace generic
}  // namespace fiddler
