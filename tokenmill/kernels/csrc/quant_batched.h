// Batches of 5+ tokens: passes of tokens over pairs of tiles (gemm_batched), outputs written
// with streaming stores from kStreamStoresMinM tokens on.
// Part of quant_gemm.cpp's translation unit: included there only, in order.
#pragma once

#include "quant_batch_kernels.h"

namespace {

#if defined(TM_AVX512) || defined(TM_AVX2)

// From this many tokens on (prefill: several passes over each pair of tiles), the batched path
// writes its outputs with streaming stores. Each tile's outputs for a token are a piece of a
// row of y, and the rows are ldy apart (a multiple of 4 KiB for most models: the same L1 set),
// so ordinary stores fetch every line first and evict one another; 1B-shape gate/up (16384 x
// 2048 Q4_K, 1 thread) at 512 tokens took 0.9x the time with streaming stores, the same at
// 32-64 tokens, where the next operation reads y soon after from the caches.
constexpr int64_t kStreamStoresMinM = 64;

// Writes the full 16-row tiles of a pass, [MC] x (NT x 16 outputs) from accbuf's rows (32
// floats apart), to y (row m at y + m * ldy) with streaming stores, whole aligned 64-byte lines
// at a time (bfloat16 needs both tiles of a pair for a line). False, writing nothing, where
// the lines are not whole or aligned.
template <int NT, typename TY>
inline bool store_lines_streaming(const float* accbuf, int64_t MC, TY* y, int64_t ldy) {
#ifdef TM_AVX512
  constexpr bool bf16 = !std::is_same_v<TY, float>;
  if constexpr (bf16 && NT != 2) return false;
  if (reinterpret_cast<uintptr_t>(y) % 64 != 0 || (ldy * sizeof(TY)) % 64 != 0) return false;
  for (int64_t m = 0; m < MC; ++m) {
    const float* a = accbuf + m * 32;
    TY* dst = y + m * ldy;
    if constexpr (bf16) {
      const __m512i line = _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16(_mm512_loadu_ps(a))),
                                              to_bf16(_mm512_loadu_ps(a + 16)), 1);
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), line);
    } else {
      for (int i = 0; i < NT; ++i) _mm512_stream_ps(dst + 16 * i, _mm512_loadu_ps(a + 16 * i));
    }
  }
  return true;
#else
  return false;
#endif
}

// Tiles nt0 .. nt0 + NT for tokens m0 .. m0 + MC (at most kBatchChunk): every block of the
// tiles is unpacked once and applied to all MC tokens; accumulators in `accbuf` ([MC][32]
// floats, L1).
template <int64_t Q, int NT, typename TY>
void tiles_batched(const uint8_t* w, int64_t tile_bytes, const BatchActs& acts, int64_t m0,
                   int64_t MC, int64_t K, const Epilogue& ep, TY* y, int64_t ldy, int64_t N,
                   int64_t nt0, float* accbuf) {
  const int64_t uk = unit_k(Q), ub = unit_bytes(Q), bpu = uk / 32;
  const int32_t* starts = acts.starts<Q>();
  for (int i = 0; i < NT; ++i) epilogue_fill(ep.at((nt0 + i) * 16, m0), MC, accbuf + 16 * i, 32);
  Block blk[NT];
  for (int64_t u = 0; u < K / uk; ++u) {
    // Small batches are bound by the weight stream, as at batch 1 (see for_each_block). The NT
    // tiles are contiguous and stream side by side, so each runs NT times as far ahead: with
    // short rows (a tile of a few KiB, like an output head's), the first tile's prefetches then
    // cover the start of the second, which would otherwise start cold (measured on the default
    // model's 49,152 x 576 Q8_0 head: 1.3-1.4x at 5-8 tokens, neutral on long rows). A K-type
    // unit's lines (36-53 per tile) are prefetched an eighth before each of its blocks, not all
    // before the first: a burst of ~100 prefetches waits on the 16 line-fill buffers while the
    // block's work could run (1B-shape Q4_K_M, 32 tokens, weights cold: 1.10-1.13x). Each line
    // also goes to L2 g_prefetch_l2 ahead, as at batch 1 (Sapphire Rapids, weights cycled from
    // DRAM, 2 threads: Q4_K 1.15x / 1.04x, Q6_K 1.22x / 1.08x, Q5_0 1.07x / 1.01x at 8 / 32
    // tokens).
    const int64_t lines = (ub + 63) / 64, per_block = (lines + bpu - 1) / bpu;
    const int64_t l1 = g_prefetch_l1, l2 = g_prefetch_l2;
    const uint8_t* unit[NT];  // unit u of each tile
    for (int i = 0; i < NT; ++i) unit[i] = w + (nt0 + i) * tile_bytes + u * ub;
    for (int b = 0; b < bpu; ++b) {
      for (int i = 0; i < NT; ++i) {
        const char* src = reinterpret_cast<const char*>(unit[i]);
        for (int64_t l = b * per_block; l < std::min(lines, (b + 1) * per_block); ++l) {
          if (l1) _mm_prefetch(src + NT * l1 + l * 64, _MM_HINT_T0);
          if (l2) _mm_prefetch(src + l2 + l * 64, _MM_HINT_T1);
        }
      }
      for (int i = 0; i < NT; ++i) unpack_block<Q>(unit[i], b, blk[i]);
      accumulate_batch<Q, NT>(blk, acts, starts, m0, MC, u * bpu + b, accbuf);
    }
  }
  if (acts.M > kStreamStoresMinM && (N - nt0 * 16) >= 16 * NT &&
      store_lines_streaming<NT>(accbuf, MC, y + m0 * ldy + nt0 * 16, ldy))
    return;
  for (int i = 0; i < NT; ++i) {
    const int64_t nt = nt0 + i;
    const int rows = static_cast<int>(std::min<int64_t>(16, N - nt * 16));
    for (int64_t m = 0; m < MC; ++m)
      store_row(F16::load(accbuf + m * 32 + 16 * i), y + (m0 + m) * ldy + nt * 16, rows);
  }
}

// Tokens per pass of the batched path: a pass's accumulators (64 x 32 floats) stay in L1, and
// larger batches (prefill) take several passes over each pair of tiles, which by then sits in L2.
constexpr int64_t kBatchChunk = 64;

// A batch's prepared activations (bytes, metadata and chain starts) are applied to all of a
// thread's tiles this many bytes' worth of tokens at a time (whole passes, at least one): a
// prefill's whole batch does not stay in L2 beside the weights streaming through (1B-shape, 512
// tokens: 1.75 MiB), and every pair of tiles then read it from L3. The weights are read again
// for each group, a few MB per GEMM, well within the memory bandwidth. 1B-shape Q4_K_M linears
// at 512 tokens, 2 threads, against one group: 1.07x (1.04-1.09x each; 512 KiB groups: 1.03x,
// 64 KiB: 1.06x); 128 tokens and the default model's 576-wide linears unchanged.
constexpr int64_t kActsL2Bytes = 256 * 1024;

// y = the quantized GEMM for 5+ tokens: pairs of tiles split over the threads, each pair applied
// to the batch in passes of at most kBatchChunk tokens, a group of passes (kActsL2Bytes) at a time.
template <int64_t Q, typename TY>
void gemm_batched(const uint8_t* w, const BatchActs& acts, int64_t N, int64_t K, const Epilogue& ep,
                  TY* y, int64_t ldy) {
  const int64_t M = acts.M, n_tiles = (N + 15) / 16, tile_bytes = K / unit_k(Q) * unit_bytes(Q);
  const int64_t passes = (M + kBatchChunk - 1) / kBatchChunk, chunk = (M + passes - 1) / passes;
  const int64_t token_bytes = K / 32 * (32 + sizeof(ActMeta) + (acts.starts<Q>() ? 8 : 0));
  const int64_t group = std::max<int64_t>(1, kActsL2Bytes / (token_bytes * chunk)) * chunk;
  at::parallel_for(0, (n_tiles + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> accbuf(chunk * 32);
    for (int64_t g0 = 0; g0 < M; g0 += group)
      for (int64_t p = begin; p < end; ++p)
        for (int64_t m0 = g0; m0 < std::min(M, g0 + group); m0 += chunk) {
          const int64_t mc = std::min(chunk, M - m0);
          if (2 * p + 1 < n_tiles)
            tiles_batched<Q, 2>(w, tile_bytes, acts, m0, mc, K, ep, y, ldy, N, 2 * p,
                                accbuf.data());
          else
            tiles_batched<Q, 1>(w, tile_bytes, acts, m0, mc, K, ep, y, ldy, N, 2 * p,
                                accbuf.data());
        }
    if (M > kStreamStoresMinM) _mm_sfence();  // the streaming stores, before the join
  });
}

#endif  // TM_AVX512 || TM_AVX2

}  // namespace
