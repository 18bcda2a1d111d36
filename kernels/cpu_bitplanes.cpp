// MWQ expert MLP on x86-64 CPUs, one source compiled for AVX2 and for AVX-512
// (kernels/cpu_bitplanes.py picks the build): weights rebuilt a vector (8 or 16
// lanes) at a time in a register from the bit planes, multiplied straight into
// the tokens, or with AVX-512 and planes in tiles, up to 256 tokens, bfloat16 sums of the
// inputs looked up by the planes' bit patterns; never more than a 128-row tile of float
// weights. Why this design, and its speed: cpu_bitplanes.py.
//
// Every width is "b binary planes with per-group coefficients plus a per-group
// offset" (vllm_d2moe/mwq/quantize.py):
//   W_b[r, c] = offset[r, g] + sum_i coef_i[r, g] * bit_i[r, c]
//   base planes i < min_bits:  coef_i = s * 2^i
//   residual plane j:          coef   = 2 * a_j,  a_j = s * table[j][code_j]  (4-bit code,
//                                                  vllm_d2moe/mwq/plane_scales.py)
//   offset = -s * z - sum_j a_j
// AVX2 build: the planes are resident in pairs (plane 2p, 2p + 1), each column's two bits
// side by side, so a vector's columns of a pair are one 32-bit field: broadcast, shift
// lane l right by 2l, and a permute of the group's 4-entry codebook
// {0, c_2p, c_2p+1, c_2p + c_2p+1} yields their contribution. An odd last plane is a
// chunk of one bit per column (its codebook ignores bit 1).
// AVX-512 build: the planes are resident one bit per column, in tiles of 16 rows x 32
// columns (each row's 32-bit word side by side) where the groups are whole words, else as
// stored; 16 columns of a plane are one mask register loaded straight from memory, and a
// masked add of the plane's coefficient builds the weights: one instruction per plane per
// 16 weights. On tiles, up to 256 tokens need no weights at all (lookup_tiles); the AVX512_BF16
// build adds the looked-up bfloat16 pairs with vdpbf16ps, the others with two float adds.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <immintrin.h>
#ifdef D2MOE_SIMDE_AVX512
#include <simde/x86/avx512.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

namespace d2moe_cpu {
namespace {

constexpr int kMaxPlanes = 8;
constexpr int kMaxChunks = kMaxPlanes;  // planes as stored: one per chunk
// Up to kRegisterTokens tokens the weights are rebuilt in registers once per block of
// kTokenBlock tokens (both by instruction set, below); above it a tile of kTileRows rows (1 MB of
// float32 at 2048 columns) is rebuilt once and multiplied by torch's GEMM.
constexpr int64_t kTileRows = 128;
// Rows per thread at least this many plane-bits, so a small projection does not pay a thread
// wake-up and barrier for microseconds of work. A layer call's stage (segments_linear) goes
// parallel only from twice that per thread: served through vLLM with two threads, splitting
// the reference model's one-token stages (2^21 plane-bits) decoded at 127 tokens/s against
// 190 on one thread, although back-to-back calls outside vLLM ran 1.4x faster split.
constexpr int64_t kBitsPerThread = int64_t(1) << 20;
constexpr int64_t kStageBitsPerThread = int64_t(1) << 21;
// Resident layout of this build (kernels/cpu_bitplanes.py, planes_per_chunk): AVX-512 reads each
// plane as stored through mask registers; AVX2 reads plane pairs.
#if defined(__AVX512F__) || defined(D2MOE_SIMDE_AVX512)
constexpr int kPlanesPerChunk = 1;
#else
constexpr int kPlanesPerChunk = 2;
#endif
// Planes as stored are tiled where the groups are whole 32-column words (ResidentPlanes): per group,
// per 16 rows, the rows' 32-bit words side by side, so 16 rows' word is one 64-byte vector load.
constexpr int64_t kPlaneTileRows = 16;
constexpr int64_t kPlaneTileColumns = 32;
constexpr int64_t kPlaneTileWordBytes = 4 * kPlaneTileRows;
// Tiled, a residual plane's scale codes are stored per group, per tile: 8 bytes, row l of the tile in the
// low half of byte l % 8 for l < 8, else in its high half, so a tile-group's 16 codes are one 8-byte load.
constexpr int64_t kTileCodeBytes = kPlaneTileRows / 2;
inline bool tiled_layout(int64_t group_size) { return kPlanesPerChunk == 1 && group_size % kPlaneTileColumns == 0; }
// The lookup tables and group sums of a few tokens (lookup_tiles), made once per projection call or
// per segment of a layer call.
struct Lookup {
  std::vector<uint16_t> tables;   // bfloat16 [cols / 32][4][tokens][parts][32] (lookup_tables)
  std::vector<float> group_sums;  // [tokens][groups]
};

// float16 read as raw bits and converted with F16C (at::Half converts in software).
const uint16_t* half_bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); }
inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// One expert's projection at one width, viewed inside the layer's resident tensors.
struct Projection {
  int64_t rows, cols, groups, group_size;
  int min_bits, planes;                          // planes == width
  int chunks;                                    // chunks holding planes [0, width)
  bool tiled;                                    // planes in tiles (tiled_layout); else rows as stored or paired
  int64_t tiles;                                 // tiles of rows: ceil(rows / kPlaneTileRows)
  const uint8_t* chunk_bits[kMaxChunks];         // chunk c, row 0
  int64_t chunk_row_bytes[kMaxChunks];
  int chunk_planes[kMaxChunks];                  // bits per column in chunk c (1 or 2)
  const uint16_t* base_scale;                    // float16 at scale_at(row, group)
  const uint16_t* base_zero;                     // float16 at scale_at(row, group)
  const uint8_t* residual_codes[kMaxPlanes];     // residual plane j's 4-bit codes (code)
  int64_t code_row_bytes;                        // untiled: ceil(groups / 2), a row's code bytes
  const float* scale_table;                      // float32 [residual planes, 16]: a_j = s * table[j][code]

  // Bytes of one tile's group of one plane (tiled): its 16 rows' words of the group's columns.
  int64_t tile_group_bytes() const { return group_size / kPlaneTileColumns * kPlaneTileWordBytes; }
  // Chunk c's bits of group g in row `row`: a column's byte at group_row + group_byte(column in the group).
  // Tiled, a tile's first row gives the start of the tile's group.
  const uint8_t* group_row(int c, int64_t row, int64_t g) const {
    if (tiled)
      return chunk_bits[c] + (g * tiles + row / kPlaneTileRows) * tile_group_bytes() + 4 * (row % kPlaneTileRows);
    return chunk_bits[c] + row * chunk_row_bytes[c] + chunk_planes[c] * g * group_size / 8;
  }
  // Byte of column `col` of a group (one bit per column): 4-byte words of 32 columns, 64 bytes apart when tiled.
  int64_t group_byte(int64_t col) const {
    return (col / kPlaneTileColumns) * (tiled ? kPlaneTileWordBytes : 4) + (col % kPlaneTileColumns) / 8;
  }

  // Where the base scale and zero of (row, group) are: tiled, group-major, each group's rows padded to whole
  // tiles (so 16 rows of a tile are one 32-byte load); else row-major.
  int64_t scale_at(int64_t row, int64_t group) const {
    return tiled ? group * tiles * kPlaneTileRows + row : row * groups + group;
  }
  // Tiled: where the kTileCodeBytes of a residual plane's scale codes of (the tile of `row`, group) start.
  int64_t tile_codes_at(int64_t row, int64_t group) const {
    return (group * tiles + row / kPlaneTileRows) * kTileCodeBytes;
  }
  // Residual plane j's 4-bit scale code of (row, group): tiled, kTileCodeBytes per tile and group; else
  // code_row_bytes per row, the even group in the low half of a byte.
  int code(int j, int64_t row, int64_t group) const {
    if (tiled) {
      const int64_t in_tile = row % kPlaneTileRows;
      const uint8_t byte = residual_codes[j][tile_codes_at(row, group) + in_tile % kTileCodeBytes];
      return (byte >> (4 * (in_tile / kTileCodeBytes))) & 15;
    }
    return (residual_codes[j][row * code_row_bytes + group / 2] >> (4 * (group % 2))) & 15;
  }

  // Bit `plane` of column `col` in row `row`.
  int bit(int plane, int64_t row, int64_t col) const {
    const int c = plane / kPlanesPerChunk;
    if (tiled) {
      const int64_t in_group = col % group_size;
      return (group_row(c, row, col / group_size)[group_byte(in_group)] >> (in_group % 8)) & 1;
    }
    const int64_t at = chunk_planes[c] * col + plane % kPlanesPerChunk;
    return (chunk_bits[c][row * chunk_row_bytes[c] + at / 8] >> (at % 8)) & 1;
  }
};

// Resident tensors (kernels/cpu_bitplanes.py, ResidentPlanes): chunks[c] uint8 [E, rows, row bytes]
// (kPlanesPerChunk planes each, the last maybe one), scale_table float32 [residual planes, 16], and
// untiled: base_scale / base_zero float16 [E, rows, groups] and plane_scale uint8 [E, residual planes, rows,
// ceil(groups / 2)] (two 4-bit codes per byte, the even group low);
// tiled: base_scale / base_zero float16 [E, rows, groups] viewing [E, groups, tiles * 16] (group-major) and
// plane_scale uint8 [E, residual planes, groups, tiles, 8] (Projection::code).
Projection view_projection(const std::vector<at::Tensor>& chunks, const std::vector<at::Tensor>& scales,
                           int64_t min_bits, int64_t expert, int64_t width, int64_t cols, int64_t group_size) {
  const at::Tensor &base_scale = scales[0], &base_zero = scales[1], &plane_scale = scales[2],
                   &scale_table = scales[3];
  Projection p;
  p.rows = base_scale.size(1);
  p.cols = cols;
  p.group_size = group_size;
  p.groups = base_scale.size(2);
  p.min_bits = int(min_bits);
  p.planes = int(width);
  p.chunks = int((width + kPlanesPerChunk - 1) / kPlanesPerChunk);
  p.tiled = tiled_layout(group_size);
  p.tiles = (p.rows + kPlaneTileRows - 1) / kPlaneTileRows;
  const int64_t resident = min_bits + plane_scale.size(1);
  TORCH_CHECK(group_size > 0 && p.groups * group_size == cols, "scales do not describe ", cols,
              " columns in groups of ", group_size);
  TORCH_CHECK(min_bits <= width && width <= resident && width <= kMaxPlanes,
              "width ", width, " is outside the resident planes [", min_bits, ", ", resident, "]");
  TORCH_CHECK(int64_t(chunks.size()) == (resident + kPlanesPerChunk - 1) / kPlanesPerChunk,
              chunks.size(), " resident chunks do not hold ", resident, " planes ", kPlanesPerChunk,
              " at a time, this build's layout");
  for (int c = 0; c < p.chunks; ++c) {
    p.chunk_planes[c] = int(std::min<int64_t>(kPlanesPerChunk, resident - kPlanesPerChunk * c));
    p.chunk_row_bytes[c] = chunks[c].size(2);
    const int64_t chunk_rows = p.tiled ? p.tiles * kPlaneTileRows : p.rows;
    TORCH_CHECK(p.chunk_row_bytes[c] == (p.chunk_planes[c] * cols + 7) / 8 && chunks[c].size(1) == chunk_rows,
                "chunk ", c, " does not hold ", p.chunk_planes[c], " bits per column of [", chunk_rows, ", ", cols,
                "]", p.tiled ? " (rows padded to whole tiles)" : "");
    p.chunk_bits[c] = chunks[c].data_ptr<uint8_t>() + expert * chunk_rows * p.chunk_row_bytes[c];
  }
  const int64_t padded_rows = p.tiles * kPlaneTileRows;
  const std::vector<int64_t> scale_strides =
      p.tiled ? std::vector<int64_t>{p.groups * padded_rows, 1, padded_rows} : std::vector<int64_t>{p.rows * p.groups, p.groups, 1};
  for (const at::Tensor* t : {&base_scale, &base_zero})
    TORCH_CHECK(t->strides() == at::IntArrayRef(scale_strides) && t->size(1) == p.rows && t->size(2) == p.groups,
                "base scales and zeros must be float16 [experts, ", p.rows, ", ", p.groups, "] with strides ",
                at::IntArrayRef(scale_strides), p.tiled ? " (group-major, rows padded to whole tiles)" : "", ", not ",
                t->strides());
  p.base_scale = half_bits(base_scale) + expert * scale_strides[0];
  p.base_zero = half_bits(base_zero) + expert * scale_strides[0];
  p.code_row_bytes = (p.groups + 1) / 2;
  const std::vector<int64_t> code_sizes = p.tiled ? std::vector<int64_t>{p.groups, p.tiles, kTileCodeBytes}
                                                  : std::vector<int64_t>{p.rows, p.code_row_bytes};
  TORCH_CHECK(plane_scale.dim() == 2 + int64_t(code_sizes.size()) && plane_scale.is_contiguous() &&
                  plane_scale.sizes().slice(2) == at::IntArrayRef(code_sizes) &&
                  scale_table.size(0) >= plane_scale.size(1) && scale_table.size(1) == 16,
              "plane scale codes must be contiguous uint8 [experts, planes, ", at::IntArrayRef(code_sizes),
              "] with a float32 [planes, 16] table");
  p.scale_table = scale_table.data_ptr<float>();
  const int64_t code_matrix = plane_scale.stride(1);
  for (int j = 0; j < width - min_bits; ++j)
    p.residual_codes[j] = plane_scale.data_ptr<uint8_t>() + (expert * plane_scale.size(1) + j) * code_matrix;
  return p;
}

// Coefficients of the planes of group (row, group): weight = offset + sum_i coef[i] * bit_i;
// coef[i] = 0 for planes past the width. P: planes the caller reads (a compile-time bound).
template <int P>
struct GroupCoefs {
  float coef[P];
  float offset;
  GroupCoefs() = default;
  GroupCoefs(const Projection& p, int64_t row, int64_t group) {
    const int64_t at = p.scale_at(row, group);
    const float s = half_to_float(p.base_scale[at]);
    offset = -s * half_to_float(p.base_zero[at]);
    for (int i = 0; i < P; ++i) {
      if (i >= p.planes) {
        coef[i] = 0;
      } else if (i < p.min_bits) {
        coef[i] = s * float(1 << i);
      } else {
        const int j = i - p.min_bits;
        const float a = s * p.scale_table[16 * j + p.code(j, row, group)];
        coef[i] = 2 * a;
        offset -= a;
      }
    }
  }
};

// Loops over the kernels' small arrays of vectors unrolled, so that GCC keeps the arrays in registers;
// not with SIMDe, whose vectors live in memory anyway (its build would take over 10 minutes).
#ifdef D2MOE_SIMDE_AVX512
#define D2MOE_UNROLL
#else
#define D2MOE_UNROLL _Pragma("GCC unroll 8")
#endif

// ---------------------------------------------------------------- vector width
// One source, compiled once per instruction set (kernels/cpu_bitplanes.py): AVX2 (8 float lanes,
// 16 registers) or AVX-512 F/BW/VL/DQ (16 lanes, 32 registers), the latter also through SIMDe's
// portable AVX-512 intrinsics, so that CPUs without AVX-512 test its arithmetic. Only the
// functions below name the instructions.
#if defined(__AVX512F__) || defined(D2MOE_SIMDE_AVX512)
#ifdef D2MOE_SIMDE_AVX512
#define D2MOE_MM512(name) simde_mm512_##name
using Vec = simde__m512;
using VecI = simde__m512i;
#else
#define D2MOE_MM512(name) _mm512_##name
using Vec = __m512;
using VecI = __m512i;
#endif
constexpr int kLanes = 16;
// 32 registers hold eight tokens' accumulators beside the codebooks.
constexpr int64_t kTokenBlock = 8;
// Three blocks: on an AVX-512 Xeon (OLMoE expert, two threads) 12 / 16 / 24 tokens took 0.49-0.64 /
// 0.45-0.59 / 0.59-0.78x the tile path's time at widths 2 and 4, and 1.0 / 0.79 / 1.05x at width 8
// (benchmarks/results/kernels.md).
constexpr int64_t kRegisterTokens = 3 * kTokenBlock;
using Mask = uint16_t;
// Lanes whose bit of k is set: a + b; the others: a.
inline Vec vmask_add(Vec a, Mask k, Vec b) { return D2MOE_MM512(mask_add_ps)(a, k, a, b); }
// 16 bits from memory straight into a mask register (kmovw k, m16: a load, not a vector ALU op).
#ifdef D2MOE_SIMDE_AVX512
inline Mask vload_mask(const uint8_t* p) {
  Mask k;
  std::memcpy(&k, p, sizeof(k));
  return k;
}
#else
// GCC moves a mask loaded by _load_mask16 through a general register (kmovw k, r32 takes port 5,
// which the masked adds need); the load written out stays a load.
inline Mask vload_mask(const uint8_t* p) {
  __mmask16 k;
  asm("kmovw %1, %0" : "=Yk"(k) : "m"(*reinterpret_cast<const uint16_t*>(p)));
  return k;
}
#endif
// Lanes whose bit of k is set: a; the others: 0.
inline Vec vmaskz_mov(Mask k, Vec a) { return D2MOE_MM512(maskz_mov_ps)(k, a); }
inline Vec vzero() { return D2MOE_MM512(setzero_ps)(); }
inline Vec vset1(float f) { return D2MOE_MM512(set1_ps)(f); }
inline Vec vload(const float* p) { return D2MOE_MM512(loadu_ps)(p); }
inline void vstore(float* p, Vec v) { D2MOE_MM512(storeu_ps)(p, v); }
inline Vec vadd(Vec a, Vec b) { return D2MOE_MM512(add_ps)(a, b); }
inline Vec vmul(Vec a, Vec b) { return D2MOE_MM512(mul_ps)(a, b); }
inline Vec vsub(Vec a, Vec b) { return D2MOE_MM512(sub_ps)(a, b); }
inline Vec vfmadd(Vec a, Vec b, Vec c) { return D2MOE_MM512(fmadd_ps)(a, b, c); }
inline VecI vbroadcast(uint32_t w) { return D2MOE_MM512(set1_epi32)(int(w)); }
inline VecI vsrlv(VecI a, VecI n) { return D2MOE_MM512(srlv_epi32)(a, n); }
inline VecI vlane_times(int n) {
  return D2MOE_MM512(setr_epi32)(0, n, 2 * n, 3 * n, 4 * n, 5 * n, 6 * n, 7 * n, 8 * n, 9 * n, 10 * n, 11 * n,
                                 12 * n, 13 * n, 14 * n, 15 * n);
}
// Entry (index & 3) of each 128-bit quarter's 4 entries (vpermilps). SIMDe lacks its
// intrinsic; there vpermps, entry (index & 15) of all 16, gives the same here: the codebooks
// repeat their 4 entries in every quarter.
#ifdef D2MOE_SIMDE_AVX512
inline Vec vlookup(Vec table, VecI index) { return D2MOE_MM512(permutexvar_ps)(index, table); }
#else
inline Vec vlookup(Vec table, VecI index) { return _mm512_permutevar_ps(table, index); }
#endif
inline __m256 vlow_plus_high(Vec v) {
  const Vec high = D2MOE_MM512(castpd_ps)(D2MOE_MM512(castpd256_pd512)(
      D2MOE_MM512(extractf64x4_pd)(D2MOE_MM512(castps_pd)(v), 1)));
  return D2MOE_MM512(castps512_ps256)(vadd(v, high));
}
#else
constexpr int kLanes = 8;
constexpr int64_t kTokenBlock = 4;
// Two blocks: with AVX2 at width 4, 8 tokens took 0.65x the tile path's time; at 16 they were even.
constexpr int64_t kRegisterTokens = 2 * kTokenBlock;
using Vec = __m256;
using VecI = __m256i;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset1(float f) { return _mm256_set1_ps(f); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec vfmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline VecI vbroadcast(uint32_t w) { return _mm256_set1_epi32(int(w)); }
inline VecI vsrlv(VecI a, VecI n) { return _mm256_srlv_epi32(a, n); }
inline VecI vlane_times(int n) { return _mm256_setr_epi32(0, n, 2 * n, 3 * n, 4 * n, 5 * n, 6 * n, 7 * n); }
// Entry (index & 3) of each 128-bit half's 4 entries (vpermilps).
inline Vec vlookup(Vec table, VecI index) { return _mm256_permutevar_ps(table, index); }
inline __m256 vlow_plus_high(Vec v) { return v; }
#endif

// Widths whose tables carry a second bfloat16 part: the first part's rounding error, rounded again (2^-17 of an
// entry instead of 2^-9). With one part, widths 7 and 8 lost 7.5 % and 26 % of their own KL on the reference model
// in float32, widths 2-6 at most 2.1 % (benchmarks/results/kernels.md).
constexpr int kTwoPartPlanes = 7;
constexpr int table_parts(int planes) { return planes >= kTwoPartPlanes ? 2 : 1; }
// Planes that read the second part: a plane's rounding error is weighted by its coefficient, and the first 2
// (a 2-bit base's, s and 2 s) carry all but 6 % of the squared coefficients at width 8; the residuals (about
// s / 2, s / 4, ...) read one part: 10 lookups per pattern at width 8 instead of 16, extra KL +0.1 % / -0.0 % of
// widths 7 / 8's own on the reference model; the first residual on two parts as well was 1.03-1.07x slower at
// 2-16 tokens, plane 0 alone moved the KL by 6-8 % (benchmarks/results/kernels.md).
constexpr int kTwoPartLeadingPlanes = 2;
constexpr int plane_parts(int planes, int plane) {
  return table_parts(planes) == 2 && plane < kTwoPartLeadingPlanes ? 2 : 1;
}

// Most tokens of a projection (`planes` wide, `groups` groups, tiled or not) that run by lookup (AVX-512 builds:
// lookup_tiles), 0 if none: tiled planes. Lookups beat the masked rebuild on
// tiles at every width and token count of the register path. Their time grows with tokens times lookups per
// pattern, torch's GEMM on rebuilt tiles by less per token after a fixed rebuild: on OLMoE's expert (two threads)
// lookups still won at 256 tokens with one table part (widths 2-6; 1.1-1.3x at width 6), and lost from about 64-80
// at widths 7-8 (two parts on their leading planes); a block of kTokenBlock tokens at a time
// (benchmarks/results/kernels.md).
constexpr int64_t kLookupMaxTokens = 256;
constexpr int64_t kTwoPartLookupMaxTokens = 64;
inline int64_t lookup_token_limit(bool tiled, int planes) {
  if (!tiled || planes <= 0) return 0;
  return table_parts(planes) == 1 ? kLookupMaxTokens : kTwoPartLookupMaxTokens;
}

inline bool lookup_fits(const Projection& p, int64_t tokens) {
  return tokens <= lookup_token_limit(p.tiled, p.planes);
}

inline float horizontal_sum(Vec v) {
  const __m256 v8 = vlow_plus_high(v);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps(v8, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lane i: i & 1 and (i >> 1) & 1, the two bits of a codebook index.
alignas(64) constexpr float kIndexBit0[16] = {0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1};
alignas(64) constexpr float kIndexBit1[16] = {0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1};

// ---------------------------------------------------------------- vector path (group_size % kLanes == 0)

// The chunks a width reads, known at compile time: NC chunks of two bits per column,
// the last of LAST (1 when the resident width is odd and it is the last plane).
template <int NC, int LAST>
struct Chunks {
  static constexpr int count = NC;
  static constexpr int planes = 2 * NC;  // coefficients read (a lone last plane's second is zero)
  static constexpr bool masked = false;
  static constexpr int bits_per_column(int c) { return c == NC - 1 ? LAST : 2; }
};

// N planes as stored (the AVX-512 build): each a mask per vector of columns.
template <int N>
struct Planes {
  static constexpr int count = N;
  static constexpr int planes = N;
  static constexpr bool masked = true;
  static constexpr int bits_per_column(int) { return 1; }
};

// Plane pairs: the 4-entry codebook of each chunk, repeated across the register; the offset rides
// on chunk 0. Planes as stored: each plane's coefficient in every lane, and the offset.
template <class L>
struct Codebooks {
  Vec entries[L::count];
  Vec offset;  // planes as stored only
  Codebooks() = default;
  [[gnu::always_inline]] inline void set(const Projection& p, int64_t row, int64_t group) {
    const GroupCoefs<L::planes> k(p, row, group);
    if constexpr (L::masked) {
      for (int c = 0; c < L::count; ++c) entries[c] = vset1(k.coef[c]);
      offset = vset1(k.offset);
    } else {
      const Vec bit0 = vload(kIndexBit0), bit1 = vload(kIndexBit1);
      for (int c = 0; c < L::count; ++c) {
        const Vec low = vmul(vset1(k.coef[2 * c]), bit0);
        entries[c] = vfmadd(vset1(k.coef[2 * c + 1]), bit1, low);
      }
      entries[0] = vadd(entries[0], vset1(k.offset));
    }
  }
};

// The weights of columns [col, col + kLanes) of a group in a row (`group_bits`: each chunk's
// Projection::group_row; col a multiple of kLanes). Planes as stored: each plane's 16 bits straight
// into a mask register. Plane pairs: each chunk's bits for them are one 32-bit word read at the
// column's byte (at one or two bits per column), shifted right by each lane's bit offset; the word
// may run up to 3 bytes past the row: resident chunks carry 4 bytes of slack at the end.
template <class L>
[[gnu::always_inline]] inline Vec weights(const Codebooks<L>& cb, const uint8_t* const* group_bits, const Projection& p,
                                          int64_t col) {
#if defined(__AVX512F__) || defined(D2MOE_SIMDE_AVX512)
  if constexpr (L::masked) {
    // Two chains (even and odd planes) halve the dependent adds.
    Mask k[L::count];
    const int64_t at = p.group_byte(col);
    for (int c = 0; c < L::count; ++c) k[c] = vload_mask(group_bits[c] + at);
    Vec even = vmask_add(cb.offset, k[0], cb.entries[0]);
    if constexpr (L::count == 1) return even;
    Vec odd = vmaskz_mov(k[1], cb.entries[1]);
    for (int c = 2; c < L::count; ++c) {
      if (c % 2 == 0)
        even = vmask_add(even, k[c], cb.entries[c]);
      else
        odd = vmask_add(odd, k[c], cb.entries[c]);
    }
    return vadd(even, odd);
  }
#endif
  Vec w;
  for (int c = 0; c < L::count; ++c) {
    const int n = L::bits_per_column(c);
    uint32_t word;
    std::memcpy(&word, group_bits[c] + n * col / 8, 4);
    const Vec a = vlookup(cb.entries[c], vsrlv(vbroadcast(word), vlane_times(n)));
    w = c == 0 ? a : vadd(w, a);
  }
  return w;
}

// Vectors of weights rebuilt before they are used: independent rebuilds in flight hide the latency
// of each one's chain of masked adds (4 cycles each).
template <class L>
constexpr int kVectorsPerStep = L::masked ? 4 : 2;

// Calls step(i, weights, first column) for every kLanes weights of group g of rows row .. row + R - 1, given
// their codebooks and chunks' bits (Projection::group_row); each row's calls come in the same order whatever
// R is. R > 1 interleaves independent rows so that their dependency chains (the accumulators' FMAs) overlap.
template <class L, int R, typename Step>
[[gnu::always_inline]] inline void group_vectors(const Projection& p, const Codebooks<L> (&cb)[R],
                                                 const uint8_t* const (&group_bits)[R][L::count], int64_t g,
                                                 Step&& step) {
  const int64_t vectors_per_group = p.group_size / kLanes;
  const int64_t first = g * p.group_size;
  int64_t v = 0;
  Vec w[kVectorsPerStep<L>][R];
#pragma GCC unroll 2
  for (; v + kVectorsPerStep<L> <= vectors_per_group; v += kVectorsPerStep<L>) {
    for (int j = 0; j < kVectorsPerStep<L>; ++j)
      for (int i = 0; i < R; ++i) w[j][i] = weights<L>(cb[i], group_bits[i], p, kLanes * (v + j));
    for (int j = 0; j < kVectorsPerStep<L>; ++j)
      for (int i = 0; i < R; ++i) step(i, w[j][i], first + kLanes * (v + j));
  }
  for (; v < vectors_per_group; ++v) {  // vectors per group not a multiple of the step
    for (int i = 0; i < R; ++i) w[0][i] = weights<L>(cb[i], group_bits[i], p, kLanes * v);
    for (int i = 0; i < R; ++i) step(i, w[0][i], first + kLanes * v);
  }
}

// group_vectors of group g of rows row .. row + R - 1, their codebooks made here.
template <class L, int R, typename Step>
[[gnu::always_inline]] inline void group_weights(const Projection& p, int64_t row, int64_t g, Step&& step) {
  Codebooks<L> cb[R];
  const uint8_t* group_bits[R][L::count];
  for (int i = 0; i < R; ++i) {
    cb[i].set(p, row + i, g);
    for (int c = 0; c < L::count; ++c) group_bits[i][c] = p.group_row(c, row + i, g);
  }
  group_vectors<L, R>(p, cb, group_bits, g, step);
}

// group_weights over every group of the rows, in order.
template <class L, int R, typename Step>
[[gnu::always_inline]] inline void for_each_weights(const Projection& p, int64_t row, Step&& step) {
  for (int64_t g = 0; g < p.groups; ++g) group_weights<L, R>(p, row, g, step);
}

// out[t, r] = sum_c W[r, c] x[t, c] for TT tokens and rows r .. r + R - 1, weights rebuilt in registers.
template <class L, int TT, int R>
[[gnu::always_inline]] inline void register_row_block(const Projection& p, const float* x, float* out, int64_t r) {
  Vec acc[R][TT], spare[R];
  for (int i = 0; i < R; ++i) {
    spare[i] = vzero();
    for (int t = 0; t < TT; ++t) acc[i][t] = vzero();
  }
  for_each_weights<L, R>(p, r, [&](int i, Vec w, int64_t col) {
    for (int t = 0; t < TT; ++t) acc[i][t] = vfmadd(w, vload(x + t * p.cols + col), acc[i][t]);
    // A single token alternates two accumulators so consecutive FMAs do not wait on each other.
    if constexpr (TT == 1) std::swap(acc[i][0], spare[i]);
  });
  for (int i = 0; i < R; ++i) {
    if constexpr (TT == 1) acc[i][0] = vadd(acc[i][0], spare[i]);
    for (int t = 0; t < TT; ++t) out[t * p.rows + r + i] = horizontal_sum(acc[i][t]);
  }
}

#if defined(__AVX512F__) || defined(D2MOE_SIMDE_AVX512)
// Tokens on tiled planes: no weight is rebuilt (T-MAC's lookup tables). For every 4 columns a
// table holds the 16 sums of their inputs that a 4-bit pattern selects, in bfloat16 (lookup_tables); two such
// tables (columns 4q.. of a 32-column word and 16 + 4q..) fill one 32-entry vector of 16-bit words. A
// tile's 32-bit words of one plane's 32 columns in 16 rows (one row per lane) are 32 halves of 16
// columns; one 16-bit permute (vpermw) looks up a pattern of every half at once, each half's table
// picked by bit 4 of its index, and one vdpbf16ps adds a row's two halves into its float32 sum. Per
// group and row
//   out[r] += offset[r, g] * sum_{c in g} x[c] + sum_i coef_i[r, g] * (sum of plane i's selected inputs),
// 4 vector instructions per 128 weight-bits (a shift, the index's ternary logic, the permute, the
// dot product), against 6 with float32 tables (16-entry vpermps: 1.5-1.8x faster per weight-bit on Zen 4,
// benchmarks/probes/lookup_loops.cpp) and 8 masked adds for the rebuild; the shifts are shared by the
// tokens, a second table part (table_parts) adds a permute and a dot product. The price is the tables'
// rounding, its accuracy cost measured in benchmarks/results/kernels.md.
// Tokens x planes accumulators of one pass over a tile's planes at most: with the words, 32 registers.
constexpr int kLookupAccumulators = 16;

// Lane p of kPatternBit[k]: bit k of the pattern p.
alignas(64) constexpr float kPatternBit[4][16] = {
    {0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1},
    {0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1},
    {0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1},
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1},
};

// float32 to bfloat16, rounded to nearest even as torch rounds (finite inputs), in each 32-bit lane's low half:
// the same tables with and without AVX512_BF16.
inline VecI vbfloat16_bits(Vec v) {
  const VecI u = D2MOE_MM512(castps_si512)(v);
  const VecI odd = D2MOE_MM512(and_si512)(D2MOE_MM512(srli_epi32)(u, 16), D2MOE_MM512(set1_epi32)(1));
  return D2MOE_MM512(srli_epi32)(D2MOE_MM512(add_epi32)(u, D2MOE_MM512(add_epi32)(odd, D2MOE_MM512(set1_epi32)(0x7FFF))),
                                 16);
}

// acc + float32 of the two bfloat16 values in each 32-bit lane of v, the upper one first (vdpbf16ps's order).
inline Vec vadd_bfloat16_pairs(Vec acc, VecI v) {
#if defined(__AVX512BF16__) && !defined(D2MOE_SIMDE_AVX512)
  return _mm512_dpbf16_ps(acc, (__m512bh)v, (__m512bh)_mm512_set1_epi16(0x3F80));  // times bfloat16 1.0
#else
  const Vec upper = D2MOE_MM512(castsi512_ps)(D2MOE_MM512(and_si512)(v, D2MOE_MM512(set1_epi32)(int(0xFFFF0000u))));
  const Vec lower = D2MOE_MM512(castsi512_ps)(D2MOE_MM512(slli_epi32)(v, 16));
  return vadd(vadd(acc, upper), lower);
#endif
}

// tables[32 (parts (tokens (4 w + q) + t) + part) + h * 16 + pattern]: for the 4 columns c_k = 32 w + 16 h + 4 q + k
// of token t, v = (sum of x[t, c_k] over the bits k of the pattern) - (sum of all 4) / 2, each sum added in column
// order in float32, as bfloat16: part 0 rounds v, part 1 (if any) rounds v less part 0 (exact in float32). Centred
// on the half sum, the entries are smaller (root mean square sigma instead of 1.4 sigma), and so their rounding
// (lookup_tiles adds the half sums back through the group sums). group_sums[t groups + g]: of token t's group g, in
// float32.
void lookup_tables(const Projection& p, const float* x, int64_t tokens, int parts, uint16_t* tables, float* group_sums) {
  const Vec bit0 = vload(kPatternBit[0]), bit1 = vload(kPatternBit[1]), bit2 = vload(kPatternBit[2]),
            bit3 = vload(kPatternBit[3]);
  const auto sums = [&](const float* xq) {
    Vec s = vmul(bit0, vset1(xq[0]));
    s = vfmadd(bit1, vset1(xq[1]), s);
    s = vfmadd(bit2, vset1(xq[2]), s);
    s = vfmadd(bit3, vset1(xq[3]), s);
    const Vec half = vmul(vset1(0.5f), D2MOE_MM512(permutexvar_ps)(D2MOE_MM512(set1_epi32)(15), s));  // pattern 15: all
    return vsub(s, half);
  };
  const auto bfloat16_value = [](VecI bits) { return D2MOE_MM512(castsi512_ps)(D2MOE_MM512(slli_epi32)(bits, 16)); };
  // Word l of the result: the low half of lane l of the first table (l < 16), else of lane l - 16 of the second.
  const VecI halves = D2MOE_MM512(setr_epi32)(0x00020000, 0x00060004, 0x000A0008, 0x000E000C, 0x00120010, 0x00160014,
                                              0x001A0018, 0x001E001C, 0x00220020, 0x00260024, 0x002A0028, 0x002E002C,
                                              0x00320030, 0x00360034, 0x003A0038, 0x003E003C);
  for (int64_t w = 0; w < p.cols / kPlaneTileColumns; ++w)
    for (int q = 0; q < 4; ++q)
      for (int64_t t = 0; t < tokens; ++t) {
        const float* xq = x + t * p.cols + kPlaneTileColumns * w + 4 * q;
        Vec low = sums(xq), high = sums(xq + 16);
        uint16_t* entry = tables + 32 * parts * (tokens * (4 * w + q) + t);
        for (int part = 0; part < parts; ++part, entry += 32) {
          const VecI low_bits = vbfloat16_bits(low), high_bits = vbfloat16_bits(high);
          D2MOE_MM512(storeu_si512)(entry, D2MOE_MM512(permutex2var_epi16)(low_bits, halves, high_bits));
          low = vsub(low, bfloat16_value(low_bits));
          high = vsub(high, bfloat16_value(high_bits));
        }
      }
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t g = 0; g < p.groups; ++g) {
      Vec sum = vzero();
      for (int64_t c = g * p.group_size; c < (g + 1) * p.group_size; c += kLanes) sum = vadd(sum, vload(x + t * p.cols + c));
      group_sums[t * p.groups + g] = horizontal_sum(sum);
    }
}

// GroupCoefs<N> of group g for rows r .. r + 15 of a tile (tiled layout), lane l for row r + l: the base
// scales and zeros one 32-byte load each, each residual plane's 16 codes one 8-byte load decoded by a
// permute of the plane's 16-entry table.
template <int N>
struct LaneCoefs {
  Vec coef[N], offset;
  LaneCoefs(const Projection& p, int64_t r, int64_t g) {
#ifdef D2MOE_SIMDE_AVX512
    alignas(64) float c[N][kLanes], o[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      const GroupCoefs<N> k(p, r + l, g);
      o[l] = k.offset;
      for (int i = 0; i < N; ++i) c[i][l] = k.coef[i];
    }
    offset = vload(o);
    for (int i = 0; i < N; ++i) coef[i] = vload(c[i]);
#else
    const int64_t at = p.scale_at(r, g);
    const auto halves = [&](const uint16_t* base) {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + at)));
    };
    const Vec s = halves(p.base_scale);
    offset = vmul(vsub(vzero(), s), halves(p.base_zero));
    for (int i = 0; i < N && i < p.min_bits; ++i) coef[i] = vmul(s, vset1(float(1 << i)));
    const int64_t code_at = p.tile_codes_at(r, g);
    for (int i = p.min_bits; i < N; ++i) {
      const int j = i - p.min_bits;
      // Bytes 0-7: rows 0-7 (the low halves), bytes 8-15: rows 8-15 (the high halves).
      const __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.residual_codes[j] + code_at));
      const __m128i codes = _mm_and_si128(_mm_unpacklo_epi64(packed, _mm_srli_epi16(packed, 4)), _mm_set1_epi8(15));
      const Vec a = vmul(s, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes), vload(p.scale_table + 16 * j)));
      coef[i] = vadd(a, a);
      offset = vsub(offset, a);
    }
#endif
  }
};

// Planes [FIRST, FIRST + COUNT) of one tile and group (`tile`: each plane's) of a width of N planes for TT
// tokens: each plane's selected input sums (acc[t][i] for plane FIRST + i) from the group's tables.
template <int TT, int N, int FIRST, int COUNT>
[[gnu::always_inline]] inline void lookup_planes(const uint8_t* const* tile, int64_t words, const uint16_t* group_tables,
                                                 Vec (&acc)[TT][COUNT]) {
D2MOE_UNROLL
  for (int t = 0; t < TT; ++t)
D2MOE_UNROLL
    for (int i = 0; i < COUNT; ++i) acc[t][i] = vzero();
  // A 16-bit half's index: its 4 low bits, and bit 4 set in the upper half (the second table).
  const VecI pattern_bits = D2MOE_MM512(set1_epi32)(0x000F000F), upper_table = D2MOE_MM512(set1_epi32)(0x00100000);
  for (int64_t w = 0; w < words; ++w) {
    VecI word[COUNT];
D2MOE_UNROLL
    for (int i = 0; i < COUNT; ++i)
      word[i] = D2MOE_MM512(loadu_si512)(tile[FIRST + i] + w * kPlaneTileWordBytes);
    constexpr int parts = table_parts(N);
    const uint16_t* tables = group_tables + 32 * parts * 4 * TT * w;
    // GCC keeps the arrays in registers only when every loop over them is unrolled.
D2MOE_UNROLL
    for (int q = 0; q < 4; ++q)
D2MOE_UNROLL
      for (int i = 0; i < COUNT; ++i) {  // pattern q of each half: (shifted & pattern_bits) | upper_table
        const VecI shifted = q == 0 ? word[i] : D2MOE_MM512(srli_epi32)(word[i], 4 * q);
        const VecI index = D2MOE_MM512(ternarylogic_epi32)(shifted, pattern_bits, upper_table, 0xEA);
D2MOE_UNROLL
        for (int t = 0; t < TT; ++t)
D2MOE_UNROLL
          for (int part = 0; part < plane_parts(N, FIRST + i); ++part) {
            const uint16_t* entries = tables + 32 * (parts * (TT * q + t) + part);
            acc[t][i] = vadd_bfloat16_pairs(
                acc[t][i], D2MOE_MM512(permutexvar_epi16)(index, D2MOE_MM512(loadu_si512)(entries)));
          }
      }
  }
}

// total[t] += sum_i coef_i acc_i over planes [FIRST, N) of one tile and group, in passes of at most
// kLookupAccumulators / TT planes (the accumulators stay in registers); the sums in plane order.
template <int N, int TT, int FIRST>
[[gnu::always_inline]] inline void lookup_passes(const uint8_t* const* tile, int64_t words, const uint16_t* group_tables,
                                                 const LaneCoefs<N>& k, Vec (&total)[TT]) {
  constexpr int per_pass = std::max(1, kLookupAccumulators / TT);
  constexpr int count = std::min(per_pass, N - FIRST);
  Vec acc[TT][count];
  lookup_planes<TT, N, FIRST, count>(tile, words, group_tables, acc);
D2MOE_UNROLL
  for (int t = 0; t < TT; ++t)
D2MOE_UNROLL
    for (int i = 0; i < count; ++i) total[t] = vfmadd(k.coef[FIRST + i], acc[t][i], total[t]);
  if constexpr (FIRST + count < N) lookup_passes<N, TT, FIRST + count>(tile, words, group_tables, k, total);
}

// lookup_tiles asks for the tile kPrefetchTiles ahead of the one it reads (the next group's first past the
// thread's last): a tile-group is 256 B a plane, too little work for the hardware prefetchers to run ahead, so
// without it a one-token layer call waited on memory once per tile-group (OLMoE, width 2, 8 of 64 experts: 1.03
// ms from memory against 0.63 from cache on two threads; with it 0.65; 2 or 8 tiles ahead no better).
constexpr int64_t kPrefetchTiles = 4;
template <int N>
[[gnu::always_inline]] inline void prefetch_tile_group(const Projection& p, int64_t b, int64_t g, int64_t b0, int64_t b1) {
  int64_t ahead = b + kPrefetchTiles, group = g;
  if (ahead >= b1) {
    ahead -= b1 - b0;
    if (++group >= p.groups || ahead >= b1) return;  // past the projection, or a share of under kPrefetchTiles
  }
  const int64_t row = ahead * kPlaneTileRows, bytes = p.tile_group_bytes();
  for (int i = 0; i < N; ++i) {
    const uint8_t* tile = p.group_row(i, row, group);
    for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch(tile + at);
  }
  const int64_t scale = p.scale_at(row, group);
  __builtin_prefetch(p.base_scale + scale);
  __builtin_prefetch(p.base_zero + scale);
  for (int i = p.min_bits; i < N; ++i)
    __builtin_prefetch(p.residual_codes[i - p.min_bits] + p.tile_codes_at(row, group));
}

// out[t, 16 b .. 16 b + 16) for TT tokens and the tiles b in [b0, b1) by lookup, N planes. Group by
// group, so that the group's tables stay in L1 while every tile reads them; the sums so far wait in out;
// the offset first, then the planes in order, whatever the passes.
template <int N, int TT>
void lookup_tiles(const Projection& p, const Lookup& lookup, float* out, int64_t b0, int64_t b1) {
  const int64_t words_per_group = p.group_size / kPlaneTileColumns;
  for (int64_t g = 0; g < p.groups; ++g) {
    const uint16_t* group_tables = lookup.tables.data() + 32 * table_parts(N) * 4 * TT * words_per_group * g;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r = b * kPlaneTileRows;
      prefetch_tile_group<N>(p, b, g, b0, b1);
      const LaneCoefs<N> k(p, r, g);
      // The tables are centred (lookup_tables): each plane's selected sum is short of half the group sum.
      Vec coef_sum = k.coef[0];
D2MOE_UNROLL
      for (int i = 1; i < N; ++i) coef_sum = vadd(coef_sum, k.coef[i]);
      const Vec offset = vfmadd(vset1(0.5f), coef_sum, k.offset);
      Vec total[TT];
D2MOE_UNROLL
      for (int t = 0; t < TT; ++t) {
        total[t] = g == 0 ? vzero() : vload(out + t * p.rows + r);
        total[t] = vfmadd(offset, vset1(lookup.group_sums[t * p.groups + g]), total[t]);
      }
      const uint8_t* tile[N];
D2MOE_UNROLL
      for (int i = 0; i < N; ++i) tile[i] = p.group_row(i, r, g);
      lookup_passes<N, TT, 0>(tile, words_per_group, group_tables, k, total);
D2MOE_UNROLL
      for (int t = 0; t < TT; ++t) vstore(out + t * p.rows + r, total[t]);
    }
  }
}

// Rows [r0, r1) of TT tokens: the whole tiles among them by lookup, the other rows by the masked rebuild row by row.
template <class L, int TT>
void lookup_rows(const Projection& p, const float* x, float* out, int64_t r0, int64_t r1, const Lookup& lookup) {
  const int64_t b0 = (r0 + kPlaneTileRows - 1) / kPlaneTileRows, b1 = r1 / kPlaneTileRows;
  if (b0 >= b1) {
    for (int64_t r = r0; r < r1; ++r) register_row_block<L, TT, 1>(p, x, out, r);
    return;
  }
  lookup_tiles<L::count, TT>(p, lookup, out, b0, b1);
  for (int64_t r = r0; r < b0 * kPlaneTileRows; ++r) register_row_block<L, TT, 1>(p, x, out, r);
  for (int64_t r = b1 * kPlaneTileRows; r < r1; ++r) register_row_block<L, TT, 1>(p, x, out, r);
}
#endif

// The lookup tables of the tokens x of `p` where they run by lookup (AVX-512 builds, lookup_fits), one Lookup
// per register block of kTokenBlock tokens, made in `blocks` once per projection call, before its rows are split
// across threads; the first block's, or nullptr.
const Lookup* make_lookup(const Projection& p, const float* x, int64_t tokens, std::vector<Lookup>& blocks) {
#if defined(__AVX512F__) || defined(D2MOE_SIMDE_AVX512)
  if (lookup_fits(p, tokens)) {
    blocks.resize((tokens + kTokenBlock - 1) / kTokenBlock);
    for (size_t b = 0; b < blocks.size(); ++b) {
      const int64_t first = int64_t(b) * kTokenBlock, n = std::min(kTokenBlock, tokens - first);
      blocks[b].tables.resize(n * 4 * p.cols * table_parts(p.planes));
      blocks[b].group_sums.resize(n * p.groups);
      lookup_tables(p, x + first * p.cols, n, table_parts(p.planes), blocks[b].tables.data(),
                    blocks[b].group_sums.data());
    }
    return blocks.data();
  }
#endif
  return nullptr;
}

// How this build runs a projection by lookup: the most tokens (lookup_token_limit; 0: never) and how many of its
// leading planes read a second bfloat16 part of the tables (plane_parts; the others one); tests choose their
// reference by it.
std::tuple<int64_t, int64_t> lookup_plan(int64_t cols, int64_t group_size, int64_t width) {
  TORCH_CHECK(group_size > 0 && cols % group_size == 0, cols, " columns are not whole groups of ", group_size);
  const int64_t tokens = lookup_token_limit(tiled_layout(group_size), int(width));
#if defined(__AVX512F__) || defined(D2MOE_SIMDE_AVX512)
  int64_t two_part_planes = 0;
  while (two_part_planes < width && plane_parts(int(width), int(two_part_planes)) == 2) ++two_part_planes;
  return {tokens, two_part_planes};
#else
  return {tokens, 0};
#endif
}

// Rows [r0, r1). With AVX-512 and lookup tables: lookup_rows. Where the rebuild is light (one chunk,
// or two chunks shared by two tokens; with AVX-512 up to two tokens) the
// FMA chains (two accumulators per row for one token, one per token for two) leave the FMA units
// waiting, so two rows run interleaved: each row's sums are the same operations in the same order,
// only scheduled side by side. With more chunks per token the rebuild already fills the vector
// units and the second row's codebooks only add register pressure. (Measured on one thread,
// hidden 2048 x intermediate 1408: width 2, 1 token 0.74 -> 0.69 ms, 2 tokens 1.40 -> 0.95;
// width 4, 2 tokens 1.64 -> 1.39; but width 4, 1 token 1.19 -> 1.44 and width 8 13 % slower.)
template <class L, int TT>
void register_rows(const Projection& p, const float* x, float* out, int64_t r0, int64_t r1, const Lookup* lookup) {
#if defined(__AVX512F__) || defined(D2MOE_SIMDE_AVX512)
  if constexpr (L::masked)
    if (lookup != nullptr) return lookup_rows<L, TT>(p, x, out, r0, r1, *lookup);
#endif
  constexpr bool interleave = L::masked ? (TT == 2)
                                        : (L::count == 1 && TT <= 2) || (L::count == 2 && TT == 2);
  int64_t r = r0;
  if constexpr (interleave)
    for (; r + 2 <= r1; r += 2) register_row_block<L, TT, 2>(p, x, out, r);
  for (; r < r1; ++r) register_row_block<L, TT, 1>(p, x, out, r);
}

template <class L>
void dequantize_rows_vector(const Projection& p, int64_t r0, int64_t r1, float* dst) {
  for (int64_t r = r0; r < r1; ++r, dst += p.cols)
    for_each_weights<L, 1>(p, r, [&](int, Vec w, int64_t col) { vstore(dst + col, w); });
}

// ---------------------------------------------------------------- any group size

void dequantize_rows_scalar(const Projection& p, int64_t r0, int64_t r1, float* dst) {
  for (int64_t r = r0; r < r1; ++r, dst += p.cols) {
    for (int64_t g = 0; g < p.groups; ++g) {
      const GroupCoefs<kMaxPlanes> k(p, r, g);
      for (int64_t c = g * p.group_size; c < (g + 1) * p.group_size; ++c) {
        float w = k.offset;
        for (int i = 0; i < p.planes; ++i) w += k.coef[i] * float(p.bit(i, r, c));
        dst[c] = w;
      }
    }
  }
}

// ---------------------------------------------------------------- dispatch

// Calls F<Chunks<chunks, last>>::run(args...) (plane pairs) or F<Planes<planes>>::run(args...)
// (planes as stored): the chunk shape as template arguments.
template <template <class> class F, typename... Args>
void with_chunks(const Projection& p, Args&&... args) {
  if constexpr (kPlanesPerChunk == 1) {
    switch (p.chunks) {
      case 1: F<Planes<1>>::run(p, args...); break;
      case 2: F<Planes<2>>::run(p, args...); break;
      case 3: F<Planes<3>>::run(p, args...); break;
      case 4: F<Planes<4>>::run(p, args...); break;
      case 5: F<Planes<5>>::run(p, args...); break;
      case 6: F<Planes<6>>::run(p, args...); break;
      case 7: F<Planes<7>>::run(p, args...); break;
      case 8: F<Planes<8>>::run(p, args...); break;
      default: TORCH_CHECK(false, "unsupported width: ", p.chunks, " planes");
    }
  } else {
    const int last = p.chunk_planes[p.chunks - 1];
    switch (p.chunks * 2 + last - 1) {
      case 2: F<Chunks<1, 1>>::run(p, args...); break;
      case 3: F<Chunks<1, 2>>::run(p, args...); break;
      case 4: F<Chunks<2, 1>>::run(p, args...); break;
      case 5: F<Chunks<2, 2>>::run(p, args...); break;
      case 6: F<Chunks<3, 1>>::run(p, args...); break;
      case 7: F<Chunks<3, 2>>::run(p, args...); break;
      case 8: F<Chunks<4, 1>>::run(p, args...); break;
      case 9: F<Chunks<4, 2>>::run(p, args...); break;
      default: TORCH_CHECK(false, "unsupported plane pairs: ", p.chunks, " chunks, last of ", last);
    }
  }
}

template <class L>
struct RegisterRows {
  // register_rows<L, tokens>, for 1 <= tokens <= TT.
  template <int TT = kTokenBlock>
  static void run(const Projection& p, const float* x, int64_t tokens, float* out, int64_t r0, int64_t r1,
                  const Lookup* lookup) {
    if (tokens == TT) return register_rows<L, TT>(p, x, out, r0, r1, lookup);
    if constexpr (TT > 1) return run<TT - 1>(p, x, tokens, out, r0, r1, lookup);
    TORCH_CHECK(false, "register blocks hold 1 to ", kTokenBlock, " tokens, not ", tokens);
  }
};

template <class L>
struct DequantizeRows {
  static void run(const Projection& p, int64_t r0, int64_t r1, float* dst) { dequantize_rows_vector<L>(p, r0, r1, dst); }
};

// out[t, r] for tokens that fit_registers and rows [r0, r1) (x: [tokens, cols], out: [tokens, rows]);
// `lookup`: make_lookup's, for these tokens (one per block of kTokenBlock).
void register_linear(const Projection& p, const float* x, int64_t tokens, float* out, int64_t r0, int64_t r1,
                     const Lookup* lookup) {
  for (int64_t t = 0; t < tokens; t += kTokenBlock)
    with_chunks<RegisterRows>(p, x + t * p.cols, std::min(kTokenBlock, tokens - t), out + t * p.rows, r0, r1,
                              lookup == nullptr ? nullptr : lookup + t / kTokenBlock);
}

// Whether `tokens` tokens of `p` run in registers (register_linear, by lookup or rebuild) rather than through
// rebuilt tiles and torch's GEMM.
bool fits_registers(const Projection& p, int64_t tokens) {
  return p.group_size % kLanes == 0 && (tokens <= kRegisterTokens || lookup_fits(p, tokens));
}

// out [tokens, rows] = x [tokens, cols] @ W^T, rows split across torch's intra-op threads.
void linear(const Projection& p, const at::Tensor& x, const at::Tensor& out) {
  const int64_t tokens = x.size(0);
  const bool vector_groups = p.group_size % kLanes == 0;
  const int64_t grain = std::max<int64_t>(1, kBitsPerThread / (p.cols * p.planes));
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (fits_registers(p, tokens)) {
    std::vector<Lookup> lookup;
    const Lookup* made = make_lookup(p, xp, tokens, lookup);
    // Tiled planes split at whole tiles, so that a row takes the same path (lookup or rebuild) whatever the
    // split, as in a layer call's blocks (segments_linear).
    const int64_t unit = p.tiled ? kPlaneTileRows : 1;
    at::parallel_for(0, (p.rows + unit - 1) / unit, std::max<int64_t>(1, grain / unit), [&](int64_t u0, int64_t u1) {
      register_linear(p, xp, tokens, op, u0 * unit, std::min(p.rows, u1 * unit), made);
    });
    return;
  }
  // Tiles one after another: the rebuild is split across threads, then torch's GEMM
  // runs with its own threads. (A GEMM called inside at::parallel_for nests OpenMP
  // regions, which ran 100x slower on this loaded 2-core machine.)
  at::Tensor tile = at::empty({kTileRows, p.cols}, x.options());
  float* tp = tile.data_ptr<float>();
  for (int64_t start = 0; start < p.rows; start += kTileRows) {
    const int64_t n = std::min(kTileRows, p.rows - start);
    at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
      if (vector_groups)
        with_chunks<DequantizeRows>(p, start + r0, start + r1, tp + r0 * p.cols);
      else
        dequantize_rows_scalar(p, start + r0, start + r1, tp + r0 * p.cols);
    });
    at::Tensor columns = out.narrow(1, start, n);  // a strided view BLAS writes in place
    at::mm_out(columns, x, tile.narrow(0, 0, n).t());
  }
}

void check_projection(const std::vector<at::Tensor>& chunks, const std::vector<at::Tensor>& scales, const char* name) {
  TORCH_CHECK(!chunks.empty() && scales.size() == 4, name,
              ": expected plane pairs, base scale, base zero, plane scale codes and their table");
  for (const auto& t : chunks)
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == at::kByte && t.dim() == 3, name,
                ": plane pairs must be contiguous uint8 CPU tensors [experts, rows, bytes]");
  for (const auto& t : scales)  // their shapes and strides: view_projection
    TORCH_CHECK(t.device().is_cpu(), name, ": scales must be CPU tensors");
  TORCH_CHECK(scales[3].is_contiguous(), name, ": the plane scale codes' table must be contiguous");
  TORCH_CHECK(scales[0].scalar_type() == at::kHalf && scales[1].scalar_type() == at::kHalf, name,
              ": base scales and zeros must be float16");
  TORCH_CHECK(scales[2].scalar_type() == at::kByte && scales[2].dim() >= 2, name,
              ": plane scale codes must be uint8 [experts, planes, ...]");
  TORCH_CHECK(scales[3].scalar_type() == at::kFloat && scales[3].dim() == 2, name,
              ": the plane scale table must be float32 [planes, 16]");
}

// out [tokens, rows] = x [tokens, cols] @ W^T for expert `expert` of one projection at width `width` (linear()),
// as a layer call computes a segment of that many tokens: for tests and benchmarks of one projection.
void projection_linear(const at::Tensor& x, const std::vector<at::Tensor>& chunks, const std::vector<at::Tensor>& scales,
                       int64_t min_bits, int64_t expert, int64_t width, int64_t group_size, at::Tensor out) {
  check_projection(chunks, scales, "projection");
  TORCH_CHECK(0 <= expert && expert < scales[0].size(0), "expert ", expert, " is not resident");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2, "x must be contiguous float32 [tokens, cols]");
  const Projection p = view_projection(chunks, scales, min_bits, expert, width, x.size(1), group_size);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == x.size(0) &&
                  out.size(1) == p.rows,
              "out must be contiguous float32 [", x.size(0), ", ", p.rows, "]");
  linear(p, x, out);
}

// Rows of one projection for several (expert, width) segments of a layer call, computed together:
// out[first + i, :] = W_s x[first + i, :] for each segment s = (projection, first, tokens).
// Segments of up to kRegisterTokens tokens share one parallel region, split into blocks of rows, so
// that both threads work even when each expert alone is too small to split; larger ones (prefill)
// go through linear()'s tiles and torch's GEMM. Each row's arithmetic is linear()'s.
struct Segment {
  Projection projection;
  int64_t first, tokens;
};

void segments_linear(const std::vector<Segment>& segments, const at::Tensor& x, const at::Tensor& out) {
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t cols = x.size(1), rows = out.size(1);
  struct Block {
    const Segment* segment;
    int64_t r0, r1;
  };
  std::vector<Block> blocks;
  std::vector<const Segment*> in_registers;
  int64_t bits = 0;  // plane-bits the register blocks read
  for (const Segment& s : segments) {
    if (!fits_registers(s.projection, s.tokens)) {
      linear(s.projection, x.narrow(0, s.first, s.tokens), out.narrow(0, s.first, s.tokens));
      continue;
    }
    in_registers.push_back(&s);
    bits += rows * cols * s.projection.planes;
  }
  // One block of whole tiles per thread and segment, listed thread-share by thread-share, so that each thread
  // gets its share of every segment whatever their widths and tokens, and reads each plane's tiles of a group in
  // one run of block rows / 16 tiles (blocks of 64 rows, 1 KB runs 32 KB apart on OLMoE's experts, made a
  // layer call 1.3x slower than one projection call per segment).
  const int64_t shares = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block_rows = (rows + shares * kPlaneTileRows - 1) / (shares * kPlaneTileRows) * kPlaneTileRows;
  for (int64_t r0 = 0; r0 < rows; r0 += block_rows)
    for (const Segment* s : in_registers) blocks.push_back({s, r0, std::min(rows, r0 + block_rows)});
  if (blocks.empty()) return;
  // A segment's lookup tables once per segment, not once per block of its rows.
  std::vector<std::vector<Lookup>> lookups(segments.size());
  std::vector<const Lookup*> made(segments.size());
  for (size_t i = 0; i < segments.size(); ++i)
    made[i] = make_lookup(segments[i].projection, xp + segments[i].first * cols, segments[i].tokens, lookups[i]);
  const int64_t n = int64_t(blocks.size());
  const int64_t grain = bits <= kStageBitsPerThread ? n : std::max<int64_t>(1, n * kStageBitsPerThread / bits);
  at::parallel_for(0, n, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const Segment& s = *blocks[b].segment;
      register_linear(s.projection, xp + s.first * cols, s.tokens, op + s.first * rows, blocks[b].r0, blocks[b].r1,
                      made[blocks[b].segment - segments.data()]);
    }
  });
}

// Integer tensor of any integer dtype, read as int64 (router ids come as int32 or int64, widths as int8).
std::vector<int64_t> integers(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  const int64_t n = c.numel();
  std::vector<int64_t> v(n);
  AT_DISPATCH_INTEGRAL_TYPES(c.scalar_type(), "integers", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) v[i] = int64_t(p[i]);
  });
  return v;
}

// Rows `rows` of x (any float dtype) as float32, in that order: exactly x.to(float32)[rows].
void gather_rows(const at::Tensor& x, const std::vector<int64_t>& rows, float* dst) {
  const at::Tensor c = x.contiguous();
  const int64_t hidden = c.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "gather_rows", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    for (size_t i = 0; i < rows.size(); ++i, dst += hidden) {
      const scalar_t* row = p + rows[i] * hidden;
      for (int64_t k = 0; k < hidden; ++k) dst[k] = static_cast<float>(row[k]);
    }
  });
}

// A layer's resident projections (kernels/cpu_bitplanes.py, PlanePairs).
struct Layer {
  std::vector<at::Tensor> gate_up_chunks, gate_up_scales, down_chunks, down_scales;
  int64_t min_bits, group_size, hidden, inter;

  Layer(std::vector<at::Tensor> gate_up_chunks_, std::vector<at::Tensor> gate_up_scales_,
        std::vector<at::Tensor> down_chunks_, std::vector<at::Tensor> down_scales_, int64_t min_bits_,
        int64_t group_size_)
      : gate_up_chunks(std::move(gate_up_chunks_)), gate_up_scales(std::move(gate_up_scales_)),
        down_chunks(std::move(down_chunks_)), down_scales(std::move(down_scales_)), min_bits(min_bits_),
        group_size(group_size_) {
    check_projection(gate_up_chunks, gate_up_scales, "gate_up");
    check_projection(down_chunks, down_scales, "down");
    hidden = down_scales[0].size(1);
    inter = gate_up_scales[0].size(1) / 2;
  }

  int64_t experts() const { return gate_up_scales[0].size(0); }

  Projection gate_up(int64_t expert, int64_t width) const {
    return view_projection(gate_up_chunks, gate_up_scales, min_bits, expert, width, hidden, group_size);
  }
  Projection down(int64_t expert, int64_t width) const {
    return view_projection(down_chunks, down_scales, min_bits, expert, width, inter, group_size);
  }

  // ys[first:first + tokens] = down(silu(gate(xs)) * up(xs)) over the same rows of xs for each segment (gate_up and
  // down views of one (expert, width) each, in that order), xs [pairs, hidden] and ys contiguous float32.
  void segments_mlp(const at::Tensor& xs, const std::vector<Segment>& gate_up_segments,
                    const std::vector<Segment>& down_segments, const at::Tensor& ys) const {
    at::Tensor h = at::empty({xs.size(0), 2 * inter}, xs.options());
    segments_linear(gate_up_segments, xs, h);
    segments_linear(down_segments, activation(h), ys);
  }

  // The routed sum of one layer call, as LayerExperts.forward computes it with torch ops:
  // out[t] = sum_k topk_weights[t, k] * mlp_{local_ids[t, k] at widths[t, k]}(x[t]), skipping ids < 0.
  // Grouping, gathering and the weighted scatter stay here (on small models the torch ops for them
  // cost more than the experts), and every segment's projection runs in one parallel region per
  // stage. Each pair's result is what a call of its segment alone gives, bit for bit.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& local_ids,
                     const at::Tensor& widths) const {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == hidden, "x must be [tokens, ", hidden, "]");
    TORCH_CHECK(local_ids.dim() == 2 && local_ids.size(0) == x.size(0) && local_ids.sizes() == widths.sizes() &&
                    local_ids.sizes() == topk_weights.sizes(),
                "local_ids, widths and topk_weights must be [tokens, top_k]");
    const int64_t tokens = x.size(0), top_k = local_ids.size(1);
    const std::vector<int64_t> id = integers(local_ids), bit = integers(widths);
    const at::Tensor weights = topk_weights.to(at::kFloat).contiguous();
    const auto key = [&](int64_t pair) { return id[pair] * 16 + bit[pair]; };
    std::vector<int64_t> pairs;
    for (int64_t pair = 0; pair < tokens * top_k; ++pair)
      if (id[pair] >= 0) pairs.push_back(pair);
    std::stable_sort(pairs.begin(), pairs.end(), [&](int64_t a, int64_t b) { return key(a) < key(b); });

    const int64_t n = int64_t(pairs.size());
    const auto f32 = x.options().dtype(at::kFloat);
    std::vector<int64_t> pair_tokens(n);
    for (int64_t i = 0; i < n; ++i) pair_tokens[i] = pairs[i] / top_k;
    at::Tensor xs = at::empty({n, hidden}, f32), h = at::empty({n, 2 * inter}, f32);
    gather_rows(x, pair_tokens, xs.data_ptr<float>());
    std::vector<Segment> gate_up_segments, down_segments;
    for (int64_t first = 0, end; first < n; first = end) {
      for (end = first + 1; end < n && key(pairs[end]) == key(pairs[first]);) ++end;
      const int64_t expert = id[pairs[first]], width = bit[pairs[first]];
      TORCH_CHECK(expert < experts(), "expert ", expert, " is not resident");
      gate_up_segments.push_back({gate_up(expert, width), first, end - first});
      down_segments.push_back({down(expert, width), first, end - first});
    }
    at::Tensor ys = at::empty({n, hidden}, f32);
    segments_mlp(xs, gate_up_segments, down_segments, ys);

    at::Tensor out = at::zeros({tokens, hidden}, f32);
    float* o = out.data_ptr<float>();
    const float *w = weights.data_ptr<float>(), *y = ys.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      float* row = o + pair_tokens[i] * hidden;
      const float weight = w[pairs[i]];
      for (int64_t c = 0; c < hidden; ++c) row[c] += weight * y[i * hidden + c];
    }
    return out.to(x.scalar_type());
  }

  // silu(h[:, :inter]) * h[:, inter:], as a call of each segment alone computes it: torch's elementwise loops
  // take a row of `inter` elements at a time whatever the rows around it (vectors, then the scalar tail), as long
  // as no thread split falls inside a row; so the rows are split across threads here, each share one serial call.
  // (One call per segment, before, made OLMoE's layer calls of 8-16 tokens up to 0.8 ms slower: kernels.md.)
  at::Tensor activation(const at::Tensor& h) const {
    const int64_t rows = h.size(0);
    at::Tensor act = at::empty({rows, inter}, h.options());
    // Below this many rows a share is under torch's grain, so even an unsplit call stays serial.
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / inter);
    // at::parallel_for's threads do not inherit the caller's thread-local state: without it, under vLLM's
    // inference mode, writing into `act` (an inference tensor) from another thread is refused.
    const at::ThreadLocalState caller;
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      const at::ThreadLocalStateGuard same_state(caller);
      const at::Tensor hs = h.narrow(0, r0, r1 - r0);
      at::Tensor share = act.narrow(0, r0, r1 - r0);
      at::mul_out(share, at::silu(hs.narrow(1, 0, inter)), hs.narrow(1, inter, inter));
    });
    return act;
  }
};

// Expert MLP of every segment: out[first:end] = down(silu(gate(x)) * up(x)) over x[first:end].
// segments: int64 [n, 4] rows of (expert, width, first pair, end pair).
void moe_segments(const at::Tensor& x, const at::Tensor& segments, const std::vector<at::Tensor>& gate_up_chunks,
                  const std::vector<at::Tensor>& gate_up_scales, const std::vector<at::Tensor>& down_chunks,
                  const std::vector<at::Tensor>& down_scales, int64_t min_bits, int64_t group_size, at::Tensor out) {
  const Layer layer(gate_up_chunks, gate_up_scales, down_chunks, down_scales, min_bits, group_size);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(1) == layer.hidden,
              "x must be contiguous float32 [pairs, ", layer.hidden, "]");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.sizes() == x.sizes(),
              "out must be contiguous float32 shaped like x");
  TORCH_CHECK(segments.scalar_type() == at::kLong && segments.dim() == 2 && segments.size(1) == 4,
              "segments must be int64 [n, 4]");
  const auto table = segments.contiguous();
  const int64_t* s = table.data_ptr<int64_t>();
  std::vector<Segment> gate_up_segments, down_segments;
  for (int64_t i = 0; i < table.size(0); ++i) {
    const int64_t expert = s[4 * i], width = s[4 * i + 1], first = s[4 * i + 2], end = s[4 * i + 3];
    TORCH_CHECK(0 <= first && first <= end && end <= x.size(0), "segment ", i, " is out of range");
    TORCH_CHECK(0 <= expert && expert < layer.experts(), "expert ", expert, " is not resident");
    if (first == end) continue;
    gate_up_segments.push_back({layer.gate_up(expert, width), first, end - first});
    down_segments.push_back({layer.down(expert, width), first, end - first});
  }
  layer.segments_mlp(x, gate_up_segments, down_segments, out);
}

at::Tensor moe_forward(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& local_ids,
                       const at::Tensor& widths, const std::vector<at::Tensor>& gate_up_chunks,
                       const std::vector<at::Tensor>& gate_up_scales, const std::vector<at::Tensor>& down_chunks,
                       const std::vector<at::Tensor>& down_scales, int64_t min_bits, int64_t group_size) {
  return Layer(gate_up_chunks, gate_up_scales, down_chunks, down_scales, min_bits, group_size)
      .forward(x, topk_weights, local_ids, widths);
}

// ---------------------------------------------------------------- resident layout

// first, second: uint8 [..., plane bytes] (bit c of a row = column c); pairs: uint8 [..., pair bytes]
// with column c's bits at 2c (first) and 2c + 1 (second).
void check_pairing(const at::Tensor& first, const at::Tensor& second, const at::Tensor& pairs) {
  for (const auto* t : {&first, &second, &pairs})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == at::kByte,
                "bit planes must be contiguous uint8 CPU tensors");
  TORCH_CHECK(first.sizes() == second.sizes() && pairs.numel() / pairs.size(-1) == first.numel() / first.size(-1) &&
                  (pairs.size(-1) + 1) / 2 == first.size(-1),
              "pair rows must hold two planes' rows");
}

// Four plane bytes (32 columns) of two planes at a time: their bits interleaved by pdep.
constexpr uint64_t kEven = 0x5555555555555555ull, kOdd = 0xAAAAAAAAAAAAAAAAull;

void pair_planes(const at::Tensor& first, const at::Tensor& second, at::Tensor pairs) {
  check_pairing(first, second, pairs);
  const int64_t rows = first.numel() / first.size(-1), plane_bytes = first.size(-1), pair_bytes = pairs.size(-1);
  const uint8_t *a = first.data_ptr<uint8_t>(), *b = second.data_ptr<uint8_t>();
  uint8_t* out = pairs.data_ptr<uint8_t>();
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t *ar = a + r * plane_bytes, *br = b + r * plane_bytes;
      uint8_t* o = out + r * pair_bytes;
      for (int64_t k = 0; k < plane_bytes; k += 4) {
        const int64_t n = std::min<int64_t>(4, plane_bytes - k);  // plane bytes in this step
        uint32_t wa = 0, wb = 0;
        std::memcpy(&wa, ar + k, n);
        std::memcpy(&wb, br + k, n);
        const uint64_t both = _pdep_u64(wa, kEven) | _pdep_u64(wb, kOdd);
        std::memcpy(o + 2 * k, &both, std::min<int64_t>(2 * n, pair_bytes - 2 * k));  // the rest is padding
      }
    }
  });
}

void unpair_planes(const at::Tensor& pairs, at::Tensor first, at::Tensor second) {
  check_pairing(first, second, pairs);
  const int64_t rows = first.numel() / first.size(-1), plane_bytes = first.size(-1), pair_bytes = pairs.size(-1);
  const uint8_t* in = pairs.data_ptr<uint8_t>();
  uint8_t *a = first.data_ptr<uint8_t>(), *b = second.data_ptr<uint8_t>();
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* i = in + r * pair_bytes;
      for (int64_t k = 0; k < plane_bytes; k += 4) {
        const int64_t n = std::min<int64_t>(4, plane_bytes - k);
        uint64_t both = 0;
        std::memcpy(&both, i + 2 * k, std::min<int64_t>(2 * n, pair_bytes - 2 * k));
        const uint32_t wa = uint32_t(_pext_u64(both, kEven)), wb = uint32_t(_pext_u64(both, kOdd));
        std::memcpy(a + r * plane_bytes + k, &wa, n);
        std::memcpy(b + r * plane_bytes + k, &wb, n);
      }
    }
  });
}

#if defined(__AVX512F__) || defined(D2MOE_SIMDE_AVX512)
// rows[i] = row i of a 16 x 16 block of 32-bit words -> columns[c] = column c: 4 x 4 blocks within each 128-bit
// lane (unpacks), then the lanes across registers (shuffle_i32x4).
inline void transpose_words_16x16(const VecI rows[16], VecI columns[16]) {
  VecI pairs[16], quads[16];
  D2MOE_UNROLL
  for (int i = 0; i < 8; ++i) {
    pairs[2 * i] = D2MOE_MM512(unpacklo_epi32)(rows[2 * i], rows[2 * i + 1]);
    pairs[2 * i + 1] = D2MOE_MM512(unpackhi_epi32)(rows[2 * i], rows[2 * i + 1]);
  }
  D2MOE_UNROLL
  for (int i = 0; i < 4; ++i) {  // quads[4i + j], lane k: column 4k + j of rows 4i .. 4i + 3
    quads[4 * i] = D2MOE_MM512(unpacklo_epi64)(pairs[4 * i], pairs[4 * i + 2]);
    quads[4 * i + 1] = D2MOE_MM512(unpackhi_epi64)(pairs[4 * i], pairs[4 * i + 2]);
    quads[4 * i + 2] = D2MOE_MM512(unpacklo_epi64)(pairs[4 * i + 1], pairs[4 * i + 3]);
    quads[4 * i + 3] = D2MOE_MM512(unpackhi_epi64)(pairs[4 * i + 1], pairs[4 * i + 3]);
  }
  D2MOE_UNROLL
  for (int j = 0; j < 4; ++j) {
    const VecI low = D2MOE_MM512(shuffle_i32x4)(quads[j], quads[4 + j], 0x44);
    const VecI high = D2MOE_MM512(shuffle_i32x4)(quads[j], quads[4 + j], 0xEE);
    const VecI low2 = D2MOE_MM512(shuffle_i32x4)(quads[8 + j], quads[12 + j], 0x44);
    const VecI high2 = D2MOE_MM512(shuffle_i32x4)(quads[8 + j], quads[12 + j], 0xEE);
    columns[j] = D2MOE_MM512(shuffle_i32x4)(low, low2, 0x88);
    columns[4 + j] = D2MOE_MM512(shuffle_i32x4)(low, low2, 0xDD);
    columns[8 + j] = D2MOE_MM512(shuffle_i32x4)(high, high2, 0x88);
    columns[12 + j] = D2MOE_MM512(shuffle_i32x4)(high, high2, 0xDD);
  }
}
#endif

// plane: uint8 [rows, row bytes] (bit c of a row = column c); out: uint8 [ceil(rows / 16) * 16, row bytes], the
// plane in tiles (kernels/cpu_bitplanes.py, to_tiles): per group, per 16 rows (zero rows past the last), per
// 32-column word of the group, the 16 rows' words side by side, so tile t's word column c goes to the 64 bytes
// of (group c / words, tile t, word c % words). Serial: offload I/O threads call it for every expert they bring,
// beside the compute thread's OpenMP team. With AVX-512, 16 word columns of a tile at a time through a 16 x 16
// transpose in registers: a word at a time took 1.1-1.2x as long on planes from memory, 1.4-1.7x from cache, and
// was 12 % of a streamed engine's CPU at 8 requests (benchmarks/results/streamed_pipeline.md).
void tile_plane(const at::Tensor& plane, int64_t group_size, at::Tensor out) {
  for (const at::Tensor* t : {&plane, static_cast<const at::Tensor*>(&out)})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == at::kByte && t->dim() == 2,
                "bit planes must be contiguous 2-d uint8 CPU tensors");
  const int64_t rows = plane.size(0), row_bytes = plane.size(1);
  TORCH_CHECK(group_size % 32 == 0 && row_bytes * 8 % group_size == 0, "groups of ", group_size,
              " columns are not whole 32-column words of a ", row_bytes, "-byte row");
  const int64_t tiles = (rows + 15) / 16, words = group_size / 32, row_words = row_bytes / 4;
  TORCH_CHECK(out.size(0) == tiles * 16 && out.size(1) == row_bytes, "out must be [", tiles * 16, ", ", row_bytes, "]");
  const uint8_t* src = plane.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  auto tile_word = [&](int64_t t, int64_t c) {
    return dst + ((c / words * tiles + t) * words + c % words) * kPlaneTileWordBytes;
  };
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t valid = std::min<int64_t>(16, rows - t * 16);
    const uint8_t* first = src + t * 16 * row_bytes;
    int64_t c = 0;
#if defined(__AVX512F__) || defined(D2MOE_SIMDE_AVX512)
    for (; c + 16 <= row_words; c += 16) {
      VecI rows_in[16], columns[16];
      D2MOE_UNROLL
      for (int64_t i = 0; i < 16; ++i)
        rows_in[i] = i < valid ? D2MOE_MM512(loadu_si512)(first + i * row_bytes + c * 4) : D2MOE_MM512(setzero_si512)();
      transpose_words_16x16(rows_in, columns);
      D2MOE_UNROLL
      for (int64_t k = 0; k < 16; ++k) D2MOE_MM512(storeu_si512)(tile_word(t, c + k), columns[k]);
    }
#endif
    for (; c < row_words; ++c) {
      uint8_t* word = tile_word(t, c);
      for (int64_t i = 0; i < 16; ++i, word += 4) {
        if (i < valid)
          std::memcpy(word, first + i * row_bytes + c * 4, 4);
        else
          std::memset(word, 0, 4);
      }
    }
  }
}

}  // namespace
}  // namespace d2moe_cpu

// D2MOE_LIBRARY: the op namespace of this build (one per instruction set, kernels/cpu_bitplanes.py);
// expanded before TORCH_LIBRARY pastes it into its names.
#define D2MOE_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
D2MOE_TORCH_LIBRARY(D2MOE_LIBRARY, m) {
  m.def(
      "moe_segments(Tensor x, Tensor segments, Tensor[] gate_up_chunks, Tensor[] gate_up_scales, "
      "Tensor[] down_chunks, Tensor[] down_scales, int min_bits, int group_size, Tensor(a!) out) -> ()",
      &d2moe_cpu::moe_segments);
  m.def(
      "moe_forward(Tensor x, Tensor topk_weights, Tensor local_ids, Tensor widths, Tensor[] gate_up_chunks, "
      "Tensor[] gate_up_scales, Tensor[] down_chunks, Tensor[] down_scales, int min_bits, int group_size) -> Tensor",
      &d2moe_cpu::moe_forward);
  m.def(
      "linear(Tensor x, Tensor[] chunks, Tensor[] scales, int min_bits, int expert, int width, int group_size, "
      "Tensor(a!) out) -> ()",
      &d2moe_cpu::projection_linear);
  m.def("lookup_plan(int cols, int group_size, int width) -> (int, int)", &d2moe_cpu::lookup_plan);
  m.def("pair_planes(Tensor first, Tensor second, Tensor(a!) pairs) -> ()", &d2moe_cpu::pair_planes);
  m.def("unpair_planes(Tensor pairs, Tensor(a!) first, Tensor(a!) second) -> ()", &d2moe_cpu::unpair_planes);
  m.def("tile_plane(Tensor plane, int group_size, Tensor(a!) out) -> ()", &d2moe_cpu::tile_plane);
}

// The same layer forward bound to one layer's tensors once (kernels/cpu_bitplanes.py, bind): a call
// then converts only its four tensors, without the dispatcher parsing the layer's lists every time.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<d2moe_cpu::Layer>(m, "Layer", pybind11::module_local())
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, int64_t, int64_t>())
      .def("forward", &d2moe_cpu::Layer::forward);
}
