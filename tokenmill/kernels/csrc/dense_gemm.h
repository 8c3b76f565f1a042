// Entry point of dense_gemm.cpp (bound to Python in bindings.cpp).
#pragma once
#include <ATen/core/Tensor.h>

// x [M, K] float32 times W^T for dense weights W [N, K] in float32, float16 or bfloat16 (widened
// to float32 as they load), plus bias [N] when given: [M, N] float32. Up to 8 rows (decode
// steps), and float32 W at any M: each thread streams its share of W's rows once for all M rows
// of x. More rows on 16-bit W: blocks of W's rows widened into an L2-sized buffer, each
// multiplied by the library's GEMM.
at::Tensor dense_gemm(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias);
