// Up to a few tokens per pass (batch-1 and small decode batches): each weight block unpacked as
// it streams in and applied to every token, accumulators in registers; the GEMM epilogue.
// Part of quant_gemm.cpp's translation unit: included there only, in order.
#pragma once

#include "quant_act.h"
#include "quant_block.h"

namespace {

#if defined(TM_AVX512) || defined(TM_AVX2)

// Integer dot of U[t0..t0+n) with 4-byte groups of token x (broadcast), plus `start`: one int32
// per row.
#ifdef TM_AVX512
struct I16 {
  __m512i v;
};
inline I16 dot_u(const Block& blk, const int8_t* x, int t0, int n, int32_t start) {
  // Two independent chains (n is even): with one, batches of 1-4 tokens wait on vpdpbusd's
  // latency (measured 1.05-1.19x on the default model's gate_up / down at M = 1..4).
  __m512i acc[2] = {_mm512_set1_epi32(start), _mm512_setzero_si512()};
  for (int t = t0; t < t0 + n; ++t) {
    acc[t & 1] = _mm512_dpbusd_epi32(acc[t & 1], _mm512_load_si512(blk.u[t]),
                                     _mm512_set1_epi32(group4(x + 4 * t)));
  }
  return {_mm512_add_epi32(acc[0], acc[1])};
}
inline F16 to_float(I16 v) { return {_mm512_cvtepi32_ps(v.v)}; }

// Quantized activations as the kernels read them: token m's 32 inputs of block b, their
// metadata and their chain starts (the symmetric types' integer offsets, see kStartSpec), in
// either layout: row-major as quantize_activations writes them ([M, K]), or block-major
// ([K / 32, M, 32], BatchActs) for the AMX path, where a block's tokens then sit on consecutive
// cache lines instead of K bytes apart (which aliases to a few L1 sets).
struct Acts {
  const int8_t* x;
  const ActMeta* meta;
  int64_t xs, xb, ms, mb;  // token and block strides of x (bytes) and meta (entries)
  const int32_t* start;    // two per entry of meta (nullptr: the type takes none)
  static Acts row_major(const int8_t* x, const ActMeta* meta, int64_t K, const int32_t* start) {
    return {x, meta, K, 32, K / 32, 1, start};
  }
  const int8_t* at(int64_t m, int64_t b) const { return x + m * xs + b * xb; }
  const ActMeta& meta_at(int64_t m, int64_t b) const { return meta[m * ms + b * mb]; }
  const int32_t* start_at(int64_t m, int64_t b) const { return start + (m * ms + b * mb) * 2; }
  Acts from(int64_t m0) const {
    return {x + m0 * xs, meta + m0 * ms, xs, xb, ms, mb, start ? start + m0 * ms * 2 : nullptr};
  }
};

// acc[m] += block b's contribution for tokens 0..MT of `acts`, with the batched path's integer
// sums and float operations (accumulate_tokens, quant_batch_kernels.h), so that a row's output does
// not depend on the path its batch takes.
template <int64_t Q, int MT>
inline void accumulate(const Block& blk, const Acts& acts, int64_t b, F16* acc) {
  constexpr bool starts = kIntOffset<Q> != 0;  // else float offsets
  const F16 s0 = F16::load(blk.s0), o0 = F16::load(blk.o0);
  for (int m = 0; m < MT; ++m) {
    const int8_t* x = acts.at(m, b);
    const ActMeta& a = acts.meta_at(m, b);
    const int32_t* st = starts ? acts.start_at(m, b) : nullptr;
    const F16 d = F16::set1(a.d);
    if constexpr (kSplit<Q>) {
      const F16 lo = to_float(dot_u(blk, x, 0, 4, starts ? st[0] : 0));
      const F16 hi = to_float(dot_u(blk, x, 4, 4, starts ? st[1] : 0));
      acc[m] = F16::fma(F16::fma(hi, F16::load(blk.s1), lo * s0), d, acc[m]);
      if constexpr (!starts) {
        acc[m] = F16::fma(o0, F16::set1(a.dlo), acc[m]);
        acc[m] = F16::fma(F16::load(blk.o1), F16::set1(a.dhi), acc[m]);
      }
    } else {
      const F16 dot = to_float(dot_u(blk, x, 0, 8, starts ? st[0] : 0));
      acc[m] = F16::fma(dot, s0 * d, acc[m]);
      if constexpr (!starts) acc[m] = F16::fma(o0, F16::set1(a.dsum), acc[m]);
    }
  }
}
#else
struct I16 {
  __m256i a, b;
};
inline F16 to_float(I16 v) { return {_mm256_cvtepi32_ps(v.a), _mm256_cvtepi32_ps(v.b)}; }
#endif

// What a tile's accumulators start from for tokens 0 .. count of `ep`'s view, into
// acc[m * stride ...] (16 floats each): the bias, then the exact channels' share (a partial last
// tile reads the next columns, or the table's padding, for the rows it does not store). Every
// path starts its sums here, so a row's float operations do not depend on the path. 8 tokens at
// a time: each weight column is loaded once per group and the tokens' FMA chains overlap (one
// token at a time after the sums, as before: batch-1 linears 0.93-0.96x of this; 32 tokens
// within noise).
inline void epilogue_fill(const Epilogue& ep, int64_t count, float* acc, int64_t stride) {
  constexpr int kGroup = 8;
  for (int64_t m0 = 0; m0 < count; m0 += kGroup) {
    const int n = static_cast<int>(std::min<int64_t>(kGroup, count - m0));
    F16 v[kGroup];
    for (int i = 0; i < n; ++i) v[i] = ep.bias ? F16::load(ep.bias) : F16::zero();
    for (int j = 0; j < ep.k; ++j) {
      const F16 w = F16::load(ep.w + j * ep.ldw);
      for (int i = 0; i < n; ++i) v[i] = F16::fma(F16::set1(ep.a[(m0 + i) * ep.k + j]), w, v[i]);
    }
    for (int i = 0; i < n; ++i) v[i].store(acc + (m0 + i) * stride);
  }
}

// The same for the MT tokens of a streaming pass, into registers.
template <int MT>
inline void epilogue_start(const Epilogue& ep, F16* acc) {
  alignas(64) float v[MT * 16];
  epilogue_fill(ep, MT, v, 16);
  for (int m = 0; m < MT; ++m) acc[m] = F16::load(v + m * 16);
}

#ifdef TM_AVX512
// 16 floats as bfloat16 bits, rounded to nearest even.
inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}
#endif

// Writes the first `rows` (<= 16) outputs of a tile: float32, or bfloat16 rounded to nearest
// even.
template <typename TY>
inline void store_row(F16 acc, TY* y, int rows) {
#ifdef TM_AVX512
  const __mmask16 keep = static_cast<__mmask16>((1u << rows) - 1);
  if constexpr (std::is_same_v<TY, float>) {
    _mm512_mask_storeu_ps(y, keep, acc.v);
  } else {
    _mm256_mask_storeu_epi16(y, keep, to_bf16(acc.v));
  }
#else
  if constexpr (std::is_same_v<TY, float>) {
    if (rows == 16) return acc.store(y);
    alignas(32) float v[16];
    acc.store(v);
    std::memcpy(y, v, rows * 4);
  } else {
    const auto round = [](__m256 f) {
      const __m256i bits = _mm256_castps_si256(f);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
      const __m256i r = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
      return _mm256_srli_epi32(r, 16);
    };
    // packus interleaves the halves' 128-bit lanes: restore their order
    const __m256i h =
        _mm256_permute4x64_epi64(_mm256_packus_epi32(round(acc.a), round(acc.b)), 0xD8);
    if (rows == 16) return _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), h);
    alignas(32) uint16_t v[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(v), h);
    std::memcpy(y, v, rows * 2);
  }
#endif
}

// How far ahead the weight streams are prefetched, in bytes: into L1 (_MM_HINT_T0) and into L2
// (_MM_HINT_T1); 0 turns a kind off. Set once per process from the CPU's vendor
// (set_weight_prefetch from cpu_ops.py, cpu_isa.weight_prefetch), before any GEMM runs.
int64_t g_prefetch_l1 = 8192;
int64_t g_prefetch_l2 = 32768;

// Streams a 16-row tile's blocks in order: fn(src, b, kb) for every 32-input block kb, block b
// of the unit at src. Batch 1 is bound by how many misses are in flight, and the tiles of a
// thread are contiguous, so every line of the unit is prefetched into L1 g_prefetch_l1 ahead and
// into L2 g_prefetch_l2 ahead. On Intel cores (8 KiB / 32 KiB) the L1 prefetches alone wait on
// the core's few line-fill buffers, the L2 ones keep more lines coming from DRAM behind them
// (Sapphire Rapids, weights cycled from DRAM, 2 threads: 1.08x Q4_K, 1.13x Q6_K and Q5_0, 21.5
// -> 24.2 GB/s; 0.95x where they come from L3; batch-1 decode 1.06x on the default model, about
// 1.04x on the 1B shape). AMD cores fill L1 for every hint, so 32 KiB ahead evicts the lines in
// use there: the L2 kind is off (cpu_isa.weight_prefetch).
template <int64_t Q, typename Fn>
inline void for_each_block(const uint8_t* w, int64_t K, Fn&& fn) {
  const int64_t uk = unit_k(Q), ub = unit_bytes(Q), bpu = uk / 32;
  const int64_t l1 = g_prefetch_l1, l2 = g_prefetch_l2;
  for (int64_t u = 0; u < K / uk; ++u) {
    const uint8_t* src = w + u * ub;
    for (int64_t line = 0; line < ub; line += 64) {
      if (l1) _mm_prefetch(reinterpret_cast<const char*>(src + l1 + line), _MM_HINT_T0);
      if (l2) _mm_prefetch(reinterpret_cast<const char*>(src + l2 + line), _MM_HINT_T1);
    }
    for (int b = 0; b < bpu; ++b) fn(src, b, u * bpu + b);
  }
}

#ifdef TM_AVX512
// One 16-row tile for tokens [0, MT), unpacking each block as it streams; `start`: the tokens'
// chain starts, [MT][K / 32][2] (gemm_typed).
template <int64_t Q, int MT, typename TY>
void tile_streaming(const uint8_t* w, const int8_t* xq, const ActMeta* meta, const int32_t* start,
                    int64_t K, const Epilogue& ep, TY* y, int64_t ldy, int rows) {
  const Acts acts = Acts::row_major(xq, meta, K, start);
  F16 acc[MT];
  epilogue_start<MT>(ep, acc);
  Block blk;
  for_each_block<Q>(w, K, [&](const uint8_t* src, int b, int64_t kb) {
    unpack_block<Q>(src, b, blk);
    accumulate<Q, MT>(blk, acts, kb, acc);
  });
  for (int m = 0; m < MT; ++m) store_row(acc[m], y + m * ldy, rows);
}
#endif

#endif  // TM_AVX512 || TM_AVX2

}  // namespace
