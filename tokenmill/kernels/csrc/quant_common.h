// What every part of quant_gemm.cpp's translation unit shares: the kernel level's macros, the
// activation blocks' metadata (ActMeta) and the GEMM epilogue's inputs (Epilogue).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "amx.h"
#include "gguf_types.h"
#include "vec_math.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define TM_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TM_AVX2 1
#if defined(__AVXVNNI__)
// The avxvnni level: the AVX2 kernels with `vpdpbusd` on 256-bit vectors (AVX-VNNI, VEX-encoded:
// Intel cores from Alder Lake on, and CPUs without AVX-512) in place of `maddubs` + `madd`.
#define TM_AVXVNNI 1
#endif
#endif

namespace {

using namespace gguf_types;

// Per token and 32-input block of quantized activations.
struct ActMeta {
  float d;     // scale: x ~= d * q
  float dsum;  // d * sum(q)
  float dlo;   // d * sum(q[0:16])
  float dhi;   // d * sum(q[16:32])
};

// What a tile's float32 sums start from: the bias, and the exact channels' share
// sum_j a[m][j] * w[j][n] (QuantLinear::set_exact_channels), so neither takes a pass over y of
// its own.
struct Epilogue {
  const float* bias = nullptr;  // per output, padded to whole tiles
  const float* w = nullptr;     // the exact channels' weight columns, [k][ldw] (+16 floats)
  const float* a = nullptr;     // their activations, [tokens][k]
  int64_t ldw = 0;
  int k = 0;

  // The same for the outputs from column n and the tokens from m on.
  Epilogue at(int64_t n, int64_t m) const {
    return {bias ? bias + n : nullptr, w ? w + n : nullptr, a ? a + m * k : nullptr, ldw, k};
  }
};

// The 4 activation bytes at p as one int32: the group a dot step broadcasts to every row.
inline int32_t group4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

}  // namespace
