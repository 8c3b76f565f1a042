// LinearKernel: a linear layer's kernel object, as the C++ decode loop (decode_stack.h) runs it.
#pragma once
#include <ATen/core/Tensor.h>

class LinearKernel {
 public:
  virtual ~LinearKernel() = default;
  // y = x W^T (+ bias): x [M, K] in the compute dtype, y [M, N] in x's dtype.
  virtual at::Tensor forward(at::Tensor x) const = 0;
};
