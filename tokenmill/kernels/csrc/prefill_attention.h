// Entry points of prefill_attention.cpp (bound to Python in bindings.cpp).
#pragma once
#include <ATen/core/Tensor.h>

// Whether paged_prefill_attention has a kernel for this head geometry in this build.
bool paged_prefill_attention_supported(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim);

// Causal attention of multi-token chunks over the paged cache. q [tokens, heads, head_dim], rows
// possibly strided (a view of the fused qkv): request b's queries are rows query_start_loc[b] ..
// query_start_loc[b + 1], the last tokens of its seq_lens[b]; k_cache, v_cache in either layout
// of KvLayout (cpu_ops.h), already holding the chunk's keys and values; block_tables
// [requests, max_blocks], seq_lens, query_start_loc int32. Returns [tokens, heads, head_dim] in
// q's dtype (float32 or bfloat16).
at::Tensor paged_prefill_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                   at::Tensor block_tables, at::Tensor seq_lens,
                                   at::Tensor query_start_loc, int64_t block_size, double scale);
