// MWQ expert MLP on x86-64 CPUs with AVX2: dequantize-and-multiply straight
// from the packed bit planes, never holding more than a tile of float weights.
// Why this design, and its measured speed: see cpu_bitplanes.py.
//
// Every width is "b binary planes with per-group coefficients plus a per-group
// offset" (vllm_d2moe/mwq/quantize.py):
//   W_b[r, c] = offset[r, g] + sum_i coef_i[r, g] * bit_i[r, c]
//   base planes i < min_bits:  coef_i = s * 2^i
//   residual plane j:          coef   = 2 * a_j
//   offset = -s * z - sum_j a_j
// Eight weights (one byte of each plane) are rebuilt in a ymm register with one
// table load and one FMA per plane, then multiplied into the tokens.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <utility>
#include <cstdint>
#include <cstring>
#include <vector>

namespace d2moe_cpu {
namespace {

constexpr int kMaxPlanes = 8;
// Up to this many tokens the weights are rebuilt in registers per token
// block; above it a tile of rows is rebuilt once and multiplied by GEMM.
constexpr int64_t kRegisterTokens = 4;
constexpr int64_t kTileRows = 32;

// One expert's projection at one width, viewed inside the layer's stacked tensors.
struct Projection {
  int64_t rows, cols, row_bytes, groups, group_size;
  int min_bits, planes;                              // planes == width
  const uint8_t* bits[kMaxPlanes];                   // plane i (base planes first), row 0
  const uint16_t* base_scale;                        // float16 [rows, groups]
  const uint16_t* base_zero;                         // float16 [rows, groups]
  const uint16_t* residual_scale[kMaxPlanes];        // residual plane j: float16 [rows, groups]
};

// float16 read as raw bits and converted with F16C (at::Half converts in software).
const uint16_t* half_bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); }
inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// Stacked tensors (see vllm_d2moe/experts.py: StackedProjection):
// base_bits [E, min_bits, rows, row_bytes], base_scale/base_zero [E, rows, groups],
// plane_bits [E, planes, rows, row_bytes], plane_scale [E, planes, rows, groups].
Projection view_projection(const std::vector<at::Tensor>& t, int64_t expert, int64_t width,
                           int64_t cols, int64_t group_size) {
  const at::Tensor &base_bits = t[0], &base_scale = t[1], &base_zero = t[2];
  const at::Tensor &plane_bits = t[3], &plane_scale = t[4];
  Projection p;
  p.min_bits = base_bits.size(1);
  p.rows = base_bits.size(2);
  p.row_bytes = base_bits.size(3);
  p.cols = cols;
  p.group_size = group_size;
  p.groups = cols / group_size;
  p.planes = width;
  TORCH_CHECK(group_size > 0 && cols % group_size == 0 && base_scale.size(2) == p.groups &&
                  p.row_bytes == (cols + 7) / 8,
              "stacked tensors do not describe a [", p.rows, ", ", cols, "] projection in groups of ", group_size);
  TORCH_CHECK(p.min_bits <= width && width <= p.min_bits + plane_bits.size(1) && width <= kMaxPlanes,
              "width ", width, " is outside the resident planes");
  const int64_t plane_bytes = p.rows * p.row_bytes, scales = p.rows * p.groups;
  for (int i = 0; i < p.min_bits; ++i)
    p.bits[i] = base_bits.data_ptr<uint8_t>() + (expert * p.min_bits + i) * plane_bytes;
  for (int j = 0; j < width - p.min_bits; ++j) {
    p.bits[p.min_bits + j] = plane_bits.data_ptr<uint8_t>() + (expert * plane_bits.size(1) + j) * plane_bytes;
    p.residual_scale[j] = half_bits(plane_scale) + (expert * plane_bits.size(1) + j) * scales;
  }
  p.base_scale = half_bits(base_scale) + expert * scales;
  p.base_zero = half_bits(base_zero) + expert * scales;
  return p;
}

// Coefficients of the planes of group (row, group): weight = offset + sum_i coef[i] * bit_i.
// B is the width when known at compile time (the vector path), else kMaxPlanes with p.planes used.
template <int B>
struct GroupCoefs {
  float coef[B];
  float offset;
  GroupCoefs(const Projection& p, int64_t row, int64_t group) {
    const int64_t at = row * p.groups + group;
    const float s = half_to_float(p.base_scale[at]);
    offset = -s * half_to_float(p.base_zero[at]);
    for (int i = 0; i < B && i < p.planes; ++i) {
      if (i < p.min_bits) {
        coef[i] = s * float(1 << i);
      } else {
        const float a = half_to_float(p.residual_scale[i - p.min_bits][at]);
        coef[i] = 2 * a;
        offset -= a;
      }
    }
  }
};

// ---------------------------------------------------------------- AVX2 path (group_size % 8 == 0)

// BIT_LANES[v][l] = bit l of v, as a float: one byte of a plane becomes eight 0/1 lanes.
struct BitLanes {
  alignas(64) float lanes[256][8];
  BitLanes() {
    for (int v = 0; v < 256; ++v)
      for (int l = 0; l < 8; ++l) lanes[v][l] = float((v >> l) & 1);
  }
};
const BitLanes kBitLanes;

template <int B>
struct VecCoefs {
  __m256 coef[B];
  __m256 offset;
  explicit VecCoefs(const GroupCoefs<B>& k) {
    for (int i = 0; i < B; ++i) coef[i] = _mm256_set1_ps(k.coef[i]);
    offset = _mm256_set1_ps(k.offset);
  }
};

// Plane bytes [byte, byte + n) of every plane of a row, little-endian in one word per plane:
// one load per plane per 64 weights instead of one per 8.
template <int B>
[[gnu::always_inline]] inline void load_words(const uint8_t* const* row_bits, int64_t byte, int n, uint64_t* words) {
  for (int i = 0; i < B; ++i) {
    if (n == 8) {
      std::memcpy(&words[i], row_bits[i] + byte, 8);
    } else {
      words[i] = 0;
      for (int b = 0; b < n; ++b) words[i] |= uint64_t(row_bits[i][byte + b]) << (8 * b);
    }
  }
}

// The 0/1 lanes of byte `s` of `word`. The row's byte offset (byte * 32) takes two
// integer operations instead of three: integer work bounds this loop.
[[gnu::always_inline]] inline __m256 bit_lanes(uint64_t word, int s) {
  const uint64_t offset = s == 0 ? (word << 5) & 0x1FE0 : (word >> (8 * s - 5)) & 0x1FE0;
  return _mm256_load_ps(reinterpret_cast<const float*>(reinterpret_cast<const char*>(kBitLanes.lanes) + offset));
}

// The eight weights of byte `s` of the loaded words; two partial sums halve the FMA chain.
template <int B>
[[gnu::always_inline]] inline __m256 weights8(const VecCoefs<B>& k, const uint64_t* words, int s) {
  __m256 even = k.offset, odd = _mm256_setzero_ps();
  for (int i = 0; i < B; i += 2) even = _mm256_fmadd_ps(k.coef[i], bit_lanes(words[i], s), even);
  for (int i = 1; i < B; i += 2) odd = _mm256_fmadd_ps(k.coef[i], bit_lanes(words[i], s), odd);
  return _mm256_add_ps(even, odd);
}

// Calls step(weights, first column) for every eight weights of row `row`, group by group.
template <int B, typename Step>
[[gnu::always_inline]] inline void for_each_weights8(const Projection& p, int64_t row, Step&& step) {
  const uint8_t* row_bits[B];
  for (int i = 0; i < B; ++i) row_bits[i] = p.bits[i] + row * p.row_bytes;
  const int64_t bytes_per_group = p.group_size / 8;
  for (int64_t g = 0; g < p.groups; ++g) {
    const VecCoefs<B> k(GroupCoefs<B>(p, row, g));
    const int64_t end = (g + 1) * bytes_per_group;
    for (int64_t byte = g * bytes_per_group; byte < end; byte += 8) {
      uint64_t words[B];
      if (end - byte >= 8) {
        load_words<B>(row_bits, byte, 8, words);
#pragma GCC unroll 8
        for (int s = 0; s < 8; ++s) step(weights8<B>(k, words, s), 8 * (byte + s));
      } else {
        const int n = int(end - byte);
        load_words<B>(row_bits, byte, n, words);
        for (int s = 0; s < n; ++s) step(weights8<B>(k, words, s), 8 * (byte + s));
      }
    }
  }
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// out[t, r] = sum_c W[r, c] x[t, c] for TT tokens and rows [r0, r1), weights rebuilt in registers.
template <int B, int TT>
void register_rows(const Projection& p, const float* x, float* out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    __m256 acc[TT], spare = _mm256_setzero_ps();
    for (int t = 0; t < TT; ++t) acc[t] = _mm256_setzero_ps();
    for_each_weights8<B>(p, r, [&](__m256 w, int64_t col) {
      for (int t = 0; t < TT; ++t) acc[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * p.cols + col), acc[t]);
      // A single token alternates two accumulators so consecutive FMAs do not wait on each other.
      if constexpr (TT == 1) std::swap(acc[0], spare);
    });
    if constexpr (TT == 1) acc[0] = _mm256_add_ps(acc[0], spare);
    for (int t = 0; t < TT; ++t) out[t * p.rows + r] = horizontal_sum(acc[t]);
  }
}

template <int B>
void dequantize_rows_avx2(const Projection& p, int64_t r0, int64_t r1, float* dst) {
  for (int64_t r = r0; r < r1; ++r, dst += p.cols)
    for_each_weights8<B>(p, r, [&](__m256 w, int64_t col) { _mm256_storeu_ps(dst + col, w); });
}

// ---------------------------------------------------------------- any group size

void dequantize_rows_scalar(const Projection& p, int64_t r0, int64_t r1, float* dst) {
  for (int64_t r = r0; r < r1; ++r, dst += p.cols) {
    for (int64_t g = 0; g < p.groups; ++g) {
      const GroupCoefs<kMaxPlanes> k(p, r, g);
      for (int64_t c = g * p.group_size; c < (g + 1) * p.group_size; ++c) {
        float w = k.offset;
        for (int i = 0; i < p.planes; ++i) w += k.coef[i] * float((p.bits[i][r * p.row_bytes + (c >> 3)] >> (c & 7)) & 1);
        dst[c] = w;
      }
    }
  }
}

// ---------------------------------------------------------------- dispatch

template <template <int> class F, typename... Args>
void with_planes(int planes, Args&&... args) {
  switch (planes) {
    case 1: F<1>::run(args...); break;
    case 2: F<2>::run(args...); break;
    case 3: F<3>::run(args...); break;
    case 4: F<4>::run(args...); break;
    case 5: F<5>::run(args...); break;
    case 6: F<6>::run(args...); break;
    case 7: F<7>::run(args...); break;
    case 8: F<8>::run(args...); break;
    default: TORCH_CHECK(false, "unsupported width ", planes);
  }
}

template <int B>
struct RegisterRows {
  static void run(const Projection& p, const float* x, int64_t tokens, float* out, int64_t r0, int64_t r1) {
    switch (tokens) {
      case 1: register_rows<B, 1>(p, x, out, r0, r1); break;
      case 2: register_rows<B, 2>(p, x, out, r0, r1); break;
      case 3: register_rows<B, 3>(p, x, out, r0, r1); break;
      case 4: register_rows<B, 4>(p, x, out, r0, r1); break;
      default: TORCH_CHECK(false, "register path takes at most 4 tokens");
    }
  }
};

template <int B>
struct DequantizeRows {
  static void run(const Projection& p, int64_t r0, int64_t r1, float* dst) { dequantize_rows_avx2<B>(p, r0, r1, dst); }
};

// out [tokens, rows] = x [tokens, cols] @ W^T, rows split across torch's intra-op threads.
void linear(const Projection& p, const at::Tensor& x, const at::Tensor& out) {
  const int64_t tokens = x.size(0);
  const bool vector_groups = p.group_size % 8 == 0;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (vector_groups && tokens <= kRegisterTokens) {
    at::parallel_for(0, p.rows, 1, [&](int64_t r0, int64_t r1) {
      with_planes<RegisterRows>(p.planes, p, xp, tokens, op, r0, r1);
    });
    return;
  }
  at::parallel_for(0, p.rows, kTileRows, [&](int64_t r0, int64_t r1) {
    at::Tensor tile = at::empty({kTileRows, p.cols}, x.options());
    for (int64_t start = r0; start < r1; start += kTileRows) {
      const int64_t n = std::min(kTileRows, r1 - start);
      if (vector_groups)
        with_planes<DequantizeRows>(p.planes, p, start, start + n, tile.data_ptr<float>());
      else
        dequantize_rows_scalar(p, start, start + n, tile.data_ptr<float>());
      out.narrow(1, start, n).copy_(at::mm(x, tile.narrow(0, 0, n).t()));
    }
  });
}

void check_projection(const std::vector<at::Tensor>& t, const char* name) {
  TORCH_CHECK(t.size() == 5, name, ": expected 5 stacked tensors");
  const at::ScalarType types[5] = {at::kByte, at::kHalf, at::kHalf, at::kByte, at::kHalf};
  for (int i = 0; i < 5; ++i)
    TORCH_CHECK(t[i].device().is_cpu() && t[i].is_contiguous() && t[i].scalar_type() == types[i], name,
                ": stacked tensor ", i, " must be a contiguous CPU tensor of ", types[i]);
}

// Expert MLP of every segment: out[first:end] = down(silu(gate(x)) * up(x)) over x[first:end].
// segments: int64 [n, 4] rows of (expert, width, first pair, end pair).
void moe_segments(const at::Tensor& x, const at::Tensor& segments, const std::vector<at::Tensor>& gate_up,
                  const std::vector<at::Tensor>& down, int64_t group_size, at::Tensor out) {
  check_projection(gate_up, "gate_up");
  check_projection(down, "down");
  const int64_t hidden = down[0].size(2), inter = gate_up[0].size(2) / 2;
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(1) == hidden,
              "x must be contiguous float32 [pairs, ", hidden, "]");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.sizes() == x.sizes(),
              "out must be contiguous float32 shaped like x");
  TORCH_CHECK(segments.scalar_type() == at::kLong && segments.dim() == 2 && segments.size(1) == 4,
              "segments must be int64 [n, 4]");
  const auto table = segments.contiguous();
  const int64_t* s = table.data_ptr<int64_t>();
  for (int64_t i = 0; i < table.size(0); ++i) {
    const int64_t expert = s[4 * i], width = s[4 * i + 1], first = s[4 * i + 2], end = s[4 * i + 3];
    TORCH_CHECK(0 <= expert && expert < gate_up[0].size(0) && 0 <= first && first <= end && end <= x.size(0),
                "segment ", i, " is out of range");
    if (first == end) continue;
    const at::Tensor xs = x.narrow(0, first, end - first);
    at::Tensor h = at::empty({end - first, 2 * inter}, x.options());
    linear(view_projection(gate_up, expert, width, hidden, group_size), xs, h);
    const at::Tensor act = at::silu(h.narrow(1, 0, inter)).mul_(h.narrow(1, inter, inter));
    linear(view_projection(down, expert, width, inter, group_size), act, out.narrow(0, first, end - first));
  }
}

}  // namespace
}  // namespace d2moe_cpu

TORCH_LIBRARY(d2moe_cpu, m) {
  m.def("moe_segments(Tensor x, Tensor segments, Tensor[] gate_up, Tensor[] down, int group_size, Tensor(a!) out) -> ()",
        &d2moe_cpu::moe_segments);
}
