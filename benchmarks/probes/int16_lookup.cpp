// Probe for the next lookup kernel (issue 15): the throughput of the one-token lookup's inner loop with
// float32 tables (cpu_bitplanes.cpp's lookup_planes: vpermps, 16 rows per instruction) against int16 tables
// of int8-quantized activations (vpermw, 32 rows per instruction, T-MAC's way), per 512 weight-bits, one
// thread, 4 planes, planes in L2. Not a kernel: no coefficients, groups or output, only the loop that
// dominates the lookup path (perf: about 64 % of its samples at width 4).
//
//     g++ -O2 -march=native benchmarks/probes/int16_lookup.cpp -o /tmp/int16_lookup && /tmp/int16_lookup
//
// int16 sums stay exact over a group of 128 columns: 32 patterns x at most 4 x 127 = 16,256 < 32,767.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <vector>
// float32: a word is 16 rows x 32 columns; 8 patterns of 4 columns, each a shift, a vpermps and an add.
// int16: a word is 32 rows x 16 columns (16-bit lanes); 4 patterns, each a shift, a vpermw and an add.
int main() {
  const int words = 1 << 12;  // per plane: 256 KB each, 1 MB in all
  const int planes = 4;
  std::vector<uint32_t> bits(words * 16 * planes);
  for (size_t i = 0; i < bits.size(); ++i) bits[i] = uint32_t(i * 2654435761u);
  alignas(64) float tf[8][16]; alignas(64) int16_t ti[4][32];
  for (int q = 0; q < 8; ++q) for (int l = 0; l < 16; ++l) tf[q][l] = float(q + l);
  for (int q = 0; q < 4; ++q) for (int l = 0; l < 32; ++l) ti[q][l] = int16_t(q * 3 + (l & 15));
  const int reps = 200;
  float sink = 0;
  // Seconds of `reps` passes over every word of every plane, `pass(w, word)` handling one word's planes.
  auto timed = [&](auto&& pass) {
    const auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r)
      for (int w = 0; w < words; ++w) {
        __m512i word[planes];
        for (int i = 0; i < planes; ++i) word[i] = _mm512_loadu_si512(&bits[(size_t(i) * words + w) * 16]);
        pass(word);
      }
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  double best_f = 1e9, best_i = 1e9;
  for (int trial = 0; trial < 5; ++trial) {
    __m512 acc[planes] = {};
    best_f = std::min(best_f, timed([&](const __m512i* word) {
#pragma GCC unroll 8
      for (int q = 0; q < 8; ++q)
#pragma GCC unroll 4
        for (int i = 0; i < planes; ++i) {
          const __m512i p = q == 0 ? word[i] : _mm512_srli_epi32(word[i], 4 * q);
          acc[i] = _mm512_add_ps(acc[i], _mm512_permutexvar_ps(p, _mm512_load_ps(tf[q])));
        }
    }));
    __m512i acci[planes] = {};
    best_i = std::min(best_i, timed([&](const __m512i* word) {
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q)
#pragma GCC unroll 4
        for (int i = 0; i < planes; ++i) {
          const __m512i p = q == 0 ? word[i] : _mm512_srli_epi16(word[i], 4 * q);
          acci[i] = _mm512_add_epi16(acci[i], _mm512_permutexvar_epi16(p, _mm512_load_si512(ti[q])));
        }
    }));
    // Kept live so that the compiler cannot drop the loops (the int16 sums wrap: only their use matters).
    for (int i = 0; i < planes; ++i)
      sink += _mm512_reduce_add_ps(acc[i]) + float(_mm512_reduce_add_epi32(_mm512_madd_epi16(acci[i], _mm512_set1_epi16(1))));
  }
  const double units = double(reps) * words * planes;  // 512 weight-bits each
  printf("fp32 vpermps: %.2f ns per 512 weight-bits\nint16 vpermw: %.2f ns per 512 weight-bits (%.2fx)\n(sink %g)\n",
         best_f / units * 1e9, best_i / units * 1e9, best_f / best_i, sink);
}
