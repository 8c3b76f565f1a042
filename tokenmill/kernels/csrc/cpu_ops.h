// Fused CPU ops of cpu_ops.cpp that other translation units call directly.
#pragma once
#include <torch/extension.h>

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens,
                                     int64_t block_size, double scale);
void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
              torch::Tensor slot_mapping);
torch::Tensor add_rms_norm(torch::Tensor residual, c10::optional<torch::Tensor> delta,
                           torch::Tensor weight, double eps);
torch::Tensor silu_mul(torch::Tensor gate_up);
void rotary_inplace(torch::Tensor x, torch::Tensor positions, torch::Tensor cos_t,
                    torch::Tensor sin_t);
