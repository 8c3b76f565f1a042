// Entry points of quant_gemm.cpp (bound to Python in bindings.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

std::string quant_isa();
std::vector<at::Tensor> quantize_activations(at::Tensor x);
void quant_gemm(at::Tensor xq, at::Tensor meta, at::Tensor packed, int64_t qtype, int64_t N,
                at::Tensor y, int64_t col, c10::optional<at::Tensor> bias);
at::Tensor quant_rows(at::Tensor packed, int64_t qtype, int64_t N, int64_t K, at::Tensor ids);

class QuantLinear {
 public:
  QuantLinear(std::vector<at::Tensor> packed, std::vector<int64_t> qtypes,
              std::vector<int64_t> rows, std::vector<c10::optional<at::Tensor>> bias,
              int64_t in_features);
  at::Tensor forward(at::Tensor x) const;

 private:
  std::vector<at::Tensor> packed_;
  std::vector<int64_t> qtypes_, rows_, cols_;
  std::vector<c10::optional<at::Tensor>> bias_;
  int64_t K_ = 0, N_ = 0;
};
