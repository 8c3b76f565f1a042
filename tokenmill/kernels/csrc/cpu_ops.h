// Entry points of cpu_ops.cpp: the fused ops (decode_stack.cpp calls some directly; all are
// bound to Python in bindings.cpp).
#pragma once
#include <ATen/core/Tensor.h>

// A KV cache's layout, read from its shape:
//  * token-major [slots, kv_heads, head_dim]: a slot's heads side by side (the reference
//    attention backends' layout);
//  * head-major [blocks, kv_heads, block_size, head_dim]: each head's rows of a block side by
//    side (the CPU backend's: a decode task then reads its head's rows of a block as one
//    stream instead of every row_len-th 2 * head_dim bytes).
// Head g of token o of block b starts at element b * block_size * row_len + o * token + g * head
// (row_len = kv_heads * head_dim), whatever the layout.
struct KvLayout {
  int64_t block;  // the cache's slots per block (head-major), or 1 (token-major: any block size)
  int64_t token;  // elements from a token's row to the next token's in the same block
  int64_t head;   // elements from a kv head's row to the next head's
  // The element where head g of `slot` starts.
  int64_t at(int64_t slot, int64_t g, int64_t row_len) const {
    return slot / block * block * row_len + slot % block * token + g * head;
  }
};
// The layout of a contiguous 3-D or 4-D cache (as above), checked against the paged block size
// `block_size` where it is not 0.
KvLayout kv_layout(const at::Tensor& cache, int64_t block_size);
// x (a query, or rows to write) in a dtype the KV cache's kernels take beside `cache`: x itself
// when it is the cache's dtype, or float32 / bfloat16 beside a float16 cache (--kv-cache-dtype:
// the kernels widen the cache's rows as they load them and round the rows they write); else
// converted (to the cache's dtype, or float32 beside a float16 cache). The attention entry
// points convert their output back to the query's dtype.
at::Tensor as_kernel_dtype(const at::Tensor& x, const at::Tensor& cache);

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
// One token per row of logits [R, V] (float32): the argmax (first on ties) where temperature[r]
// is 0, else the inverse-CDF sample at u[r] (float64, [0, 1)) of softmax(logits[r] /
// temperature[r]): the first token whose cumulative probability exceeds u x total, never one of
// probability 0.
at::Tensor sample_rows(at::Tensor logits, at::Tensor temperature, at::Tensor u);
