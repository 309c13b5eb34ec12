// Ceiling probe for the AMX-BF16 units (not part of the library): TFLOP/s of tdpbf16ps with all operands in
// tile registers, with 2 A + 2 B tile loads per 4 products from L1, and with B streamed from an L2-sized
// buffer, for 1..N threads. Build and run on the device:
//   g++ -O2 -std=c++17 -pthread xla_ffi/tools/amx_ceiling.cc -o /tmp/amx_ceiling && /tmp/amx_ceiling 1 8 16
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#pragma GCC target("amx-tile,amx-bf16")

struct alignas(64) Cfg {
  uint8_t palette, start;
  uint8_t res[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

#define LD(t, p, s) __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(p), "r"((long)(s)) : "memory")
#define DP(c, a, b) __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)

static void Setup() {
  syscall(SYS_arch_prctl, 0x1023, 18);
  Cfg c;
  std::memset(&c, 0, sizeof(c));
  c.palette = 1;
  for (int i = 0; i < 8; ++i) c.colsb[i] = 64, c.rows[i] = 16;
  __asm__ volatile("ldtilecfg %0" ::"m"(c));
}

// mode 0: products only; 1: 2A+2B loads from 16 KB (L1); 2: A from 16 KB, B streamed over bbytes;
// 3/4: as 1/2 with each load issued right after the last product that reads its register (pipelined)
static double Work(int mode, size_t bbytes, long iters) {
  Setup();
  std::vector<uint16_t> a(8192, 0x3c00), b(bbytes / 2, 0x3c00);
  for (size_t i = 0; i < b.size(); ++i) b[i] = 0x3c00 | (i & 7);
  __asm__ volatile("tilezero %%tmm0\n tilezero %%tmm1\n tilezero %%tmm2\n tilezero %%tmm3" ::);
  LD(4, a.data(), 64);
  LD(5, a.data() + 512, 64);
  LD(6, b.data(), 64);
  LD(7, b.data() + 512, 64);
  const size_t nb = bbytes / 1024;
  size_t bi = 0;
  auto t0 = std::chrono::steady_clock::now();
  if (mode >= 3) {
    for (long i = 0; i < iters; ++i) {
      const uint16_t* ap = a.data() + ((i + 1) & 7) * 1024;
      const uint16_t* bp = mode == 3 ? a.data() + ((i + 4) & 7) * 1024 : b.data() + bi * 512;
      bi += 2;
      if (bi + 2 > nb) bi = 0;
      DP(0, 4, 6);
      DP(2, 4, 7);
      LD(4, ap, 64);
      DP(1, 5, 6);
      LD(6, bp, 64);
      DP(3, 5, 7);
      LD(5, ap + 512, 64);
      LD(7, bp + 512, 64);
    }
    auto t1 = std::chrono::steady_clock::now();
    __asm__ volatile("tilerelease" ::);
    return std::chrono::duration<double>(t1 - t0).count();
  }
  for (long i = 0; i < iters; ++i) {
    if (mode >= 1) {
      const uint16_t* ap = a.data() + (i & 7) * 1024;
      LD(4, ap, 64);
      LD(5, ap + 512, 64);
      const uint16_t* bp = mode == 1 ? a.data() + ((i + 3) & 7) * 1024 : b.data() + bi * 512;
      LD(6, bp, 64);
      LD(7, bp + 512, 64);
      bi += 2;
      if (bi + 2 > nb) bi = 0;
    }
    DP(0, 4, 6);
    DP(1, 5, 6);
    DP(2, 4, 7);
    DP(3, 5, 7);
  }
  auto t1 = std::chrono::steady_clock::now();
  __asm__ volatile("tilerelease" ::);
  return std::chrono::duration<double>(t1 - t0).count();
}

int main(int argc, char** argv) {
  const long iters = 200000;  // 4 products each: 16384 flop per product
  const char* names[] = {"tdp only", "2A+2B from L1", "A L1, B from 512KB", "A L1, B from 4MB",
                         "pipelined L1", "pipelined B 512KB"};
  const size_t bsz[] = {16384, 16384, 512 * 1024, 4 * 1024 * 1024, 16384, 512 * 1024};
  const int wmode[] = {0, 1, 2, 2, 3, 4};
  for (int ai = 1; ai < argc; ++ai) {
    const int T = std::atoi(argv[ai]);
    for (int mode = 0; mode < 6; ++mode) {
      std::vector<std::thread> th;
      std::vector<double> secs(T);
      for (int t = 0; t < T; ++t) th.emplace_back([&, t] { secs[t] = Work(wmode[mode], bsz[mode], iters); });
      for (auto& x : th) x.join();
      double mx = 0;
      for (double s : secs) mx = s > mx ? s : mx;
      const double flop = 4.0 * 16384 * iters * T;
      std::printf("amx_ceiling threads=%2d %-20s %7.2f TFLOP/s (%.2f per thread)\n", T, names[mode], flop / mx / 1e12,
                  flop / mx / 1e12 / T);
    }
  }
  return 0;
}
