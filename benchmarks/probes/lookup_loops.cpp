// Probe for the lookup kernel (issue 15): the throughput of the one-token lookup's inner loop, per 512
// weight-bits, one thread, 4 planes, planes in L2, with
// - float32 tables (session 13's lookup_planes: vpermps, 16 rows per instruction);
// - int16 tables of int8-quantized activations (vpermw, 32 rows of 16 columns per instruction, T-MAC's way;
//   needs tiles of 32 rows of 16-bit words);
// - bfloat16 tables on today's tiles (cpu_bitplanes.cpp's lookup_planes since session 14: vpermw on 32
//   half-rows, each half's table picked by index bit 4, vdpbf16ps adding a row's two halves), and the same
//   with the halves added by two float adds (CPUs without AVX512_BF16).
// Not a kernel: no coefficients, groups or output, only the loop that dominates the lookup path (perf: about
// 64 % of its samples at width 4 in session 13).
//
//     g++ -O2 -march=native benchmarks/probes/lookup_loops.cpp -o /tmp/lookup_loops && /tmp/lookup_loops
//
// int16 sums stay exact over a group of 128 columns: 32 patterns x at most 4 x 127 = 16,256 < 32,767.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <vector>
constexpr int planes = 4;
// float32: a word is 16 rows x 32 columns; 8 patterns of 4 columns, each a shift, a vpermps and an add.
// int16: a word is 32 rows x 16 columns (16-bit lanes); 4 patterns, each a shift, a vpermw and an add.
int main() {
  const int words = 1 << 12;  // per plane: 256 KB each, 1 MB in all
  std::vector<uint32_t> bits(words * 16 * planes);
  for (size_t i = 0; i < bits.size(); ++i) bits[i] = uint32_t(i * 2654435761u);
  alignas(64) float tf[8][16]; alignas(64) int16_t ti[4][32]; alignas(64) uint16_t tb[4][32];
  for (int q = 0; q < 8; ++q) for (int l = 0; l < 16; ++l) tf[q][l] = float(q + l);
  for (int q = 0; q < 4; ++q) for (int l = 0; l < 32; ++l) ti[q][l] = int16_t(q * 3 + (l & 15));
  for (int q = 0; q < 4; ++q) for (int l = 0; l < 32; ++l) tb[q][l] = uint16_t(0x3f80 + q + l);  // bfloat16 ~1
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
  double best_f = 1e9, best_i = 1e9, best_b = 1e9, best_e = 1e9;
  // A 16-bit half's index: its 4 low bits, bit 4 set in the upper half; bfloat16 1.0 pairs; upper halves.
  const __m512i pattern_bits = _mm512_set1_epi32(0x000F000F), upper_table = _mm512_set1_epi32(0x00100000);
  const __m512i ones = _mm512_set1_epi16(0x3f80), upper = _mm512_set1_epi32(int(0xFFFF0000u));
  // Planes' words shifted for pattern q of each lane (16-bit lanes too: vpermw reads each one's low bits), step(i, q, w).
  const auto patterns = [](int lookups, const __m512i* word, auto&& step) {
#pragma GCC unroll 8
    for (int q = 0; q < lookups; ++q)
#pragma GCC unroll 4
      for (int i = 0; i < planes; ++i) step(i, q, q == 0 ? word[i] : _mm512_srli_epi32(word[i], 4 * q));
  };
  // bfloat16 tables: entry q of the 32 half-rows' tables.
  const auto bfloat16_lookup = [&](int q, __m512i shifted) {
    return _mm512_permutexvar_epi16(_mm512_ternarylogic_epi32(shifted, pattern_bits, upper_table, 0xEA),
                                    _mm512_load_si512(tb[q]));
  };
  for (int trial = 0; trial < 5; ++trial) {
    __m512 acc[planes] = {};
    best_f = std::min(best_f, timed([&](const __m512i* word) {
      patterns(8, word, [&](int i, int q, __m512i p) {
        acc[i] = _mm512_add_ps(acc[i], _mm512_permutexvar_ps(p, _mm512_load_ps(tf[q])));
      });
    }));
    __m512i acci[planes] = {};
    best_i = std::min(best_i, timed([&](const __m512i* word) {
      patterns(4, word, [&](int i, int q, __m512i p) {
        acci[i] = _mm512_add_epi16(acci[i], _mm512_permutexvar_epi16(p, _mm512_load_si512(ti[q])));
      });
    }));
    __m512 accb[planes] = {};
    best_b = std::min(best_b, timed([&](const __m512i* word) {
      patterns(4, word, [&](int i, int q, __m512i p) {
        accb[i] = _mm512_dpbf16_ps(accb[i], (__m512bh)bfloat16_lookup(q, p), (__m512bh)ones);
      });
    }));
    __m512 acce[planes] = {};
    best_e = std::min(best_e, timed([&](const __m512i* word) {
      patterns(4, word, [&](int i, int q, __m512i p) {
        const __m512i v = bfloat16_lookup(q, p);
        acce[i] = _mm512_add_ps(_mm512_add_ps(acce[i], _mm512_castsi512_ps(_mm512_and_si512(v, upper))),
                                _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
      });
    }));
    // Kept live so that the compiler cannot drop the loops (the int16 sums wrap: only their use matters).
    for (int i = 0; i < planes; ++i)
      sink += _mm512_reduce_add_ps(acc[i]) + _mm512_reduce_add_ps(accb[i]) + _mm512_reduce_add_ps(acce[i]) +
              float(_mm512_reduce_add_epi32(_mm512_madd_epi16(acci[i], _mm512_set1_epi16(1))));
  }
  const double units = double(reps) * words * planes;  // 512 weight-bits each
  printf("ns per 512 weight-bits (speed-up over float32 tables):\n"
         "float32 vpermps:            %.2f\nint16 vpermw:               %.2f (%.2fx)\n"
         "bfloat16 vpermw + vdpbf16ps: %.2f (%.2fx)\nbfloat16 vpermw + 2 adds:   %.2f (%.2fx)\n(sink %g)\n",
         best_f / units * 1e9, best_i / units * 1e9, best_f / best_i, best_b / units * 1e9, best_f / best_b,
         best_e / units * 1e9, best_f / best_e, sink);
}
