#include "cpu_features.h"

#include <cpuid.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdio>
#include <set>
#include <utility>

namespace fiddler {
namespace {

constexpr int kArchGetXcompPerm = 0x1022;
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

uint64_t ReadXcr0() {
  uint32_t lo, hi;
  // xgetbv with ecx=0; only executed when CPUID says OSXSAVE is set.
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

bool ReadIntFile(const char* path, int* value) {
  FILE* f = std::fopen(path, "r");
  if (!f) return false;
  bool ok = std::fscanf(f, "%d", value) == 1;
  std::fclose(f);
  return ok;
}

// (package, core) -> first logical CPU seen, over the CPUs in our affinity mask.
int CoreMap(int* first_cpu, int max_out, int* logical) {
  cpu_set_t mask;
  CPU_ZERO(&mask);
  if (sched_getaffinity(0, sizeof(mask), &mask) != 0) return -1;
  std::set<std::pair<int, int>> seen;
  int n_out = 0, n_logical = 0;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &mask)) continue;
    ++n_logical;
    char path[128];
    int core = cpu, pkg = 0;
    std::snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu%d/topology/core_id", cpu);
    if (!ReadIntFile(path, &core)) core = cpu;
    std::snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu%d/topology/physical_package_id", cpu);
    if (!ReadIntFile(path, &pkg)) pkg = 0;
    if (seen.insert({pkg, core}).second) {
      if (first_cpu && n_out < max_out) first_cpu[n_out] = cpu;
      ++n_out;
    }
  }
  if (logical) *logical = n_logical;
  return n_out;
}

CpuFeatures Detect() {
  CpuFeatures f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  unsigned max_leaf = __get_cpuid_max(0, nullptr);
  bool osxsave = false;
  if (max_leaf >= 1 && __get_cpuid(1, &a, &b, &c, &d)) {
    f.fma = (c >> 12) & 1;
    osxsave = (c >> 27) & 1;
    bool avx = (c >> 28) & 1;
    f.f16c = (c >> 29) & 1;
    if (osxsave && avx) {
      uint64_t xcr0 = ReadXcr0();
      f.os_avx = (xcr0 & 0x6) == 0x6;
      f.os_avx512 = f.os_avx && (xcr0 & 0xE0) == 0xE0;
      bool os_amx = (xcr0 & (3ull << 17)) == (3ull << 17);
      if (max_leaf >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        f.avx2 = (b >> 5) & 1;
        f.avx512f = (b >> 16) & 1;
        f.avx512dq = (b >> 17) & 1;
        f.avx512bw = (b >> 30) & 1;
        f.avx512vl = (b >> 31) & 1;
        f.amx_bf16 = ((d >> 22) & 1) && os_amx;
        f.amx_tile = ((d >> 24) & 1) && os_amx;
        unsigned max_sub = a;
        if (max_sub >= 1) {
          __cpuid_count(7, 1, a, b, c, d);
          f.avx512_bf16 = (a >> 5) & 1;
        }
      }
    }
  }
  if (f.amx_tile && f.amx_bf16) {
    // Process-wide permission; without it the first tile instruction raises SIGILL.
    long rc = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata);
    unsigned long bitmask = 0;
    if (rc == 0 && syscall(SYS_arch_prctl, kArchGetXcompPerm, &bitmask) == 0) {
      f.amx_permitted = (bitmask >> kXfeatureXtiledata) & 1;
    }
  }
  int logical = 1;
  int cores = CoreMap(nullptr, 0, &logical);
  f.logical_cpus = logical > 0 ? logical : 1;
  f.physical_cores = cores > 0 ? cores : f.logical_cpus;
  return f;
}

}  // namespace

const CpuFeatures& GetCpuFeatures() {
  static const CpuFeatures features = Detect();
  return features;
}

int PhysicalCoreCpuIds(int* out, int max_out) { return CoreMap(out, max_out, nullptr); }

}  // namespace fiddler
