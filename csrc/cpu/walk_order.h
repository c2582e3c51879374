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
//               channel tiles (but on Zen 1 and Zen 5: Walks::block_plane_bytes).
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
// builds of 8-float vectors or fewer, blocked otherwise. Long 16-bit planes go by channel, as blocked, on cores of
// half-width vector units (Zen 1: Walks::long_planes). BNFUSED_CPU_WALK=sequential|blocked sets every
// walk (read at the first kernel call; empty is unset, any other value an error).
// Each gives the same bits for any thread count; the two group the row sums, and the 16-bit plane sums,
// differently, so their bits can differ from each other's (channels_last inputs with wide rows, 16-bit
// NCHW inputs with long planes; the 256-byte planes' blocks and tiles give the same bits).
// Also here: the processor queries such choices read (CPUID, the vendor, vector-unit width, the L3's size).
#pragma once

#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
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

// EAX, EBX, ECX, EDX of CPUID leaf `leaf` (sub-leaf `subleaf`); zeros where the processor has no
// such leaf (or off x86).
inline std::array<unsigned int, 4> cpuid(unsigned int leaf, unsigned int subleaf = 0) {
  std::array<unsigned int, 4> regs{0, 0, 0, 0};
#if defined(__x86_64__) || defined(__i386__)
  if (__get_cpuid_max(leaf & 0x80000000u, nullptr) >= leaf) {
    __cpuid_count(leaf, subleaf, regs[0], regs[1], regs[2], regs[3]);
  }
#elif defined(_M_X64) || defined(_M_IX86)
  int r[4];
  __cpuid(r, static_cast<int>(leaf & 0x80000000u));
  if (static_cast<unsigned int>(r[0]) >= leaf) {
    __cpuidex(r, static_cast<int>(leaf), static_cast<int>(subleaf));
    for (int i = 0; i < 4; ++i) regs[i] = static_cast<unsigned int>(r[i]);
  }
#else
  (void)leaf;
  (void)subleaf;
#endif
  return regs;
}

// The processor's vendor string ("AuthenticAMD", "GenuineIntel", ...), empty off x86.
inline std::string cpu_vendor() {
  const std::array<unsigned int, 4> regs = cpuid(0);
  char vendor[13];
  std::memcpy(vendor, &regs[1], 4);  // ebx, edx, ecx
  std::memcpy(vendor + 4, &regs[3], 4);
  std::memcpy(vendor + 8, &regs[2], 4);
  vendor[12] = '\0';
  return vendor;
}

// Bytes of the level-3 cache that a core shares, from CPUID's cache descriptions (leaf 4 on Intel,
// 0x8000001D on AMD and Hygon: ways x partitions x line size x sets), 0 where none is described. Not
// the C library's figure: glibc's sysconf reads AMD's leaf 0x80000006, which a virtual machine on
// an AMD EPYC (Zen 1) reported as 64 MiB, the whole processor's, where a core's shared L3 (and
// 0x8000001D, and Linux's /sys) is 8 MiB.
inline int64_t l3_cache_bytes() {
  const std::string vendor = cpu_vendor();
  const unsigned int leaf = vendor == "AuthenticAMD" || vendor == "HygonGenuine" ? 0x8000001Du : 4u;
  for (unsigned int i = 0; i < 16; ++i) {
    const std::array<unsigned int, 4> r = cpuid(leaf, i);
    const unsigned int type = r[0] & 0x1Fu;  // 0: no more caches; 1 data, 2 instruction, 3 unified
    if (type == 0) break;
    if (((r[0] >> 5) & 0x7u) == 3 && type != 2) {
      const int64_t ways = ((r[1] >> 22) & 0x3FFu) + 1, partitions = ((r[1] >> 12) & 0x3FFu) + 1;
      const int64_t line = (r[1] & 0xFFFu) + 1, sets = int64_t(r[2]) + 1;
      return ways * partitions * line * sets;
    }
  }
  return 0;
}

// The processor's family from CPUID 1 (base plus extended family, as AMD numbers its families).
inline unsigned int cpu_family() {
  const unsigned int signature = cpuid(1)[0];
  return ((signature >> 8) & 0xFu) + ((signature >> 20) & 0xFFu);
}

// True on processors whose vector units are 128 bits wide and run each 256-bit operation as two:
// AMD's Zen and Zen+ (family 17h, models below 30h) and Hygon's Dhyana built on them (family 18h),
// or an AMD or Hygon processor whose CPUID Fn8000_001A EAX has FP128 (bit 0: 128-bit operations at
// full width) without FP256 (bit 2: 256-bit operations at full width). Zen 1 reports 0x3 there, Zen 3
// 0x6; a hypervisor may hide the leaf (zeros), not the family.
inline bool half_width_vector_units() {
  const std::string vendor = cpu_vendor();
  if (vendor != "AuthenticAMD" && vendor != "HygonGenuine") return false;
  const unsigned int signature = cpuid(1)[0];
  const unsigned int family = cpu_family();
  const unsigned int model = ((signature >> 4) & 0xFu) | (((signature >> 16) & 0xFu) << 4);
  const bool zen1 = (family == 0x17 && model < 0x30) || (vendor == "HygonGenuine" && family == 0x18);
  const unsigned int widths = cpuid(0x8000001Au)[0];
  return zen1 || ((widths & 1u) != 0 && (widths & 4u) == 0);
}

// true where the walk is sequential (see above). long_planes: 16-bit planes longer than
// kShortPlaneBytes, in tensors of several MiB, walked in memory order by the training forward
// (kLongPlanesInOrderBytes) and the backward (kGradPlanesInOrderBytes) where planes are sequential,
// except on cores of half-width vector units. There the conversions and arithmetic of a value take
// twice the issue slots, and a channel's planes walked C * S values apart while its second pass
// re-reads them from L2 gained more than memory order's prefetch-friendly streams (Zen 1, AVX2
// build, bench_kernels, bfloat16, three processes each way, in order -> by channel, training
// forward 2 / 1 threads: (32, 64, 56, 56) 3.11-3.18 -> 2.63-2.89 ms / 4.97-5.18 -> 4.45-4.69,
// (64, 128, 28, 28) 2.69-2.97 -> 2.54-2.75 / 4.50-4.77 -> 4.45-4.51; backward 2 threads 3.79-4.15 ->
// 3.69-3.94 and 4.11-4.25 -> 3.75-4.09). Short planes keep memory order there ((128, 256, 14, 14):
// 3.12 ms in order, 3.40 by channel).
// block_plane_bytes: the backward walks contiguous planes of up to this many bytes by blocks of
// channels (plane_block_channels, tiling.h), besides those under 256 bytes that every walk takes so:
// 256 (float32 8x8) where planes are blocked and on AMD's Zen 1; 512 on Zen 5 (family 1Ah) and later;
// 0 (none more) elsewhere. Zen 5, AVX512 build, backward op alone, default walk -> blocks, two
// processes each, 1 / 2 threads (ATen 20-31 / 16-21 us for the first): (64, 16, 8, 8) 28-30 -> 19-20 us
// / 17-20 -> 15; (128, 64, 8, 8) 198-211 -> 131-137 / 94-128 -> 84-87; (32, 32, 8, 8) 30-33 -> 20-21 /
// 17-21 -> 15; (16, 256, 8, 8) 90-122 -> 68-69 / 59-65 -> 41-48. Zen 1 (AVX2): (64, 16, 8, 8) about
// 94 -> 78 us, (128, 64, 8, 8) 1100 -> 790 (1 thread). Zen 4 measured the other way (tiling.h), and
// keeps the channel tiles. Zen 5, planes of 257 to 512 bytes, op alone, two processes each, tiles ->
// blocks, 1 / 2 threads (ATen 45-52 / 28-29 us for the first): float32 (16, 128, 9, 9) 60-66 -> 53-56
// us / 35-36 -> 35; (32, 64, 10, 10) 66-76 -> 57-58 / 41 -> 38-40; (64, 32, 11, 11) 74-78 -> 69-72 /
// 42-47 -> 41-43; (32, 128, 9, 9) 114-119 -> 99-101 / 61-67 -> 58-59; bfloat16 (64, 64, 15, 15), 2
// threads, 100-102 -> 90-92 (ATen 193-198). Blocks and tiles give the same bits there.
struct Walks {
  bool rows, planes, long_planes;
  int64_t block_plane_bytes;
};

// AMD's Zen 5 or later (family 1Ah and up).
inline bool zen5_or_later() {
  return cpu_vendor() == "AuthenticAMD" && cpu_family() >= 0x1Au;
}

inline Walks sequential_walks() {
  static const Walks walks = []() -> Walks {
    const char* choice = std::getenv("BNFUSED_CPU_WALK");
    if (choice != nullptr && choice[0] != '\0') {  // set and not empty
      const std::string walk(choice);
      TORCH_CHECK(walk == "sequential" || walk == "blocked",
                  "bnfused: BNFUSED_CPU_WALK must be 'sequential' or 'blocked', got '", walk, "'");
      const bool sequential = walk == "sequential";
      return {sequential, sequential, sequential, sequential ? 0 : 256};
    }
    const std::string vendor = cpu_vendor();
    const bool planes = kNarrowVectors || vendor == "AuthenticAMD" || vendor == "HygonGenuine";
    const bool half_width = half_width_vector_units();
    return {true, planes, planes && !half_width, zen5_or_later() ? 512 : !planes || half_width ? 256 : 0};
  }();
  return walks;
}

}  // namespace bnfused::cpu
