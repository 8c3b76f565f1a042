// Entry points of quant_gemm.cpp (bound to Python in bindings.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "linear_kernel.h"

// The integer-dot ISA this build was compiled for: "amx" (int8 tiles for batches of 48-63,
// bfloat16 tiles from 64 on, VNNI below), "avx512" (VNNI), "avxvnni" (256-bit VNNI), "avx2" or
// "" (none).
std::string quant_isa();
// How far ahead (bytes, whole lines; 0: off) the GEMMs prefetch their weight streams into L1
// and L2: a property of the core (cpu_isa.weight_prefetch), set before any GEMM runs.
void set_weight_prefetch(int64_t l1_bytes, int64_t l2_bytes);
std::vector<int64_t> weight_prefetch();
// The batch size from which QuantLinear runs bfloat16 AMX tiles instead of 8-bit activations
// (0: never, on builds or CPUs without the tiles).
int64_t bf16_tiles_min_tokens();
std::vector<at::Tensor> quantize_activations(at::Tensor x);
void quant_gemm(at::Tensor xq, at::Tensor meta, at::Tensor packed, int64_t qtype, int64_t N,
                at::Tensor y, int64_t col, c10::optional<at::Tensor> bias);
at::Tensor quant_rows(at::Tensor packed, int64_t qtype, int64_t N, int64_t K, at::Tensor ids);
at::Tensor quant_cols(at::Tensor packed, int64_t qtype, int64_t N, int64_t K,
                      std::vector<int64_t> channels);

class QuantLinear : public LinearKernel {
 public:
  QuantLinear(std::vector<at::Tensor> packed, std::vector<int64_t> qtypes,
              std::vector<int64_t> rows, std::vector<c10::optional<at::Tensor>> bias,
              int64_t in_features);
  // y = x W^T (+ bias) [M, N], x float32 / bfloat16, y in x's dtype. The input channels set
  // by set_exact_channels are left out of the 8-bit rounding (read as 0 there) and multiply
  // their dequantized weight columns in float32 instead. From bf16_tiles_min_tokens() tokens
  // on (AMX), weights and activations are bfloat16 instead (quant_gemm.cpp's header).
  at::Tensor forward(at::Tensor x) const override;

  // Calibration: from observe_inputs(true) on, every forward raises a running max of |x| per
  // input channel (observed_absmax(): float32 [K]); observe_inputs(false) stops and drops it.
  void observe_inputs(bool on);
  at::Tensor observed_absmax() const;

  // Input channels (at most kMaxExactChannels, distinct) computed exactly: their columns of
  // W are dequantized once here into a float32 [k, N] table. An empty list turns it off.
  void set_exact_channels(std::vector<int64_t> channels);
  const std::vector<int64_t>& exact_channels() const { return exact_; }
  int64_t exact_bytes() const { return static_cast<int64_t>(exact_.size()) * N_ * 4; }

  static constexpr int64_t kMaxExactChannels = 16;

 private:
  std::vector<at::Tensor> packed_;
  std::vector<int64_t> qtypes_, rows_, cols_;
  std::vector<c10::optional<at::Tensor>> bias_;
  int64_t K_ = 0, N_ = 0;
  std::vector<int64_t> exact_;  // sorted input channels kept out of the rounding
  at::Tensor exact_w_;   // float32 W[:, exact_]^T ([exact_.size(), N_], then 16 floats of padding)
  at::Tensor observed_;  // float32 [K_] while observing (calibration), else undefined
};
