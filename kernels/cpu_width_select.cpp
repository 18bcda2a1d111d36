// The width decision of one MoE layer call in one C++ call: router logits,
// log-softmax, target shift, then each pair's favourite width or the
// capacity-constrained greedy assignment, and the counts per width. Built with
// -ffp-contract=off so that every float operation after the dot products is
// rounded as torch rounds it; see cpu_width_select.py.

#include <torch/extension.h>

#include <ATen/native/cpu/LogSoftmaxKernelImpl.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kBins = 9;  // counts by bit value 0..8, as WidthStats keeps them

float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
  }
  for (; i + 8 <= n; i += 8) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  }
  __m256 acc = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  half = _mm_add_ss(half, _mm_shuffle_ps(half, half, 1));
  float sum = _mm_cvtss_f32(half);
  for (; i < n; ++i) {
    sum += a[i] * b[i];
  }
  return sum;
}

// torch's order for sort(descending=True) and argmax: NaN above everything.
inline bool before(float a, float b) {
  return a > b || (std::isnan(a) && !std::isnan(b));
}

template <typename T>
const float* as_float(const at::Tensor& x, int64_t token, std::vector<float>& buffer) {
  const int64_t hidden = x.size(1);
  const T* row = x.data_ptr<T>() + token * hidden;
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    for (int64_t h = 0; h < hidden; ++h) {
      buffer[h] = static_cast<float>(row[h]);  // as x.float(): exact from bf16 / fp16
    }
    return buffer.data();
  }
}

template <typename T>
int64_t expert_of(const at::Tensor& ids, int64_t pair) {
  return static_cast<int64_t>(ids.data_ptr<T>()[pair]);
}

// logits[p, k] = (x_t . W[e, k] + bias[e, k]) + gain[e, k] * w_p, added in torch's order.
template <typename X>
void router_logits(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const at::Tensor& gain,
    const float* pair_weights,
    const at::Tensor& ids,
    bool per_expert,
    float* logits) {
  const int64_t tokens = x.size(0), hidden = x.size(1), top_k = ids.size(1);
  const int64_t rows = weight.size(0), widths = weight.size(1);
  const float* w = weight.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  const float* g = gain.data_ptr<float>();
  const bool long_ids = ids.scalar_type() == at::kLong;
  std::vector<float> buffer(std::is_same_v<X, float> ? 0 : hidden);
  std::vector<float> shared(widths);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* xt = as_float<X>(x, t, buffer);
    if (!per_expert) {
      for (int64_t k = 0; k < widths; ++k) {
        shared[k] = dot(xt, w + k * hidden, hidden);
      }
    }
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t p = t * top_k + j;
      int64_t e = 0;
      if (per_expert) {
        e = long_ids ? expert_of<int64_t>(ids, p) : expert_of<int32_t>(ids, p);
        TORCH_CHECK(0 <= e && e < rows, "expert id ", e, " out of range for a router of ", rows, " experts");
      }
      for (int64_t k = 0; k < widths; ++k) {
        const float projected = per_expert ? dot(xt, w + (e * widths + k) * hidden, hidden) : shared[k];
        logits[p * widths + k] = (projected + b[e * widths + k]) + g[e * widths + k] * pair_weights[p];
      }
    }
  }
}

// assign.assign_with_capacities: by preference rank, then width; where a width
// overflows, its highest-scoring candidates (lower pair first on ties) win.
void assign_with_capacities(
    const float* scores, int64_t pairs, int64_t widths, const std::vector<double>& capacities, int64_t* choice) {
  std::vector<int64_t> remaining(widths);
  for (int64_t k = 0; k < widths; ++k) {
    // capacity_limits: the epsilon keeps float error from adding a slot.
    remaining[k] = static_cast<int64_t>(std::ceil(capacities[k] * static_cast<double>(pairs) - 1e-9));
  }
  std::vector<int64_t> preference(pairs * widths);
  for (int64_t p = 0; p < pairs; ++p) {
    int64_t* order = preference.data() + p * widths;
    const float* row = scores + p * widths;
    std::iota(order, order + widths, 0);
    std::stable_sort(order, order + widths, [row](int64_t a, int64_t b) { return before(row[a], row[b]); });
    choice[p] = -1;
  }
  std::vector<std::vector<int64_t>> wanting(widths);
  for (int64_t rank = 0; rank < widths; ++rank) {
    for (auto& candidates : wanting) {
      candidates.clear();
    }
    for (int64_t p = 0; p < pairs; ++p) {
      if (choice[p] < 0) {
        wanting[preference[p * widths + rank]].push_back(p);
      }
    }
    for (int64_t k = 0; k < widths; ++k) {
      auto& candidates = wanting[k];
      if (candidates.empty() || remaining[k] == 0) {
        continue;
      }
      if (static_cast<int64_t>(candidates.size()) > remaining[k]) {
        std::stable_sort(candidates.begin(), candidates.end(), [&](int64_t a, int64_t b) {
          return before(scores[a * widths + k], scores[b * widths + k]);
        });
        candidates.resize(remaining[k]);
      }
      for (int64_t p : candidates) {
        choice[p] = k;
      }
      remaining[k] -= static_cast<int64_t>(candidates.size());
    }
  }
}

std::tuple<at::Tensor, std::vector<int64_t>> select_widths(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const at::Tensor& gain,
    const at::Tensor& topk_weights,
    const at::Tensor& topk_ids,
    bool per_expert,
    const std::vector<int64_t>& bits,
    const std::optional<std::vector<double>>& capacities,
    double shift) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "x must be a CPU [tokens, hidden] tensor");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 3 && weight.is_contiguous(),
              "weight must be contiguous float32 [rows, K, hidden]");
  const int64_t tokens = x.size(0), hidden = x.size(1), widths = weight.size(1);
  TORCH_CHECK(weight.size(2) == hidden, "weight has hidden size ", weight.size(2), ", x ", hidden);
  TORCH_CHECK(bias.scalar_type() == at::kFloat && gain.scalar_type() == at::kFloat && bias.is_contiguous() &&
                  gain.is_contiguous() && bias.numel() == weight.size(0) * widths && gain.numel() == bias.numel(),
              "bias and gain must be contiguous float32 [rows, K]");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == tokens && topk_weights.sizes() == topk_ids.sizes(),
              "topk_weights and topk_ids must both be [tokens, top_k]");
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
              "topk_ids must be int32 or int64");
  TORCH_CHECK(static_cast<int64_t>(bits.size()) == widths, bits.size(), " widths for a router of ", widths);
  TORCH_CHECK(!capacities || static_cast<int64_t>(capacities->size()) == widths, "one capacity per width");
  for (int64_t b : bits) {
    TORCH_CHECK(0 <= b && b < kBins, "width ", b, " is not in [0, 8]");
  }
  const at::Tensor xc = x.contiguous(), ids = topk_ids.contiguous();
  // .float() in torch: exact for bf16 / fp16, round-to-nearest from float64.
  const at::Tensor pair_weights = topk_weights.to(at::kFloat).contiguous();
  const int64_t pairs = ids.numel();

  std::vector<float> scores(pairs * widths);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "select_widths", [&] {
    router_logits<scalar_t>(xc, weight, bias, gain, pair_weights.data_ptr<float>(), ids, per_expert, scores.data());
  });
  // torch.log_softmax's own CPU code (a shipped ATen header), so scores match it bit for bit.
  at::native::serial_vec_log_softmax_lastdim_range<float>(
      scores.data(), scores.data(), widths,
      at::native::vec_log_softmax_lastdim_chunk_size<float>(at::internal::GRAIN_SIZE, pairs, widths), 0, pairs);
  if (shift != 0.0) {  // assign.shift_scores: float32 (shift * bits), then the subtraction
    for (int64_t k = 0; k < widths; ++k) {
      const float lowered = static_cast<float>(shift) * static_cast<float>(bits[k]);
      for (int64_t p = 0; p < pairs; ++p) {
        scores[p * widths + k] = scores[p * widths + k] - lowered;
      }
    }
  }

  std::vector<int64_t> choice(pairs);
  if (capacities) {
    assign_with_capacities(scores.data(), pairs, widths, *capacities, choice.data());
  } else {
    for (int64_t p = 0; p < pairs; ++p) {  // torch.argmax: the first maximum, or the first NaN
      const float* row = scores.data() + p * widths;
      int64_t best = 0;
      for (int64_t k = 1; k < widths && !std::isnan(row[best]); ++k) {
        if (before(row[k], row[best])) {
          best = k;
        }
      }
      choice[p] = best;
    }
  }

  at::Tensor out = at::empty(ids.sizes(), at::TensorOptions().dtype(at::kChar));
  int8_t* chosen = out.data_ptr<int8_t>();
  std::vector<int64_t> counts(kBins, 0);
  for (int64_t p = 0; p < pairs; ++p) {
    TORCH_CHECK(choice[p] >= 0, "capacities sum below 1: pair ", p, " got no width");
    const int64_t b = bits[choice[p]];
    chosen[p] = static_cast<int8_t>(b);
    ++counts[b];
  }
  return {out, counts};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("select_widths", &select_widths,
        "int8 widths [tokens, top_k] and the pairs per bit value 0..8 (see cpu_width_select.py)");
}
