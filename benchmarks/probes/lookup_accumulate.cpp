// Probe for the lookup kernel (issue 15): how fast a looked-up vector can be accumulated, per zmm instruction
// and per (lookup, accumulate) pair, in core cycles, one thread. The lookup kernel adds each vpermw's 32 16-bit
// entries into its sums: with bfloat16 tables by vdpbf16ps (cpu_bitplanes.cpp, lookup_planes), with 16-bit
// integer tables it could by vpaddw. 12 independent accumulators, tables in registers, so neither latency nor
// memory bounds the loop. The core clock is measured by a chain of dependent scalar adds (one cycle each).
//
//     g++ -O2 -march=native benchmarks/probes/lookup_accumulate.cpp -o /tmp/lookup_accumulate && /tmp/lookup_accumulate
#include <immintrin.h>
#include <x86intrin.h>

#include <cstdio>

constexpr int kChains = 12;

double tsc_per_cycle() {
  const long n = 100000000;
  long x = 0;
  const auto start = __rdtsc();
  for (long k = 0; k < n; ++k) asm volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
  return double(__rdtsc() - start) / n / 4;
}

enum Step { kPermute, kDotBf16, kPermuteDotBf16, kPermuteAdd16, kPermuteDotInt16, kPermuteAddFloat, kShuffleAdd16 };

template <Step S>
__attribute__((noinline)) double cycles(long n, __m512i table, __m512i index, double tsc, __m512i* out) {
  __m512i acc[kChains], ix[kChains];
  for (int i = 0; i < kChains; ++i) {
    acc[i] = _mm512_set1_epi32(i);
    ix[i] = _mm512_xor_si512(index, _mm512_set1_epi16(short(i)));
  }
  const auto start = __rdtsc();
  for (long k = 0; k < n; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) {
      if constexpr (S == kPermute) {
        acc[i] = _mm512_permutexvar_epi16(acc[i], table);
      } else if constexpr (S == kDotBf16) {
        acc[i] = _mm512_castps_si512(_mm512_dpbf16_ps(_mm512_castsi512_ps(acc[i]), (__m512bh)ix[i], (__m512bh)table));
      } else if constexpr (S == kShuffleAdd16) {
        acc[i] = _mm512_add_epi16(acc[i], _mm512_shuffle_epi8(table, ix[i]));
      } else {
        const __m512i looked_up = _mm512_permutexvar_epi16(ix[i], table);
        if constexpr (S == kPermuteDotBf16)
          acc[i] = _mm512_castps_si512(
              _mm512_dpbf16_ps(_mm512_castsi512_ps(acc[i]), (__m512bh)looked_up, (__m512bh)index));
        if constexpr (S == kPermuteAdd16) acc[i] = _mm512_add_epi16(acc[i], looked_up);
        if constexpr (S == kPermuteDotInt16) acc[i] = _mm512_dpwssd_epi32(acc[i], looked_up, index);
        if constexpr (S == kPermuteAddFloat)
          acc[i] = _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(acc[i]), _mm512_castsi512_ps(looked_up)));
      }
    }
    table = _mm512_add_epi16(table, index);  // the tables change, so no lookup is hoisted out of the loop
  }
  const double result = double(__rdtsc() - start) / tsc / n / kChains;
  for (int i = 0; i < kChains; ++i) out[i] = acc[i];
  return result;
}

int main() {
  const long n = 10000000;
  const double tsc = tsc_per_cycle();
  const __m512i table = _mm512_set1_epi16(0x3f80), index = _mm512_set1_epi16(3);
  __m512i out[kChains];
  std::printf("TSC ticks per core cycle %.3f; core cycles per instruction or pair:\n", tsc);
  std::printf("vpermw %.2f | vdpbf16ps %.2f\n", cycles<kPermute>(n, table, index, tsc, out),
              cycles<kDotBf16>(n, table, index, tsc, out));
  std::printf("vpermw + vdpbf16ps %.2f | vpermw + vpaddw %.2f | vpermw + vpdpwssd %.2f | vpermw + vaddps %.2f | "
              "vpshufb + vpaddw %.2f\n",
              cycles<kPermuteDotBf16>(n, table, index, tsc, out), cycles<kPermuteAdd16>(n, table, index, tsc, out),
              cycles<kPermuteDotInt16>(n, table, index, tsc, out), cycles<kPermuteAddFloat>(n, table, index, tsc, out),
              cycles<kShuffleAdd16>(n, table, index, tsc, out));
}
