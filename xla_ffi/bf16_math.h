// Scalar helpers shared by all paths. Everything is `static` on purpose: each translation unit is compiled
// for its own instruction set, and a shared (COMDAT) inline definition could let the linker pick an AVX-512
// copy for generic code.
#pragma once

#include <cstdint>
#include <cstring>

namespace fiddler {
namespace {

static inline float Bf16ToF32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even; NaN stays NaN (quiet).
static inline uint16_t F32ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

// exp(x) for x <= 0 side use in silu; branch-free so loops over it vectorise. Relative error ~2e-7.
static inline float FastExp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float log2e = 1.44269504088896341f;
  float nf = x * log2e;
  nf = nf >= 0 ? static_cast<float>(static_cast<int32_t>(nf + 0.5f))
               : static_cast<float>(static_cast<int32_t>(nf - 0.5f));
  float r = x - nf * 0.693145751953125f;  // Cody-Waite: ln2 = hi + lo
  r = r - nf * 1.428606765330187e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = (static_cast<int32_t>(nf) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, 4);
  return p * scale;
}

// IEEE half (the int4 scales) to float32, exactly (subnormals included); no F16C needed.
static inline float F16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(man & 0x400u)) man <<= 1, --exp;
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static inline float Silu(float g) { return g / (1.0f + FastExp(-g)); }

// Preserve NaN through the clamp in FastExp: x*sigmoid(x) with x NaN is NaN anyway (g / ...).

}  // namespace
}  // namespace fiddler
