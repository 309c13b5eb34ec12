// Portable scalar path: correct on any x86-64, slow. Activations are fp32 row-major.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

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

// Row j of a quantised [rows, k] matrix as float32 weights q * scale (kernels.h).
void DequantRow(const QuantMatrix& m, int64_t k, int64_t j, float* row) {
  if (m.format == WeightFormat::kInt8) {
    const int8_t* q = static_cast<const int8_t*>(m.data) + j * k;
    const float s = static_cast<const float*>(m.scales)[j];
    for (int64_t c = 0; c < k; ++c) row[c] = static_cast<float>(q[c]) * s;
    return;
  }
  const uint8_t* q = static_cast<const uint8_t*>(m.data) + j * (k / 2);
  const uint16_t* s = static_cast<const uint16_t*>(m.scales) + j * (k / m.group);
  for (int64_t c = 0; c < k; ++c) {
    const int nib = (q[c / 2] >> (4 * (c & 1))) & 0xF;
    row[c] = static_cast<float>(nib >= 8 ? nib - 16 : nib) * F16ToF32(s[c / m.group]);
  }
}

float DotF32(const float* w, const float* x, int64_t k) {
  float s = 0.f;
  for (int64_t c = 0; c < k; ++c) s += w[c] * x[c];
  return s;
}

thread_local std::vector<float> tl_rows;

void Phase1Q(const void* x_act, int64_t n, int64_t hidden, const QuantMatrix& w1, const QuantMatrix& w3,
             int64_t F, int64_t r0, int64_t r1, void* h_act) {
  const float* x = static_cast<const float*>(x_act);
  float* h = static_cast<float*>(h_act);
  tl_rows.resize(2 * static_cast<size_t>(hidden));
  float *g = tl_rows.data(), *u = g + hidden;
  for (int64_t j = r0; j < r1; ++j) {
    DequantRow(w1, hidden, j, g);
    DequantRow(w3, hidden, j, u);
    for (int64_t t = 0; t < n; ++t)
      h[t * F + j] = Silu(DotF32(g, x + t * hidden, hidden)) * DotF32(u, x + t * hidden, hidden);
  }
}

void Phase2Q(const void* h_act, int64_t n, int64_t F, const QuantMatrix& w2, int64_t /*hidden*/, int64_t r0,
             int64_t r1, OutView out) {
  const float* h = static_cast<const float*>(h_act);
  tl_rows.resize(static_cast<size_t>(F));
  float* w = tl_rows.data();
  for (int64_t i = r0; i < r1; ++i) {
    DequantRow(w2, F, i, w);
    for (int64_t t = 0; t < n; ++t) {
      const float y = DotF32(w, h + t * F, F);
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
const QuantKernels kQuantKernels = {Phase1Q, Phase2Q};

}  // namespace generic
}  // namespace fiddler
