// MWQ expert MLP with int8 activations and integer dot products, as llama.cpp's AVX2 paths multiply
// (vpmaddubsw, vpmaddwd); one source compiled for AVX2 (32 columns per vector) and AVX-512 BW
// (64 columns per vector, a plane's bytes expanded from a mask register); kernels/cpu_int8.py says
// why and what it costs.
//
// The weights are not requantized: one group of one row at width b (vllm_d2moe/mwq/quantize.py) is
//   W = s (q - z) + sum_j a_j (2 P_j - 1),   q = sum_{i < min_bits} 2^i B_i,  B_i, P_j in {0, 1}
// and a_j = s * table[j][code] with table = RATIO * 2^-(j + 2), RATIO a multiple of 2^-5
// (vllm_d2moe/mwq/plane_scales.py). In units u = s 2^-(J + 5) (J residual planes at this width)
// every coefficient is an integer below 2^15:
//   W = u (2^(J + 5) q + sum_j k_j P_j) - (s z + sum_j a_j),   k_j = 2 a_j / u = table[j][code] 2^(J + 6)
// With the group's activations x = t c (c int8, t = max|x| / 127 per token and group), the group's
// share of an output is
//   t u (2^(J + 5) sum q c + sum_j k_j sum P_j c) - (s z + sum_j a_j) t sum c
// where every inner sum is an exact integer dot product of 32 bytes at a time: q or P_j (unsigned,
// rebuilt from the planes) times c (signed) by vpmaddubsw into int16 lanes, weighted by the int16
// coefficient and widened by vpmaddwd into int32 lanes; one float FMA per group and token.
//
// AVX2: a plane's 32 columns are one 32-bit word (bit c = column c). Broadcast to the 8 int32 lanes
// and shifted right by the lane index d, byte k of lane d holds column 8k + d in its low bit: one
// shift and one AND give 32 bytes of 0/1 without a shuffle, in the order byte 4d + k <- column
// 8k + d. The activations are stored in that order (quantize_activations), so the byte products
// pair the right columns. AVX-512: a plane's 64 columns are one 64-bit mask (kmovq from memory) and
// one masked move of ones gives their 64 bytes of 0/1 in column order; activations stay in order.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace d2moe_int8 {
namespace {

#ifdef __AVX512BW__
using VecI = __m512i;
using VecF = __m512;
constexpr int64_t kColumns = 64;      // columns per vector: one 64-bit word of a plane, 64 int8 activations
#else
using VecI = __m256i;
using VecF = __m256;
constexpr int64_t kColumns = 32;      // columns per vector: one 32-bit word of a plane, 32 int8 activations
#endif
constexpr int kMaxBasePlanes = 7;     // q < 2^7: two products of q by |c| <= 127 fit vpmaddubsw's int16
constexpr int kMaxResidualPlanes = 7;
constexpr int64_t kMaxGroupSize = 1024;  // a group's int32 sums stay below 2^31 (see check_projection)
constexpr int64_t kTokenBlock = 4;       // tokens sharing one rebuild of a plane's bytes (16 AVX2 registers)
constexpr int64_t kBlockRows = 64;
// As kernels/cpu_bitplanes.cpp: a stage goes parallel only from this many plane-bits per thread.
constexpr int64_t kStageBitsPerThread = int64_t(1) << 21;
constexpr int kInt16Max = 32767;

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
const uint16_t* half_bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); }

// The vector operations, by instruction set.
#ifdef __AVX512BW__
inline VecI izero() { return _mm512_setzero_si512(); }
inline VecI iload(const void* p) { return _mm512_loadu_si512(p); }
inline VecI add8(VecI a, VecI b) { return _mm512_add_epi8(a, b); }
inline VecI add16(VecI a, VecI b) { return _mm512_add_epi16(a, b); }
inline VecI add32(VecI a, VecI b) { return _mm512_add_epi32(a, b); }
inline VecI set16(int16_t v) { return _mm512_set1_epi16(v); }
inline VecI maddubs(VecI u8, VecI s8) { return _mm512_maddubs_epi16(u8, s8); }
inline VecI madd(VecI a, VecI b) { return _mm512_madd_epi16(a, b); }
inline VecF fzero() { return _mm512_setzero_ps(); }
inline VecF fmadd_i32(VecI a, float b, VecF c) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(b), c); }
inline float horizontal_sum(VecF v) { return _mm512_reduce_add_ps(v); }

// Bytes k = bit k of the 64-bit word at `bits`: 0 or 1, in column order. The mask is loaded straight
// from memory (GCC would move _load_mask64's value through a general register: kmovq k, r64 takes
// the vector port the byte moves need).
[[gnu::always_inline]] inline VecI plane_bytes(const uint8_t* bits) {
  __mmask64 k;
  asm("kmovq %1, %0" : "=Yk"(k) : "m"(*reinterpret_cast<const uint64_t*>(bits)));
  return _mm512_maskz_mov_epi8(k, _mm512_set1_epi8(1));
}

// Codes of `n` columns (n % 16 == 0) in column order.
inline void store_codes(const float* x, int64_t n, float inverse, int8_t* dst, int32_t& sum) {
  __m512i total = _mm512_setzero_si512();
  for (int64_t c = 0; c < n; c += 16) {
    const __m512i code = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + c), _mm512_set1_ps(inverse)));
    total = _mm512_add_epi32(total, code);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c), _mm512_cvtepi32_epi8(code));
  }
  sum = _mm512_reduce_add_epi32(total);
}
#else
inline VecI izero() { return _mm256_setzero_si256(); }
inline VecI iload(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline VecI add8(VecI a, VecI b) { return _mm256_add_epi8(a, b); }
inline VecI add16(VecI a, VecI b) { return _mm256_add_epi16(a, b); }
inline VecI add32(VecI a, VecI b) { return _mm256_add_epi32(a, b); }
inline VecI set16(int16_t v) { return _mm256_set1_epi16(v); }
inline VecI maddubs(VecI u8, VecI s8) { return _mm256_maddubs_epi16(u8, s8); }
inline VecI madd(VecI a, VecI b) { return _mm256_madd_epi16(a, b); }
inline VecF fzero() { return _mm256_setzero_ps(); }
inline VecF fmadd_i32(VecI a, float b, VecF c) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(b), c); }

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Bytes 4d + k = bit 8k + d of the 32-bit word at `bits`: 0 or 1 (the plane order).
[[gnu::always_inline]] inline VecI plane_bytes(const uint8_t* bits) {
  uint32_t word;
  std::memcpy(&word, bits, 4);
  const __m256i shifted = _mm256_srlv_epi32(_mm256_set1_epi32(int(word)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_and_si256(shifted, _mm256_set1_epi8(1));
}

inline int32_t horizontal_sum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Codes of `n` columns (n % 32 == 0), each 32 in the plane order.
inline void store_codes(const float* x, int64_t n, float inverse, int8_t* dst, int32_t& sum) {
  const __m256i low_byte = _mm256_set1_epi32(0xFF);
  __m256i total = _mm256_setzero_si256();
  for (int64_t c = 0; c < n; c += kColumns) {
    // Lane d of vector k: column c + 8k + d, rounded to nearest even (the default MXCSR mode).
    __m256i code[4];
    for (int k = 0; k < 4; ++k) {
      code[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + c + 8 * k), _mm256_set1_ps(inverse)));
      total = _mm256_add_epi32(total, code[k]);
    }
    // Byte k of lane d <- column 8k + d: the plane order.
    const __m256i word = _mm256_or_si256(
        _mm256_or_si256(_mm256_and_si256(code[0], low_byte), _mm256_slli_epi32(_mm256_and_si256(code[1], low_byte), 8)),
        _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(code[2], low_byte), 16), _mm256_slli_epi32(code[3], 24)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), word);
  }
  sum = horizontal_sum_epi32(total);
}
#endif

// ---------------------------------------------------------------- activations

// Rows of a float32 matrix as int8 codes c and one scale t per (row, group): x ~ t c,
// t = max|x| / 127, c = round(x * (127 / max|x|)) (ties to even), all in float32.
struct Activations {
  int64_t rows, cols, groups;
  std::vector<int8_t> codes;       // [rows, cols], each 32 columns in the plane order (byte 4d + k <- 8k + d)
  std::vector<float> scale;        // [rows, groups]: t
  std::vector<float> scaled_sum;   // [rows, groups]: t * sum of the group's codes
};

Activations quantize_activations(const float* x, int64_t rows, int64_t cols, int64_t group_size) {
  Activations a{rows, cols, cols / group_size, {}, {}, {}};
  a.codes.resize(rows * cols);
  a.scale.resize(rows * a.groups);
  a.scaled_sum.resize(rows * a.groups);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < a.groups; ++g) {
      const float* xg = x + r * cols + g * group_size;
      float amax = 0;
      for (int64_t c = 0; c < group_size; ++c) amax = std::max(amax, std::fabs(xg[c]));
      int32_t sum;
      store_codes(xg, group_size, amax > 0 ? 127.0f / amax : 0.0f, a.codes.data() + r * cols + g * group_size, sum);
      const float t = amax / 127.0f;
      a.scale[r * a.groups + g] = t;
      a.scaled_sum[r * a.groups + g] = t * float(sum);
    }
  }
  return a;
}

// ---------------------------------------------------------------- weights

// One expert's projection at one width, viewed inside the layer's stacked tensors
// (vllm_d2moe/mwq/stacked.py: base_bits, base_scale, base_zero, plane_bits, plane_scale) and the
// plane scale codes' float32 decoding table [residual planes, 16].
struct Projection {
  int64_t rows, cols, groups, group_size, row_bytes, code_row_bytes;
  int min_bits, residual;                          // residual planes at this width (J)
  const uint8_t* base_bits[kMaxBasePlanes];        // base plane i, row 0
  const uint8_t* plane_bits[kMaxResidualPlanes];   // residual plane j, row 0
  const uint16_t* base_scale;                      // float16 [rows, groups]
  const uint16_t* base_zero;
  const uint8_t* codes[kMaxResidualPlanes];        // residual plane j: [rows, code_row_bytes], two 4-bit codes a byte
  const float* scale_table;                        // a_j = s * scale_table[16 j + code]
  int16_t plane_coef[kMaxResidualPlanes][16];      // k_j by code: 2 a_j in units u = s 2^-(J + 5)
  int16_t base_coef;                               // 2^(J + 5): s in units u
  float unit;                                      // 2^-(J + 5): u / s
  int64_t base_flush;                              // vectors whose q.c products an int16 lane holds
};

// tensors: base_bits uint8 [E, min_bits, rows, cols / 8], base_scale / base_zero float16 [E, rows, groups],
// plane_bits uint8 [E, planes, rows, cols / 8], plane_scale uint8 [E, planes, rows, ceil(groups / 2)],
// scale_table float32 [planes, 16].
void check_projection(const std::vector<at::Tensor>& t, int64_t group_size, const char* name) {
  TORCH_CHECK(t.size() == 6, name, ": expected base bits, base scale, base zero, plane bits, plane scale codes "
              "and their decoding table");
  for (const auto& x : t) TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), name, ": tensors must be contiguous CPU tensors");
  TORCH_CHECK(t[0].scalar_type() == at::kByte && t[0].dim() == 4 && t[3].scalar_type() == at::kByte && t[3].dim() == 4,
              name, ": bit planes must be uint8 [experts, planes, rows, bytes]");
  TORCH_CHECK(t[1].scalar_type() == at::kHalf && t[2].scalar_type() == at::kHalf && t[1].dim() == 3, name,
              ": base scales and zeros must be float16 [experts, rows, groups]");
  TORCH_CHECK(t[4].scalar_type() == at::kByte && t[4].dim() == 4 && t[5].scalar_type() == at::kFloat &&
                  t[5].dim() == 2 && t[5].size(0) >= t[4].size(1) && t[5].size(1) == 16,
              name, ": plane scale codes must be uint8 [experts, planes, rows, ceil(groups / 2)] with a float32 "
              "[planes, 16] table");
  const int64_t min_bits = t[0].size(1), groups = t[1].size(2), cols = groups * group_size;
  TORCH_CHECK(group_size % kColumns == 0 && group_size <= kMaxGroupSize, name, ": group size ", group_size,
              " is not a multiple of ", kColumns, " up to ", kMaxGroupSize, " (the int8 kernel's vectors)");
  TORCH_CHECK(1 <= min_bits && min_bits <= kMaxBasePlanes && t[3].size(1) <= kMaxResidualPlanes, name,
              ": the int8 kernel takes 1 to ", kMaxBasePlanes, " base planes (", min_bits, " here) and up to ",
              kMaxResidualPlanes, " residual planes");
  const int64_t rows = t[0].size(2);
  TORCH_CHECK(t[0].size(3) == cols / 8 && t[3].size(3) == cols / 8 && t[4].size(3) == (groups + 1) / 2 &&
                  t[1].size(1) == rows && t[2].sizes() == t[1].sizes() && t[3].size(2) == rows && t[4].size(2) == rows,
              name, ": planes, scales and codes must describe the same [", rows, ", ", cols, "] matrix (", groups,
              " groups of ", group_size, ")");
}

Projection view_projection(const std::vector<at::Tensor>& t, int64_t expert, int64_t width, int64_t group_size) {
  const at::Tensor &base_bits = t[0], &base_scale = t[1], &base_zero = t[2], &plane_bits = t[3],
                   &plane_scale = t[4], &scale_table = t[5];
  Projection p;
  p.min_bits = int(base_bits.size(1));
  p.rows = base_bits.size(2);
  p.row_bytes = base_bits.size(3);
  p.groups = base_scale.size(2);
  p.group_size = group_size;
  p.cols = p.groups * group_size;
  p.code_row_bytes = plane_scale.size(3);
  const int64_t resident = p.min_bits + plane_bits.size(1);
  TORCH_CHECK(0 <= expert && expert < base_bits.size(0), "expert ", expert, " is not resident");
  TORCH_CHECK(p.min_bits <= width && width <= resident, "width ", width, " is outside the resident planes [",
              p.min_bits, ", ", resident, "]");
  p.residual = int(width - p.min_bits);
  const int64_t plane = p.rows * p.row_bytes, matrix = p.rows * p.groups, code_matrix = p.rows * p.code_row_bytes;
  for (int i = 0; i < p.min_bits; ++i)
    p.base_bits[i] = base_bits.data_ptr<uint8_t>() + (expert * p.min_bits + i) * plane;
  for (int j = 0; j < p.residual; ++j) {
    p.plane_bits[j] = plane_bits.data_ptr<uint8_t>() + (expert * plane_bits.size(1) + j) * plane;
    p.codes[j] = plane_scale.data_ptr<uint8_t>() + (expert * plane_scale.size(1) + j) * code_matrix;
  }
  p.base_scale = half_bits(base_scale) + expert * matrix;
  p.base_zero = half_bits(base_zero) + expert * matrix;
  p.scale_table = scale_table.data_ptr<float>();
  p.unit = std::ldexp(1.0f, -(p.residual + 5));
  p.base_coef = int16_t(1 << (p.residual + 5));
  for (int j = 0; j < p.residual; ++j)
    for (int c = 0; c < 16; ++c) {
      const double k = std::ldexp(double(p.scale_table[16 * j + c]), p.residual + 6);
      TORCH_CHECK(k == std::floor(k) && 0 <= k && k <= kInt16Max, "plane scale table entry [", j, ", ", c, "] = ",
                  p.scale_table[16 * j + c], " is not a multiple of 2^-", p.residual + 6,
                  " below 2^15 of that unit (vllm_d2moe/mwq/plane_scales.py)");
      p.plane_coef[j][c] = int16_t(k);
    }
  // An int16 lane adds two q.c products (each |.| <= (2^min_bits - 1) 127) per vector.
  p.base_flush = std::max<int64_t>(1, kInt16Max / (2 * ((1 << p.min_bits) - 1) * 127));
  return p;
}

// The base codes q of a vector's columns: sum_i 2^i B_i over the B base planes, by Horner's rule.
template <int B>
[[gnu::always_inline]] inline VecI base_bytes(const uint8_t* const* rows, int64_t offset) {
  VecI q = plane_bytes(rows[B - 1] + offset);
  for (int i = B - 2; i >= 0; --i) q = add8(add8(q, q), plane_bytes(rows[i] + offset));
  return q;
}

// sums[t] += coef * (the weight bytes times token t's codes) over vectors [v0, v1), int16 lanes
// widened to int32 every `flush` vectors. bytes(v): the kColumns unsigned weight bytes of vector v.
template <int TT, typename Bytes>
[[gnu::always_inline]] inline void add_products(Bytes&& bytes, int64_t v0, int64_t v1, int64_t flush, int16_t coef,
                                                const int8_t* const* x, VecI* sums) {
  const VecI weight = set16(coef);
  for (int64_t start = v0; start < v1; start += flush) {
    VecI lanes[TT];
    for (int t = 0; t < TT; ++t) lanes[t] = izero();
    const int64_t end = std::min(v1, start + flush);
#pragma GCC unroll 4
    for (int64_t v = start; v < end; ++v) {
      const VecI w = bytes(v);
      for (int t = 0; t < TT; ++t) lanes[t] = add16(lanes[t], maddubs(w, iload(x[t] + kColumns * v)));
    }
    for (int t = 0; t < TT; ++t) sums[t] = add32(sums[t], madd(lanes[t], weight));
  }
}

// out[t * rows + r] = sum_c W[r, c] x_t[c] for TT tokens (activation rows first .. first + TT - 1) and
// rows [r0, r1) of a projection with B base planes.
template <int TT, int B>
void rows_block(const Projection& p, const Activations& a, int64_t first, float* out, int64_t r0, int64_t r1) {
  const int8_t* x[TT];
  for (int t = 0; t < TT; ++t) x[t] = a.codes.data() + (first + t) * a.cols;
  const int64_t vectors_per_group = p.group_size / kColumns;
  // An int16 lane adds two 0/1 by |c| <= 127 products per vector: 129 vectors fit, more than a group has.
  const int64_t plane_flush = vectors_per_group;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* base_rows[kMaxBasePlanes];
    const uint8_t* plane_rows[kMaxResidualPlanes];
    for (int i = 0; i < B; ++i) base_rows[i] = p.base_bits[i] + r * p.row_bytes;
    for (int j = 0; j < p.residual; ++j) plane_rows[j] = p.plane_bits[j] + r * p.row_bytes;
    VecF acc[TT];
    float offset_sum[TT];
    for (int t = 0; t < TT; ++t) {
      acc[t] = fzero();
      offset_sum[t] = 0;
    }
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t at = r * p.groups + g, v0 = g * vectors_per_group, v1 = v0 + vectors_per_group;
      const float s = half_to_float(p.base_scale[at]);
      float offset = s * half_to_float(p.base_zero[at]);  // s z + sum_j a_j
      VecI sums[TT];
      for (int t = 0; t < TT; ++t) sums[t] = izero();
      add_products<TT>([&](int64_t v) { return base_bytes<B>(base_rows, kColumns / 8 * v); }, v0, v1, p.base_flush,
                       p.base_coef, x, sums);
      for (int j = 0; j < p.residual; ++j) {
        const int code = (p.codes[j][r * p.code_row_bytes + g / 2] >> (4 * (g % 2))) & 15;
        offset += s * p.scale_table[16 * j + code];
        const uint8_t* bits = plane_rows[j];
        add_products<TT>([&](int64_t v) { return plane_bytes(bits + kColumns / 8 * v); }, v0, v1, plane_flush,
                         p.plane_coef[j][code], x, sums);
      }
      const float unit = s * p.unit;
      for (int t = 0; t < TT; ++t) {
        const int64_t tg = (first + t) * a.groups + g;
        acc[t] = fmadd_i32(sums[t], unit * a.scale[tg], acc[t]);
        offset_sum[t] += offset * a.scaled_sum[tg];
      }
    }
    for (int t = 0; t < TT; ++t) out[t * p.rows + r] = horizontal_sum(acc[t]) - offset_sum[t];
  }
}

// rows_block<TT, B> with the base planes B = p.min_bits as a template argument (its Horner loop unrolled).
template <int TT>
void rows_block_any_base(const Projection& p, const Activations& a, int64_t first, float* out, int64_t r0,
                         int64_t r1) {
  switch (p.min_bits) {
    case 1: return rows_block<TT, 1>(p, a, first, out, r0, r1);
    case 2: return rows_block<TT, 2>(p, a, first, out, r0, r1);
    case 3: return rows_block<TT, 3>(p, a, first, out, r0, r1);
    case 4: return rows_block<TT, 4>(p, a, first, out, r0, r1);
    case 5: return rows_block<TT, 5>(p, a, first, out, r0, r1);
    case 6: return rows_block<TT, 6>(p, a, first, out, r0, r1);
    default: return rows_block<TT, 7>(p, a, first, out, r0, r1);  // check_projection: 1 <= min_bits <= 7
  }
}

// Tokens [first, first + tokens) of `a` through rows [r0, r1), kTokenBlock at a time; out: row `first`
// of a [*, rows] matrix.
void rows_linear(const Projection& p, const Activations& a, int64_t first, int64_t tokens, float* out, int64_t r0,
                 int64_t r1) {
  for (int64_t t = 0; t < tokens; t += kTokenBlock, out += kTokenBlock * p.rows) {
    switch (std::min(kTokenBlock, tokens - t)) {
      case 1: rows_block_any_base<1>(p, a, first + t, out, r0, r1); break;
      case 2: rows_block_any_base<2>(p, a, first + t, out, r0, r1); break;
      case 3: rows_block_any_base<3>(p, a, first + t, out, r0, r1); break;
      default: rows_block_any_base<4>(p, a, first + t, out, r0, r1); break;
    }
  }
}

// One projection for several (expert, width) segments of a layer call: out[first + i] = W_s x[first + i].
// Blocks of rows of every segment share one parallel region (both threads work even when each
// expert alone is too small to split), as kernels/cpu_bitplanes.cpp's segments_linear.
struct Segment {
  Projection projection;
  int64_t first, tokens;
};

void segments_linear(const std::vector<Segment>& segments, const Activations& a, float* out, int64_t rows) {
  struct Block {
    const Segment* segment;
    int64_t r0, r1;
  };
  std::vector<Block> blocks;
  int64_t bits = 0;
  for (const Segment& s : segments) {
    for (int64_t r0 = 0; r0 < rows; r0 += kBlockRows) blocks.push_back({&s, r0, std::min(rows, r0 + kBlockRows)});
    bits += rows * s.projection.cols * (s.projection.min_bits + s.projection.residual);
  }
  if (blocks.empty()) return;
  const int64_t n = int64_t(blocks.size());
  const int64_t grain = bits <= kStageBitsPerThread ? n : std::max<int64_t>(1, n * kStageBitsPerThread / bits);
  at::parallel_for(0, n, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const Segment& s = *blocks[b].segment;
      rows_linear(s.projection, a, s.first, s.tokens, out + s.first * rows, blocks[b].r0, blocks[b].r1);
    }
  });
}

void check_activations(const at::Tensor& x, int64_t cols, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(1) == cols, name,
              " must be contiguous float32 [rows, ", cols, "]");
}

// out [tokens, rows] = x [tokens, cols] @ W^T of one expert's projection at width `width`, with x as
// int8 activations (the tests' ground truth reproduces their quantization).
void linear(const at::Tensor& x, const std::vector<at::Tensor>& projection, int64_t group_size, int64_t expert,
            int64_t width, at::Tensor out) {
  check_projection(projection, group_size, "projection");
  const Projection p = view_projection(projection, expert, width, group_size);
  check_activations(x, p.cols, "x");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == x.size(0) &&
                  out.size(1) == p.rows,
              "out must be contiguous float32 [", x.size(0), ", ", p.rows, "]");
  const Activations a = quantize_activations(x.data_ptr<float>(), x.size(0), p.cols, group_size);
  segments_linear({{p, 0, x.size(0)}}, a, out.data_ptr<float>(), p.rows);
}

// Expert MLP of every segment: out[first:end] = down(silu(gate(x)) * up(x)) over x[first:end], both
// projections with int8 activations. segments: int64 [n, 4] rows of (expert, width, first, end).
void moe_segments(const at::Tensor& x, const at::Tensor& segments, const std::vector<at::Tensor>& gate_up,
                  const std::vector<at::Tensor>& down, int64_t group_size, at::Tensor out) {
  check_projection(gate_up, group_size, "gate_up");
  check_projection(down, group_size, "down");
  const int64_t hidden = gate_up[1].size(2) * group_size, inter = gate_up[0].size(2) / 2;
  TORCH_CHECK(down[0].size(2) == hidden && down[1].size(2) * group_size == inter,
              "down must be [", hidden, ", ", inter, "] for gate_up [", 2 * inter, ", ", hidden, "]");
  check_activations(x, hidden, "x");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.sizes() == x.sizes(),
              "out must be contiguous float32 shaped like x");
  TORCH_CHECK(segments.scalar_type() == at::kLong && segments.dim() == 2 && segments.size(1) == 4,
              "segments must be int64 [n, 4]");
  const at::Tensor table = segments.contiguous();
  const int64_t* s = table.data_ptr<int64_t>();
  std::vector<Segment> gate_up_segments, down_segments;
  for (int64_t i = 0; i < table.size(0); ++i) {
    const int64_t expert = s[4 * i], width = s[4 * i + 1], first = s[4 * i + 2], end = s[4 * i + 3];
    TORCH_CHECK(0 <= first && first <= end && end <= x.size(0), "segment ", i, " is out of range");
    if (first == end) continue;
    gate_up_segments.push_back({view_projection(gate_up, expert, width, group_size), first, end - first});
    down_segments.push_back({view_projection(down, expert, width, group_size), first, end - first});
  }
  const int64_t n = x.size(0);
  at::Tensor h = at::empty({n, 2 * inter}, x.options());
  segments_linear(gate_up_segments, quantize_activations(x.data_ptr<float>(), n, hidden, group_size),
                  h.data_ptr<float>(), 2 * inter);
  const at::Tensor act = at::silu(h.narrow(1, 0, inter)).mul_(h.narrow(1, inter, inter)).contiguous();
  segments_linear(down_segments, quantize_activations(act.data_ptr<float>(), n, inter, group_size),
                  out.data_ptr<float>(), hidden);
}

}  // namespace
}  // namespace d2moe_int8

// D2MOE_LIBRARY: the op namespace of this build (one per instruction set, kernels/cpu_int8.py).
#define D2MOE_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
D2MOE_TORCH_LIBRARY(D2MOE_LIBRARY, m) {
  m.def("linear(Tensor x, Tensor[] projection, int group_size, int expert, int width, Tensor(a!) out) -> ()",
        &d2moe_int8::linear);
  m.def(
      "moe_segments(Tensor x, Tensor segments, Tensor[] gate_up, Tensor[] down, int group_size, Tensor(a!) out) -> ()",
      &d2moe_int8::moe_segments);
}
