// LlamaDecodeStack: all decoder layers of a decode-only batch in one call (decode_stack.cpp).
#pragma once
#include <torch/extension.h>

#include <memory>
#include <vector>

#include "quant_gemm.h"

class LlamaDecodeStack {
 public:
  LlamaDecodeStack(std::vector<torch::Tensor> input_norms, std::vector<torch::Tensor> post_norms,
                   torch::Tensor final_norm, std::vector<std::shared_ptr<QuantLinear>> qkv,
                   std::vector<std::shared_ptr<QuantLinear>> o,
                   std::vector<std::shared_ptr<QuantLinear>> gate_up,
                   std::vector<std::shared_ptr<QuantLinear>> down, int64_t num_heads,
                   int64_t num_kv_heads, int64_t head_dim, double eps, double scale);
  // residual [n, hidden] (the embeddings; updated in place) -> final_norm(last residual)
  torch::Tensor forward(torch::Tensor residual, torch::Tensor positions,
                        std::vector<torch::Tensor> k_caches, std::vector<torch::Tensor> v_caches,
                        torch::Tensor block_tables, torch::Tensor seq_lens,
                        torch::Tensor slot_mapping, int64_t block_size, torch::Tensor cos_t,
                        torch::Tensor sin_t) const;

 private:
  std::vector<torch::Tensor> input_norms_, post_norms_;
  torch::Tensor final_norm_;
  std::vector<std::shared_ptr<QuantLinear>> qkv_, o_, gate_up_, down_;
  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_, scale_;
};
