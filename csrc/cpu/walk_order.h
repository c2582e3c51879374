// Which of two ways the CPU kernels walk a tensor where both exist, chosen once per process.
//
//   blocked:    row tiles whose rows span several register blocks are summed one block of channels
//               at a time, in registers, re-reading the tile once per block (tile_sums); the 16-bit
//               training forward over short planes normalizes each channel's planes while they are in
//               cache (two_pass).
//   sequential: the same row tiles are summed row after row into accumulators in memory, and that
//               forward (and over longer planes, when x takes 8 MiB or more) takes the statistics,
//               then one eval pass in memory order (stats_then_normalize).
//
// sequential reads every tensor in address order, which some hardware prefetchers need: blocked
// reads a few cache lines of each row per block (256 bytes of every 1 KB row for float32 (128, 256,
// 14, 14) channels_last), and a channel-by-channel pass jumps C * S values between a channel's
// planes. Measured (op alone, 1 thread, interleaved): on AMD EPYC (Zen 4, AVX512) sequential took the
// backward's sums of that tensor from 3.3-4.2 to 2.0-2.3 ms and the bfloat16 NCHW (128, 256, 14,
// 14) training forward from 2.6-3.3 to 1.56-1.69 ms (ATen 2.4-2.7); on an AMD EPYC with AVX2 it was
// chosen for the same reasons (tile_sums, stats_then_normalize). On an Intel Xeon (AVX512), blocked
// sums measured 1.03x (float32) and 1.05x (bfloat16) faster for the channels_last training forward
// of (128, 256, 14, 14); AVX2 builds there run sequential (0c46db8's matrix: no cell above ATen's time).
// So: sequential on AMD (and Hygon) processors and in builds of 8-float vectors or fewer, blocked
// otherwise. BNFUSED_CPU_WALK=sequential|blocked overrides the choice (read at the first kernel call;
// empty is unset, any other value an error).
// Each gives the same bits for any thread count; the two group the row sums differently, so their
// bits can differ from each other's (channels_last 16-bit inputs, for one).
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#elif defined(_M_X64) || defined(_M_IX86)
#include <intrin.h>
#endif

namespace bnfused::cpu {

#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kNarrowVectors = false;
#else
constexpr bool kNarrowVectors = true;
#endif

// The processor's vendor string ("AuthenticAMD", "GenuineIntel", ...), empty off x86.
inline std::string cpu_vendor() {
  unsigned int regs[4] = {0, 0, 0, 0};  // eax, ebx, ecx, edx of leaf 0
#if defined(__x86_64__) || defined(__i386__)
  if (!__get_cpuid(0, &regs[0], &regs[1], &regs[2], &regs[3])) return "";
#elif defined(_M_X64) || defined(_M_IX86)
  int r[4];
  __cpuid(r, 0);
  for (int i = 0; i < 4; ++i) regs[i] = static_cast<unsigned int>(r[i]);
#else
  return "";
#endif
  char vendor[13];
  std::memcpy(vendor, &regs[1], 4);  // ebx, edx, ecx
  std::memcpy(vendor + 4, &regs[3], 4);
  std::memcpy(vendor + 8, &regs[2], 4);
  vendor[12] = '\0';
  return vendor;
}

inline bool sequential_walks() {
  static const bool sequential = [] {
    const char* choice = std::getenv("BNFUSED_CPU_WALK");
    if (choice != nullptr && choice[0] != '\0') {  // set and not empty
      const std::string walk(choice);
      TORCH_CHECK(walk == "sequential" || walk == "blocked",
                  "bnfused: BNFUSED_CPU_WALK must be 'sequential' or 'blocked', got '", walk, "'");
      return walk == "sequential";
    }
    const std::string vendor = cpu_vendor();
    return kNarrowVectors || vendor == "AuthenticAMD" || vendor == "HygonGenuine";
  }();
  return sequential;
}

}  // namespace bnfused::cpu
