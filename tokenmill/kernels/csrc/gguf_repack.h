// Entry point of gguf_repack.cpp (bound to Python in bindings.cpp).
#pragma once
#include <ATen/core/Tensor.h>

// GGUF rows [n, k / block * block bytes] (uint8, contiguous) of GGML type `qtype` -> the packed
// layout of tokenmill/quant/gguf_pack.py (flat uint8), identical to its `pack(parse(...))`. The
// lattice types need their grid: gguf_pack.grid_levels(qtype).
at::Tensor gguf_repack(at::Tensor raw, int64_t qtype, int64_t n, int64_t k,
                       c10::optional<at::Tensor> grid = c10::nullopt);
