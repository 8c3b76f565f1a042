// Entry points of quant_gemm.cpp (bound to Python in cpu_ops.cpp).
#pragma once
#include <torch/extension.h>

#include <string>
#include <vector>

std::string quant_isa();
std::vector<torch::Tensor> quantize_activations(torch::Tensor x);
void quant_gemm(torch::Tensor xq, torch::Tensor meta, torch::Tensor packed, int64_t qtype,
                int64_t N, torch::Tensor y, int64_t col, c10::optional<torch::Tensor> bias);
torch::Tensor quant_rows(torch::Tensor packed, int64_t qtype, int64_t N, int64_t K,
                         torch::Tensor ids);

class QuantLinear {
 public:
  QuantLinear(std::vector<torch::Tensor> packed, std::vector<int64_t> qtypes,
              std::vector<int64_t> rows, std::vector<c10::optional<torch::Tensor>> bias,
              int64_t in_features);
  torch::Tensor forward(torch::Tensor x) const;

 private:
  std::vector<torch::Tensor> packed_;
  std::vector<int64_t> qtypes_, rows_, cols_;
  std::vector<c10::optional<torch::Tensor>> bias_;
  int64_t K_ = 0, N_ = 0;
};
