// y = x W^T (+ b) for dense weights in float32, float16 or bfloat16: float32 activations, or
// bfloat16 ones on bfloat16 weights.
// Steps of a few rows (decode), where the library GEMM leaves bandwidth unused: each thread
// streams its share of W's rows once, several side by side, widening 16-bit weights as they load
// (F16C; bfloat16 by a shift), and multiplies every row of x against them with float32 FMAs
// (16 lanes on AVX-512 builds, 8 on AVX2 ones). Larger steps on 16-bit weights beside float32
// compute: blocks of rows widened in L2 and multiplied by the library's GEMM. bfloat16
// activations (bfloat16 weights) on W as it lies: AVX512-BF16 dot products (gemm_dot_bf16) up
// to 4 rows beside the AMX tiles (gemm_tiles) for more, or up to 64 on CPUs with those dot
// products but no tiles.
//
// One translation unit, in parts: dense_stream.h (the float32 streaming, the passes and row
// groups every kernel shares, the widened blocks), dense_tiles.h (AMX) and dense_dot_bf16.h
// (AVX512-BF16); this file chooses among them and holds the entry points.
#include "dense_gemm.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>

#include <string>

#include "dense_dot_bf16.h"
#include "dense_tiles.h"

namespace {

// Whether this build and CPU run gemm_dot_bf16.
bool dot_supported() {
#ifdef TM_DENSE_DOT
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

// How dense_gemm runs bfloat16 steps of a few rows here (dense_bf16_path).
enum class Bf16Path { kNone, kDot, kTiles };
Bf16Path bf16_path() {
#ifdef TM_DENSE_AMX
  if (amx::permitted()) return Bf16Path::kTiles;
#endif
  return dot_supported() ? Bf16Path::kDot : Bf16Path::kNone;
}

// dense_gemm for bfloat16 x and W: float32 sums, rounded once to bfloat16 with the bias added.
at::Tensor gemm_bf16(const at::Tensor& x, const at::Tensor& w,
                     const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "dense_gemm: bfloat16 x takes bfloat16 weights");
  const int64_t M = x.size(0);
  const Bf16Path path = bf16_path();
  // the dot products up to kDotMaxRows rows, or where the tiles take the larger steps, up to
  // kStreamMaxRowsBf16
  const int64_t dot_rows = !dot_supported()         ? 0
                           : path == Bf16Path::kDot ? kDotMaxRows
                                                    : kStreamMaxRowsBf16;
  if (M > dot_rows && M <= kStreamMaxRowsBf16)
    return dense_gemm(x.to(at::kFloat), w, bias).to(at::kBFloat16);
#ifdef TM_DENSE_DOT  // every AVX-512 build, the amx one included
  const int64_t N = w.size(0), K = w.size(1);
  const bool dot = M <= dot_rows,
             tiles = path == Bf16Path::kTiles && M <= kTilesMaxRows && N % 16 == 0 && K % 32 == 0;
  if (dot || tiles) {
    at::Tensor bf;  // the bias in float32
    if (bias.has_value()) {
      bf = bias->to(at::kFloat).contiguous();
      TORCH_CHECK(bf.numel() == N, "dense_gemm: bias must have N elements");
    }
    const float* b = bf.defined() ? bf.data_ptr<float>() : nullptr;
    const at::Tensor xc = x.contiguous(), wc = w.contiguous();
    const at::BFloat16 *xp = xc.data_ptr<at::BFloat16>(), *wp = wc.data_ptr<at::BFloat16>();
    at::Tensor out = at::empty({M, N}, x.options());
    at::BFloat16* op = out.data_ptr<at::BFloat16>();
    if (dot && M > 0 && N > 0) gemm_dot_bf16(xp, M, wp, N, K, b, op);
#ifdef TM_DENSE_AMX
    if (!dot) gemm_tiles(wp, N, K, pairs_by_group(xp, M, K).data(), M, b, op);
#endif
    return out;
  }
#endif
  // More rows (prefill), and shapes the tiles do not take: the library's GEMM on the unpacked
  // weight, 0.8-1.0x of oneDNN's packed layout on the 1B shape's linears at 512 rows (blocks of
  // 4 MiB of W's rows ran 0.84-0.96x of this). The bias in x's dtype: the decode loop passes a
  // bfloat16 bias widened, the same values.
  return at::linear(
      x, w, bias.has_value() ? c10::optional<at::Tensor>(bias->to(x.scalar_type())) : c10::nullopt);
}
}  // namespace

std::string dense_bf16_path() {
  switch (bf16_path()) {
    case Bf16Path::kTiles:
      return "tiles";
    case Bf16Path::kDot:
      return "dot";
    default:
      return "";
  }
}

at::Tensor dense_gemm(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "dense_gemm: x must be [M, K] float32 or bfloat16");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), "dense_gemm: w must be [N, K]");
  if (x.scalar_type() == at::kBFloat16) return gemm_bf16(x, w, bias);
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
