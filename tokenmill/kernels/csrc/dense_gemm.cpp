// y = x W^T (+ b) for float32 activations and dense weights in float32, float16 or bfloat16.
// Steps of a few rows (decode), where the library GEMM leaves bandwidth unused: each thread
// streams its share of W's rows once, widening 16-bit weights as they load (F16C; bfloat16 by a
// shift), and multiplies every row of x against them with float32 FMAs (AVX2). Larger steps on
// 16-bit weights: blocks of rows widened in L2 and multiplied by the library's GEMM.
#include "dense_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <c10/core/InferenceMode.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kTokens = 3;  // tokens per pass over a row: kTokens x kSplit accumulators
constexpr int kSplit = 4;
// The most rows of x the streaming path takes on 16-bit weights; more take the widened path.
constexpr int64_t kStreamMaxRows = 8;

// Eight consecutive weights as float32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const at::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// out[t] (t < T) = x[t] . w over K for one weight row w and tokens x[0..T): the row is read
// once, front to back (one stream per thread, which the prefetchers follow best), each sum in
// kSplit accumulators (consecutive 8-wide steps) so that T x kSplit FMA chains hide the latency.
template <typename W, int T>
void row_dot(const float* x, int64_t ldx, const W* w, int64_t K, float* out, int64_t ldo,
             const float* bias) {
  __m256 acc[T][kSplit];
  for (int t = 0; t < T; ++t)
    for (int u = 0; u < kSplit; ++u) acc[t][u] = _mm256_setzero_ps();
  constexpr int64_t step = 8 * kSplit;
  const int64_t Ks = K / step * step, K8 = K / 8 * 8;
  for (int64_t k = 0; k < Ks; k += step) {
    for (int u = 0; u < kSplit; ++u) {
      const __m256 wv = load8(w + k + 8 * u);
      for (int t = 0; t < T; ++t)
        acc[t][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * ldx + k + 8 * u), acc[t][u]);
    }
  }
  for (int64_t k = Ks; k < K8; k += 8) {
    const __m256 wv = load8(w + k);
    for (int t = 0; t < T; ++t)
      acc[t][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * ldx + k), acc[t][0]);
  }
  for (int t = 0; t < T; ++t) {
    __m256 sum = acc[t][0];
    for (int u = 1; u < kSplit; ++u) sum = _mm256_add_ps(sum, acc[t][u]);
    float s = hsum(sum);
    for (int64_t k = K8; k < K; ++k) s += static_cast<float>(w[k]) * x[t * ldx + k];
    out[t * ldo] = bias ? s + *bias : s;
  }
}

template <typename W>
void gemm(const float* x, int64_t M, const W* w, int64_t N, int64_t K, const float* bias,
          float* out) {
  // a task is a run of rows, so each thread streams one contiguous stretch of W
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const W* wr = w + r * K;
      const float* b = bias ? bias + r : nullptr;
      int64_t t = 0;
      for (; t + kTokens <= M; t += kTokens)
        row_dot<W, kTokens>(x + t * K, K, wr, K, out + t * N + r, N, b);
      if (M - t == 2) row_dot<W, 2>(x + t * K, K, wr, K, out + t * N + r, N, b);
      if (M - t == 1) row_dot<W, 1>(x + t * K, K, wr, K, out + t * N + r, N, b);
    }
  });
}

// Eight 16-bit weights widened to float32 and stored.
template <typename W>
inline void widen_row(const W* w, int64_t K, float* out) {
  const int64_t K8 = K / 8 * 8;
  for (int64_t k = 0; k < K8; k += 8) _mm256_storeu_ps(out + k, load8(w + k));
  for (int64_t k = K8; k < K; ++k) out[k] = static_cast<float>(w[k]);
}

// Steps of more rows on 16-bit weights: blocks of W's rows widened to float32 and multiplied by
// the library's GEMM straight into their columns of out, so W's 16-bit bytes are all that comes
// from memory, where a float32 copy of the whole of W per call read and wrote three times as
// many (and faulted its pages in on every call: 2.1-7x slower from 9 to 64 rows on the 1B
// shape's linears, Sapphire Rapids, 2 threads).
//  * Up to kSharedMaxRows rows (batched decode): each thread widens its own blocks into an
//    L2-sized buffer (512 KiB, at least 64 rows) and multiplies them on one thread.
//  * More (prefill): 8 MiB blocks in turn, widened by every thread, then one GEMM on all of
//    them (the per-thread blocks' narrow products ran 0.55-0.8x of it at 128-512 rows).
constexpr int64_t kSharedMaxRows = 64;

template <typename W>
void gemm_widened(const at::Tensor& x, const W* w, int64_t N, int64_t K, at::Tensor& out) {
  const int64_t M = x.size(0);
  if (M <= kSharedMaxRows) {
    const int64_t rows = std::max<int64_t>(64, (int64_t{512} << 10) / (4 * K));
    const bool inference = c10::InferenceMode::is_enabled();  // thread-local: the caller's
    at::parallel_for(0, (N + rows - 1) / rows, 1, [&](int64_t begin, int64_t end) {
      c10::InferenceMode mode(inference);  // out may be an inference tensor
      at::Tensor buf = at::empty({rows, K}, x.options());
      float* bp = buf.data_ptr<float>();
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t r0 = blk * rows, n = std::min(rows, N - r0);
        for (int64_t r = 0; r < n; ++r) widen_row(w + (r0 + r) * K, K, bp + r * K);
        at::Tensor y = out.narrow(1, r0, n);
        at::mm_out(y, x, buf.narrow(0, 0, n).t());
      }
    });
    return;
  }
  const int64_t rows = std::min(N, std::max<int64_t>(256, (int64_t{8} << 20) / (4 * K)));
  at::Tensor buf = at::empty({rows, K}, x.options());
  float* bp = buf.data_ptr<float>();
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t n = std::min(rows, N - r0);
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) widen_row(w + (r0 + r) * K, K, bp + r * K);
    });
    at::Tensor y = out.narrow(1, r0, n);
    at::mm_out(y, x, buf.narrow(0, 0, n).t());
  }
}

}  // namespace

at::Tensor dense_gemm(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat,
              "dense_gemm: x must be [M, K] float32");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), "dense_gemm: w must be [N, K]");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  at::Tensor out = at::empty({M, N}, x.options());
  const float* b = nullptr;
  at::Tensor bf;
  if (bias.has_value()) {
    bf = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bf.numel() == N, "dense_gemm: bias must have N elements");
    b = bf.data_ptr<float>();
  }
  if (M == 0 || N == 0) return out;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (M > kStreamMaxRows && w.scalar_type() != at::kFloat) {
    if (w.scalar_type() == at::kHalf)
      gemm_widened(x, w.data_ptr<at::Half>(), N, K, out);
    else if (w.scalar_type() == at::kBFloat16)
      gemm_widened(x, w.data_ptr<at::BFloat16>(), N, K, out);
    else
      TORCH_CHECK(false, "dense_gemm: weights must be float32, float16 or bfloat16");
    if (b != nullptr) out.add_(bf);
    return out;
  }
  switch (w.scalar_type()) {
    case at::kFloat:
      gemm(xp, M, w.data_ptr<float>(), N, K, b, op);
      break;
    case at::kHalf:
      gemm(xp, M, w.data_ptr<at::Half>(), N, K, b, op);
      break;
    case at::kBFloat16:
      gemm(xp, M, w.data_ptr<at::BFloat16>(), N, K, b, op);
      break;
    default:
      TORCH_CHECK(false, "dense_gemm: weights must be float32, float16 or bfloat16");
  }
  return out;
}

DenseLinear::DenseLinear(at::Tensor weight, c10::optional<at::Tensor> bias)
    : weight_(std::move(weight)), bias_(std::move(bias)) {
  TORCH_CHECK(weight_.dim() == 2 && weight_.is_contiguous(), "DenseLinear: a contiguous [N, K]");
}

at::Tensor DenseLinear::forward(at::Tensor x) const {
  if (x.size(0) > kStreamMaxRows && weight_.scalar_type() == at::kFloat)
    return at::linear(x, weight_, bias_);
  return dense_gemm(x, weight_, bias_);
}
