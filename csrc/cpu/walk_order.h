// Which of two ways the CPU kernels walk a tensor where both exist, chosen once per process, for rows
// (channels_last and (N, C) tensors) and for planes (NCHW) apart.
//
//   blocked:    row tiles whose rows span several register blocks are summed one block of channels
//               at a time, in registers, re-reading the tile once per block (tile_sums); the 16-bit
//               training forward over short planes normalizes each channel's planes while they are in
//               cache (two_pass), the 16-bit backward keeps its grouped plane tiles (grad_tiling), and
//               the backward takes planes of 256 bytes by blocks of channels (plane_block_channels).
//   sequential: the same row tiles are summed row after row into accumulators in memory, and that
//               forward (and over longer planes, when x takes 8 MiB or more) takes the statistics,
//               then one eval pass in memory order (stats_then_normalize); the backward over longer
//               16-bit planes one plane per tile in memory order, and over planes of 256 bytes
//               channel tiles.
//
// sequential reads every tensor in address order, which some hardware prefetchers need: blocked
// reads a few cache lines of each row per block (256 bytes of every 1 KB row for float32 (128, 256,
// 14, 14) channels_last), and a channel-by-channel pass jumps C * S values between a channel's
// planes. Measured (op alone, 1 thread, interleaved): on AMD EPYC (Zen 4, AVX512) sequential took the
// backward's sums of that tensor from 3.3-4.2 to 2.0-2.3 ms and the bfloat16 NCHW (128, 256, 14,
// 14) training forward from 2.6-3.3 to 1.56-1.69 ms (ATen 2.4-2.7); on an AMD EPYC with AVX2 it was
// chosen for the same reasons (tile_sums, stats_then_normalize). On an Intel Xeon (AVX512) blocked row
// sums measured 1.03x (float32) and 1.05x (bfloat16) faster for the channels_last training forward of
// (128, 256, 14, 14) once; the sequential row sums have been rewritten since (registers for each
// row's first vectors, sums side by side, two rows at a time, larger tiles), and at 7239c16 there
// (bench_kernels, 1 thread, alternated, two runs each, time over torch's, blocked -> sequential):
// (8, 2048, 7, 7) float32 channels_last training forward 1.15-1.21 -> 0.92-0.96, bfloat16 1.19 -> 0.80-0.81;
// (32, 1024, 14, 14) 0.82-0.87 -> 0.69-0.70 and 0.86-0.89 -> 0.63-0.67; (128, 256, 14, 14) bfloat16
// 0.67-0.68 -> 0.55-0.56, its backward 0.58-0.59 -> 0.48-0.49; the rest within the runs' spread. Its
// 16-bit NCHW planes stay blocked: sequential took the bfloat16 (32, 64, 56, 56) training forward from
// 0.57 to 0.66-0.69 of torch's time, the (128, 256, 14, 14) backward from 0.20-0.22 to 0.30-0.31.
// So: rows sequential on every processor; planes sequential on AMD (and Hygon) processors and in
// builds of 8-float vectors or fewer, blocked otherwise. BNFUSED_CPU_WALK=sequential|blocked sets both
// (read at the first kernel call; empty is unset, any other value an error).
// Each gives the same bits for any thread count; the two group the row sums, and the 16-bit plane sums,
// differently, so their bits can differ from each other's (channels_last inputs with wide rows, 16-bit
// NCHW inputs with long planes; the 256-byte planes' blocks and tiles give the same bits).
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

// true where the walk is sequential (see above).
struct Walks {
  bool rows, planes;
};

inline Walks sequential_walks() {
  static const Walks walks = []() -> Walks {
    const char* choice = std::getenv("BNFUSED_CPU_WALK");
    if (choice != nullptr && choice[0] != '\0') {  // set and not empty
      const std::string walk(choice);
      TORCH_CHECK(walk == "sequential" || walk == "blocked",
                  "bnfused: BNFUSED_CPU_WALK must be 'sequential' or 'blocked', got '", walk, "'");
      return {walk == "sequential", walk == "sequential"};
    }
    const std::string vendor = cpu_vendor();
    return {true, kNarrowVectors || vendor == "AuthenticAMD" || vendor == "HygonGenuine"};
  }();
  return walks;
}

}  // namespace bnfused::cpu
