// Entry points of cpu_ops.cpp: the fused ops (decode_stack.cpp calls some directly; all are
// bound to Python in bindings.cpp).
#pragma once
#include <ATen/core/Tensor.h>

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                  at::Tensor block_tables, at::Tensor seq_lens, int64_t block_size,
                                  double scale);
void write_kv(at::Tensor k, at::Tensor v, at::Tensor k_cache, at::Tensor v_cache,
              at::Tensor slot_mapping);
at::Tensor add_rms_norm(at::Tensor residual, c10::optional<at::Tensor> delta, at::Tensor weight,
                        double eps);
at::Tensor silu_mul(at::Tensor gate_up);
void rotary_inplace(at::Tensor x, at::Tensor positions, at::Tensor cos_t, at::Tensor sin_t);
// The same attention through the portable loop (the tests' check of the AVX-512 path).
at::Tensor paged_decode_attention_reference(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                            at::Tensor block_tables, at::Tensor seq_lens,
                                            int64_t block_size, double scale);
// Structured output: in row rows[i] of logits (row i when rows is empty), -inf for every token
// whose bit is clear in bitmask row i (the grammar's allowed tokens).
void apply_token_bitmask(at::Tensor logits, at::Tensor bitmask, at::Tensor rows);
// The index of each row's maximum (the first on ties).
at::Tensor argmax_rows(at::Tensor x);
