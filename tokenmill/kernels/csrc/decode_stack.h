// LlamaDecodeStack: all decoder layers of a decode-only batch in one call (decode_stack.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <vector>

#include "linear_kernel.h"

class LlamaDecodeStack {
 public:
  LlamaDecodeStack(std::vector<at::Tensor> input_norms, std::vector<at::Tensor> post_norms,
                   at::Tensor final_norm, std::vector<std::shared_ptr<LinearKernel>> qkv,
                   std::vector<std::shared_ptr<LinearKernel>> o,
                   std::vector<std::shared_ptr<LinearKernel>> gate_up,
                   std::vector<std::shared_ptr<LinearKernel>> down, int64_t num_heads,
                   int64_t num_kv_heads, int64_t head_dim, double eps, double scale);
  // residual [n, hidden] (the embeddings; updated in place) -> final_norm(last residual)
  at::Tensor forward(at::Tensor residual, at::Tensor positions, std::vector<at::Tensor> k_caches,
                     std::vector<at::Tensor> v_caches, at::Tensor block_tables, at::Tensor seq_lens,
                     at::Tensor slot_mapping, int64_t block_size, at::Tensor cos_t,
                     at::Tensor sin_t) const;

 private:
  std::vector<at::Tensor> input_norms_, post_norms_;
  at::Tensor final_norm_;
  std::vector<std::shared_ptr<LinearKernel>> qkv_, o_, gate_up_, down_;
  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_, scale_;
};
