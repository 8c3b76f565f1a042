// Entry point of dense_gemm.cpp (bound to Python in bindings.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <string>

#include "linear_kernel.h"

// x [M, K] float32 times W^T for dense weights W [N, K] in float32, float16 or bfloat16 (widened
// to float32 as they load), plus bias [N] when given: [M, N] float32. Up to 8 rows (decode
// steps), and float32 W at any M: each thread streams its share of W's rows once for all M rows
// of x. More rows on 16-bit W: blocks of W's rows widened into an L2-sized buffer, each
// multiplied by the library's GEMM. bfloat16 x takes bfloat16 W and gives bfloat16 (the float32
// sums rounded once), decode-sized steps as dense_bf16_path says (the AMX tiles need N a
// multiple of 16 and K of 32), else the library's GEMM on the unpacked weight.
at::Tensor dense_gemm(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias);

// How dense_gemm runs bfloat16 steps: "tiles" (5-128 rows on the AMX tiles, up to 4 by
// AVX512-BF16 dot products: an amx build, and the process allowed to use the tiles), "dot" (1-64
// rows by those dot products: an AVX-512 build on a CPU that has them, without the tiles), or ""
// (neither: the float32 streaming up to 4 rows, the library's GEMM beyond).
std::string dense_bf16_path();

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
