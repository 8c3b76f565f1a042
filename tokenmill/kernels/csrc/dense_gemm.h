// Entry point of dense_gemm.cpp (bound to Python in bindings.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include "linear_kernel.h"

// x [M, K] float32 times W^T for dense weights W [N, K] in float32, float16 or bfloat16 (widened
// to float32 as they load), plus bias [N] when given: [M, N] float32. Up to 8 rows (decode
// steps), and float32 W at any M: each thread streams its share of W's rows once for all M rows
// of x. More rows on 16-bit W: blocks of W's rows widened into an L2-sized buffer, each
// multiplied by the library's GEMM. bfloat16 x takes bfloat16 W and gives bfloat16 (the float32
// sums rounded once): up to 4 rows the same streaming on x widened, 5-128 on the AMX tiles with
// W read in place (amx builds; N a multiple of 16, K of 32), else the library's GEMM on blocks
// of W's rows.
at::Tensor dense_gemm(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias);

// Whether dense_gemm runs bfloat16 steps of 5-128 rows on the AMX tiles (an amx build, and
// the process allowed to use them).
bool dense_tiles();

// A dense linear layer for the C++ decode loop: dense_gemm on 16-bit weights and on float32
// ones up to 8 rows, the library's GEMM on float32 weights beyond (as the Python layers run
// them: `CpuDenseLinear`). x float32, or bfloat16 with bfloat16 weights.
class DenseLinear : public LinearKernel {
 public:
  DenseLinear(at::Tensor weight, c10::optional<at::Tensor> bias);
  at::Tensor forward(at::Tensor x) const override;

 private:
  at::Tensor weight_;
  c10::optional<at::Tensor> bias_;
};
