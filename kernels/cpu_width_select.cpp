// The width decision of one MoE layer call in one C++ call: router logits,
// log-softmax, target shift, then each pair's favourite width or the
// capacity-constrained greedy assignment, and the counts per width. Built with
// -ffp-contract=off so that every float operation after the dot products is
// rounded as torch rounds it; see cpu_width_select.py.

#include <torch/extension.h>

#include <ATen/EmptyTensor.h>
#include <ATen/native/cpu/LogSoftmaxKernelImpl.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kBins = 9;  // counts by bit value 0..8, as WidthStats keeps them

float hsum(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(half, _mm_shuffle_ps(half, half, 1)));
}

// out[r] = x . w[r] for M rows of w (stride n), x loaded once for all of them:
// the loads, not the FMAs, bound a dot product.
template <int M>
void dots_of(const float* x, const float* w, int64_t n, float* out) {
  __m256 acc[M][2];
  for (int r = 0; r < M; ++r) {
    acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  }
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
    for (int r = 0; r < M; ++r) {
      acc[r][0] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w + r * n + i), acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w + r * n + i + 8), acc[r][1]);
    }
  }
  if (i + 8 <= n) {
    const __m256 x0 = _mm256_loadu_ps(x + i);
    for (int r = 0; r < M; ++r) {
      acc[r][0] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w + r * n + i), acc[r][0]);
    }
    i += 8;
  }
  for (int r = 0; r < M; ++r) {
    float sum = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
    for (int64_t j = i; j < n; ++j) {
      sum += x[j] * w[r * n + j];
    }
    out[r] = sum;
  }
}

// out[r] = x . w[r] for r < rows.
void dots(const float* x, const float* w, int64_t rows, int64_t n, float* out) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    dots_of<4>(x, w + r * n, n, out + r);
  }
  switch (rows - r) {
    case 3: dots_of<3>(x, w + r * n, n, out + r); break;
    case 2: dots_of<2>(x, w + r * n, n, out + r); break;
    case 1: dots_of<1>(x, w + r * n, n, out + r); break;
  }
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
  std::vector<float> projected(widths);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* xt = as_float<X>(x, t, buffer);
    if (!per_expert) {
      dots(xt, w, widths, hidden, projected.data());
    }
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t p = t * top_k + j;
      int64_t e = 0;
      if (per_expert) {
        e = long_ids ? expert_of<int64_t>(ids, p) : expert_of<int32_t>(ids, p);
        TORCH_CHECK(0 <= e && e < rows, "expert id ", e, " out of range for a router of ", rows, " experts");
        dots(xt, w + e * widths * hidden, widths, hidden, projected.data());
      }
      for (int64_t k = 0; k < widths; ++k) {
        logits[p * widths + k] = (projected[k] + b[e * widths + k]) + g[e * widths + k] * pair_weights[p];
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

// One layer's decision: the router and the policy, checked once; called per layer call.
class Decision {
 public:
  Decision(at::Tensor weight, at::Tensor bias, at::Tensor gain, bool per_expert, std::vector<int64_t> bits,
           std::optional<std::vector<double>> capacities, double shift)
      : weight_(std::move(weight)), bias_(std::move(bias)), gain_(std::move(gain)), per_expert_(per_expert),
        bits_(std::move(bits)), capacities_(std::move(capacities)), shift_(shift) {
    TORCH_CHECK(weight_.device().is_cpu() && weight_.scalar_type() == at::kFloat && weight_.dim() == 3 &&
                    weight_.is_contiguous(),
                "weight must be a contiguous CPU float32 [rows, K, hidden] tensor");
    const int64_t widths = weight_.size(1);
    for (const at::Tensor* t : {&bias_, &gain_}) {
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                      t->numel() == weight_.size(0) * widths,
                  "bias and gain must be contiguous CPU float32 [rows, K] tensors");
    }
    TORCH_CHECK(static_cast<int64_t>(bits_.size()) == widths, bits_.size(), " widths for a router of ", widths);
    TORCH_CHECK(!capacities_ || static_cast<int64_t>(capacities_->size()) == widths, "one capacity per width");
    for (int64_t b : bits_) {
      TORCH_CHECK(0 <= b && b < kBins, "width ", b, " is not in [0, 8]");
    }
  }

  // (int8 widths [tokens, top_k], pairs per bit value 0..8, capacity excess or None): the excess is
  // WidthStats' max_k(count_k - c_k * pairs), in the same double arithmetic.
  std::tuple<at::Tensor, std::vector<int64_t>, std::optional<double>> operator()(
      const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids) const {
    TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) == weight_.size(2),
                "x must be a CPU [tokens, ", weight_.size(2), "] tensor");
    TORCH_CHECK(topk_ids.device().is_cpu() && topk_ids.dim() == 2 && topk_ids.size(0) == x.size(0) &&
                    topk_weights.sizes() == topk_ids.sizes(),
                "topk_weights and topk_ids must both be CPU [tokens, top_k] tensors");
    TORCH_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
                "topk_ids must be int32 or int64");
    const int64_t widths = weight_.size(1);
    const at::Tensor xc = x.contiguous(), ids = topk_ids.contiguous();
    // .float() in torch: exact for bf16 / fp16, round-to-nearest from float64. (No
    // dispatcher call for float32, the usual case: one costs microseconds with cold caches.)
    const at::Tensor pair_weights = topk_weights.scalar_type() == at::kFloat
                                        ? topk_weights.contiguous()
                                        : topk_weights.to(at::kFloat).contiguous();
    const int64_t pairs = ids.numel();

    std::vector<float> scores(pairs * widths);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "width_decision", [&] {
      router_logits<scalar_t>(
          xc, weight_, bias_, gain_, pair_weights.data_ptr<float>(), ids, per_expert_, scores.data());
    });
    // torch.log_softmax's own CPU code (a shipped ATen header), so scores match it bit for bit.
    at::native::serial_vec_log_softmax_lastdim_range<float>(
        scores.data(), scores.data(), widths,
        at::native::vec_log_softmax_lastdim_chunk_size<float>(at::internal::GRAIN_SIZE, pairs, widths), 0, pairs);
    if (shift_ != 0.0) {  // assign.shift_scores: float32 (shift * bits), then the subtraction
      for (int64_t k = 0; k < widths; ++k) {
        const float lowered = static_cast<float>(shift_) * static_cast<float>(bits_[k]);
        for (int64_t p = 0; p < pairs; ++p) {
          scores[p * widths + k] = scores[p * widths + k] - lowered;
        }
      }
    }

    std::vector<int64_t> choice(pairs);
    if (capacities_) {
      assign_with_capacities(scores.data(), pairs, widths, *capacities_, choice.data());
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

    // empty_cpu: the allocation without a trip through the dispatcher.
    at::Tensor out = at::detail::empty_cpu(ids.sizes(), at::kChar);
    int8_t* chosen = out.data_ptr<int8_t>();
    std::vector<int64_t> counts(kBins, 0);
    for (int64_t p = 0; p < pairs; ++p) {
      TORCH_CHECK(choice[p] >= 0, "capacities sum below 1: pair ", p, " got no width");
      const int64_t b = bits_[choice[p]];
      chosen[p] = static_cast<int8_t>(b);
      ++counts[b];
    }
    std::optional<double> excess;
    if (capacities_) {
      excess = -std::numeric_limits<double>::infinity();
      for (int64_t k = 0; k < widths; ++k) {
        excess = std::max(*excess, static_cast<double>(counts[bits_[k]]) - (*capacities_)[k] * pairs);
      }
    }
    return {out, counts, excess};
  }

 private:
  at::Tensor weight_, bias_, gain_;
  bool per_expert_;
  std::vector<int64_t> bits_;
  std::optional<std::vector<double>> capacities_;
  double shift_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Decision>(m, "Decision", "one layer's width decision (see cpu_width_select.py)")
      .def(pybind11::init<at::Tensor, at::Tensor, at::Tensor, bool, std::vector<int64_t>,
                          std::optional<std::vector<double>>, double>())
      .def("__call__", &Decision::operator());
}
