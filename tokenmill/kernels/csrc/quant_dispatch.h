// Which path a call takes (by batch size and type) and the per-type dispatch of every entry
// point, with the dequantized rows and columns for the embedding and the exact channels.
// Part of quant_gemm.cpp's translation unit: included there only, in order.
#pragma once

#include "quant_amx.h"

namespace {

#if defined(TM_AVX512) || defined(TM_AVX2)

// The largest batch that streams each tile (tile_streaming, in passes of up to 4 tokens, each
// tile's later passes reading it from L1 / L2) instead of taking gemm_batched, whose unpacking
// to memory and accumulators in L1 only pay off over more tokens. Measured on AVX2 (Zen 3, 2
// threads, against gemm_batched): 1.02-1.67x at 5-8 tokens for every type; at 12-16 tokens
// 1.1-1.5x for Q4_0, Q4_1, Q8_0 and Q6_K, 0.9-1.0x for the others. With AVX-VNNI's cheaper dot
// steps the super-block types, whose scales every streaming pass unpacks again, gain from the
// batched path from 5 tokens on (`kernel_ab.py --isa avxvnni --tokens 5,8,12,16` against the
// AVX2 thresholds, 1B-shape Q4_K_M: step linears 1.05-1.10x, the Q6_K head 1.14-1.31x), the
// 32-input types not (the default model's Q4_1 / Q8_0 linears batched: 0.75-0.93x).
template <int64_t Q>
constexpr int64_t kStreamingMaxM =
#if defined(TM_AVX512)
    4;
#else
    kVnni && k_type(Q)                                 ? 4
    : Q == Q4_0 || Q == Q4_1 || Q == Q8_0 || Q == Q6_K ? 16
                                                       : 8;
#endif

// y = the quantized GEMM of a batch prepared block-major (more than kStreamingMaxM tokens):
// gemm_batched, or the AMX tiles where present for decode batches of kAmxMinM..kAmxMaxM.
template <int64_t Q, typename TY>
void gemm_prepared(const uint8_t* w, const BatchActs& acts, int64_t N, int64_t K,
                   const Epilogue& ep, TY* y, int64_t ldy) {
#ifdef TM_AMX
  // The tiles' products are nearly free, but every block's int32 sums still need the same
  // float rescaling per token as VNNI's. Measured on Sapphire Rapids against gemm_batched
  // (same process, 1 thread): 0.8-0.9x at 16 tokens, 0.92-1.06x at 32, 1.0-1.08x at 64; slower
  // for prefill-size batches, and the split types' half blocks never pay off.
  if constexpr (!kSplit<Q>) {
    if (acts.M >= kAmxMinM && acts.M <= kAmxMaxM && amx_permitted())
      return gemm_amx<Q>(w, acts, N, K, ep, y, ldy);
  }
#endif
  gemm_batched<Q>(w, acts, N, K, ep, y, ldy);
}

// y = the quantized GEMM of row-major activations: batches of up to kStreamingMaxM tokens
// stream each tile, larger ones are copied block-major for gemm_prepared.
template <int64_t Q, typename TY>
void gemm_typed(const uint8_t* w, const int8_t* xq, const ActMeta* meta, int64_t M, int64_t N,
                int64_t K, const Epilogue& ep, TY* y, int64_t ldy) {
  if (M > kStreamingMaxM<Q>)
    return gemm_prepared<Q>(w, BatchActs::from_rows<Q>(xq, meta, M, K), N, K, ep, y, ldy);
  const int64_t n_tiles = (N + 15) / 16, tile_bytes = K / unit_k(Q) * unit_bytes(Q);
  // the chain starts of every token and block, [M][K / 32][2], as BatchActs has them
  std::vector<int32_t> starts;
  if constexpr (kStartSpec<Q>.c != 0) {
    starts.resize(M * K / 32 * 2);
    for (int64_t i = 0; i < M * K / 32; ++i) {
      const auto [lo, hi] = half_sums(xq + i * 32);
      kStartSpec<Q>.fill(lo, hi, starts.data() + 2 * i);
    }
  }
  // passes of at most 4 tokens (the accumulators stay in registers), as even as they can be; a
  // tile's later passes find it in L1 / L2
  const int64_t passes = (M + 3) / 4, chunk = (M + passes - 1) / passes;
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nt = begin; nt < end; ++nt) {
      const uint8_t* wt = w + nt * tile_bytes;
      const int rows = static_cast<int>(std::min<int64_t>(16, N - nt * 16));
      for (int64_t m0 = 0; m0 < M; m0 += chunk) {
        const int8_t* xm = xq + m0 * K;
        const ActMeta* mm = meta + m0 * (K / 32);
        const int32_t* st = starts.empty() ? nullptr : starts.data() + m0 * (K / 32) * 2;
        TY* yt = y + m0 * ldy + nt * 16;
        const Epilogue et = ep.at(nt * 16, m0);
        switch (std::min(chunk, M - m0)) {
          case 1:
            tile_streaming<Q, 1>(wt, xm, mm, st, K, et, yt, ldy, rows);
            break;
          case 2:
            tile_streaming<Q, 2>(wt, xm, mm, st, K, et, yt, ldy, rows);
            break;
          case 3:
            tile_streaming<Q, 3>(wt, xm, mm, st, K, et, yt, ldy, rows);
            break;
          default:
            tile_streaming<Q, 4>(wt, xm, mm, st, K, et, yt, ldy, rows);
            break;
        }
      }
    }
  });
}

// Weight k (0..31) of row r of an unpacked block, as gguf's dequantization gives it: exact in
// double, then one rounding to float.
template <int64_t Q>
inline float weight_value(const Block& blk, int r, int k) {
  const uint8_t byte = blk.u[k / 4][r * 4 + k % 4];
  const double q = kSignedU<Q> ? static_cast<int8_t>(byte) : byte;
  const bool second = kSplit<Q> && k >= 16;
  return static_cast<float>(second ? blk.s1[r] * q + blk.o1[r] : blk.s0[r] * q + blk.o0[r]);
}

// Row `r` of every tile `tiles[i]` -> out[i] (float32 [K]): the embedding lookup.
template <int64_t Q>
void rows_typed(const uint8_t* w, int64_t K, const int64_t* ids, int64_t count, float* out) {
  const int64_t ub = unit_bytes(Q), bpu = unit_k(Q) / 32, tile_bytes = K / unit_k(Q) * ub;
  at::parallel_for(0, count, 8, [&](int64_t begin, int64_t end) {
    Block blk;
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* wt = w + (ids[i] / 16) * tile_bytes;
      const int r = static_cast<int>(ids[i] % 16);
      float* o = out + i * K;
      for (int64_t u = 0; u < K / unit_k(Q); ++u) {
        for (int b = 0; b < bpu; ++b) {
          unpack_block<Q>(wt + u * ub, b, blk);
          for (int k = 0; k < 32; ++k) o[(u * bpu + b) * 32 + k] = weight_value<Q>(blk, r, k);
        }
      }
    }
  });
}

// Input channels `ch` of every row: out[j * N + n] = W[n, ch[j]] (float32, as rows_typed computes
// them), one block unpacked per tile and channel: the exact channels' weight columns.
template <int64_t Q>
void cols_typed(const uint8_t* w, int64_t N, int64_t K, const std::vector<int64_t>& ch,
                float* out) {
  const int64_t ub = unit_bytes(Q), tile_bytes = K / unit_k(Q) * ub;
  at::parallel_for(0, (N + 15) / 16, 16, [&](int64_t begin, int64_t end) {
    Block blk;
    for (int64_t t = begin; t < end; ++t) {
      for (size_t j = 0; j < ch.size(); ++j) {
        const int64_t c = ch[j], u = c / unit_k(Q), b = (c % unit_k(Q)) / 32, k = c % 32;
        unpack_block<Q>(w + t * tile_bytes + u * ub, static_cast<int>(b), blk);
        for (int r = 0; r < 16 && t * 16 + r < N; ++r)
          out[j * N + t * 16 + r] = weight_value<Q>(blk, r, static_cast<int>(k));
      }
    }
  });
}

template <typename TY>
void gemm_dispatch(int64_t q, const uint8_t* w, const int8_t* xq, const ActMeta* meta, int64_t M,
                   int64_t N, int64_t K, const Epilogue& ep, TY* y, int64_t ldy) {
  const bool known = with_type(
      q, [&](auto t) { gemm_typed<decltype(t)::value>(w, xq, meta, M, N, K, ep, y, ldy); });
  TORCH_CHECK(known, "unsupported GGUF type ", q);
}

template <typename TY>
void gemm_dispatch(int64_t q, const uint8_t* w, const BatchActs& acts, int64_t N, int64_t K,
                   const Epilogue& ep, TY* y, int64_t ldy) {
  const bool known =
      with_type(q, [&](auto t) { gemm_prepared<decltype(t)::value>(w, acts, N, K, ep, y, ldy); });
  TORCH_CHECK(known, "unsupported GGUF type ", q);
}

// The chain starts type q's batched kernel reads.
StartSpec start_spec(int64_t q) {
  StartSpec s;
  with_type(q, [&](auto t) { s = kStartSpec<decltype(t)::value>; });
  return s;
}

// From this many tokens on, every type takes the batched path (or AMX) on this build's level (5
// on AVX-512, 17 on AVX2): QuantLinear then quantizes straight into its block-major layout.
constexpr int64_t kPreparedMinM =
    1 + std::max({kStreamingMaxM<Q4_0>, kStreamingMaxM<Q4_1>, kStreamingMaxM<Q5_0>,
                  kStreamingMaxM<Q5_1>, kStreamingMaxM<Q8_0>, kStreamingMaxM<Q2_K>,
                  kStreamingMaxM<Q3_K>, kStreamingMaxM<Q4_K>, kStreamingMaxM<Q5_K>,
                  kStreamingMaxM<Q6_K>, kStreamingMaxM<IQ4_NL>, kStreamingMaxM<IQ4_XS>,
                  kStreamingMaxM<IQ1_S>, kStreamingMaxM<IQ1_M>, kStreamingMaxM<IQ2_XXS>,
                  kStreamingMaxM<IQ2_XS>, kStreamingMaxM<IQ2_S>, kStreamingMaxM<IQ3_XXS>,
                  kStreamingMaxM<IQ3_S>});

#endif  // TM_AVX512 || TM_AVX2

}  // namespace
