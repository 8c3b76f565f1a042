// The decoder layers of a Llama-family model for a batch of single-token decodes, as one C++
// call: at batch 1 a small model's layer reads ~2 MB of quantized weights (~100 us), the same
// order as the Python and dispatch cost of its dozen ops, so the loop lives here. Its
// projections are QuantLinear (native GGUF blocks) or DenseLinear (dense weights) kernels. It runs
// the same fused kernels, in the same order, as the Python path (tokenmill/models/llama.py), so the
// results are identical.
#include "decode_stack.h"

#include <ATen/record_function.h>

#include "cpu_ops.h"

namespace {
// Runs fn() inside a profiler range named `name` (torch.profiler records it; nothing happens
// while no profiler runs): benchmarks/step_profile.py splits a decode step's time by these.
template <typename Fn>
auto stage(const char* name, Fn&& fn) {
  RECORD_FUNCTION(name, std::vector<c10::IValue>());
  return fn();
}
}  // namespace

LlamaDecodeStack::LlamaDecodeStack(std::vector<at::Tensor> input_norms,
                                   std::vector<at::Tensor> post_norms, at::Tensor final_norm,
                                   std::vector<std::shared_ptr<LinearKernel>> qkv,
                                   std::vector<std::shared_ptr<LinearKernel>> o,
                                   std::vector<std::shared_ptr<LinearKernel>> gate_up,
                                   std::vector<std::shared_ptr<LinearKernel>> down,
                                   int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                   double eps, double scale)
    : input_norms_(std::move(input_norms)),
      post_norms_(std::move(post_norms)),
      final_norm_(std::move(final_norm)),
      qkv_(std::move(qkv)),
      o_(std::move(o)),
      gate_up_(std::move(gate_up)),
      down_(std::move(down)),
      num_heads_(num_heads),
      num_kv_heads_(num_kv_heads),
      head_dim_(head_dim),
      eps_(eps),
      scale_(scale) {
  const size_t n = input_norms_.size();
  TORCH_CHECK(n > 0 && post_norms_.size() == n && qkv_.size() == n && o_.size() == n &&
                  gate_up_.size() == n && down_.size() == n,
              "one entry per layer expected");
}

at::Tensor LlamaDecodeStack::forward(at::Tensor residual, at::Tensor positions,
                                     std::vector<at::Tensor> k_caches,
                                     std::vector<at::Tensor> v_caches, at::Tensor block_tables,
                                     at::Tensor seq_lens, at::Tensor slot_mapping,
                                     int64_t block_size, at::Tensor cos_t, at::Tensor sin_t) const {
  const size_t L = input_norms_.size();
  TORCH_CHECK(k_caches.size() == L && v_caches.size() == L, "one KV cache per layer expected");
  const int64_t n = residual.size(0), d = head_dim_;
  const int64_t q_size = num_heads_ * d, kv_size = num_kv_heads_ * d;
  residual = residual.contiguous();
  at::Tensor h = stage("decode_stack.add_rms_norm",
                       [&] { return add_rms_norm(residual, c10::nullopt, input_norms_[0], eps_); });
  for (size_t i = 0; i < L; ++i) {
    at::Tensor qkv =  // [n, q + 2 kv]
        stage("decode_stack.qkv_proj", [&] { return qkv_[i]->forward(h); });
    at::Tensor qk = qkv.narrow(1, 0, q_size + kv_size).view({n, num_heads_ + num_kv_heads_, d});
    stage("decode_stack.rotary", [&] { return rotary_inplace(qk, positions, cos_t, sin_t); });
    at::Tensor q = qk.narrow(1, 0, num_heads_);
    at::Tensor k = qk.narrow(1, num_heads_, num_kv_heads_);
    at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({n, num_kv_heads_, d});
    stage("decode_stack.write_kv",
          [&] { return write_kv(k, v, k_caches[i], v_caches[i], slot_mapping); });
    at::Tensor attn = stage("decode_stack.attention", [&] {
      return paged_decode_attention(q, k_caches[i], v_caches[i], block_tables, seq_lens, block_size,
                                    scale_);
    });
    at::Tensor o =
        stage("decode_stack.o_proj", [&] { return o_[i]->forward(attn.view({n, q_size})); });
    h = stage("decode_stack.add_rms_norm",
              [&] { return add_rms_norm(residual, o, post_norms_[i], eps_); });
    at::Tensor gate_up =
        stage("decode_stack.gate_up_proj", [&] { return gate_up_[i]->forward(h); });
    at::Tensor act = stage("decode_stack.silu_mul", [&] { return silu_mul(gate_up); });
    at::Tensor mlp = stage("decode_stack.down_proj", [&] { return down_[i]->forward(act); });
    h = stage("decode_stack.add_rms_norm", [&] {
      return add_rms_norm(residual, mlp, i + 1 < L ? input_norms_[i + 1] : final_norm_, eps_);
    });
  }
  return h;
}
