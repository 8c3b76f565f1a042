// Paged decode attention in 16-float vectors (AVX-512 builds).
// Part of cpu_ops.cpp's translation unit: included there only.
#pragma once

#include "decode_attention.h"

namespace {

#if defined(__AVX512F__)

// AVX-512 versions of the hot loops. Same math as the generic kernels (float32 accumulation);
// only the summation order inside a dot product differs.
using vec_math::exp512;
using vec_math::load16;
using vec_math::store16;

// Sums of 16 vectors at once: out[i] = sum of the lanes of a[i] (a transposing tree of adds,
// ~3 instructions per sum instead of ~8 for a separate horizontal reduction each).
inline __m512 reduce_add16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88),
                       _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
}

// A head's D values as ND vectors of 16 floats, in the kernel's lane order: D / 16 vectors in
// order for float32; for bfloat16, each 32 values (one 64-byte load) as two vectors, their even
// and odd elements (a bfloat16 pair as a 32-bit word: the even one is its low half shifted up,
// the odd one its high half kept): two instructions per 32 values, where widening each 16 in
// order takes two per 16. Dot products and sums over a head do not depend on the lane order;
// store_head puts the values back in order. float16 (a KV cache's type) loads in order too.
template <int ND>
inline void load_head(const float* p, __m512* v) {
  for (int j = 0; j < ND; ++j) v[j] = _mm512_loadu_ps(p + j * 16);
}
template <int ND>
inline void load_head(const at::Half* p, __m512* v) {
  for (int j = 0; j < ND; ++j) v[j] = load16(p + j * 16);
}
template <int ND>
inline void load_head(const at::BFloat16* p, __m512* v) {
  static_assert(ND % 2 == 0, "bfloat16 heads load 32 values at a time");
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int j = 0; j < ND; j += 2) {
    const __m512i w = _mm512_loadu_si512(p + j * 16);
    v[j] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    v[j + 1] = _mm512_castsi512_ps(_mm512_and_si512(w, high));
  }
}
// p[0:D] = v * scale, from load_head's lane order.
template <int ND>
inline void store_head(float* p, const __m512* v, float scale) {
  for (int j = 0; j < ND; ++j)
    _mm512_storeu_ps(p + j * 16, _mm512_mul_ps(v[j], _mm512_set1_ps(scale)));
}
template <int ND>
inline void store_head(at::Half* p, const __m512* v, float scale) {
  for (int j = 0; j < ND; ++j) store16(p + j * 16, _mm512_mul_ps(v[j], _mm512_set1_ps(scale)));
}
template <int ND>
inline void store_head(at::BFloat16* p, const __m512* v, float scale) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512 s = _mm512_set1_ps(scale);
  for (int j = 0; j < ND; j += 2) {
    const __m512 even = _mm512_mul_ps(v[j], s), odd = _mm512_mul_ps(v[j + 1], s);
    store16(p + j * 16, _mm512_permutex2var_ps(even, lo, odd));
    store16(p + j * 16 + 16, _mm512_permutex2var_ps(even, hi, odd));
  }
}

// The query in the lane order of the cache's rows (TC): load_head's own for a cache of the
// query's type; in order beside a float16 cache. The output back from that order.
template <typename TC, int ND, typename TQ>
inline void load_query(const TQ* p, __m512* v) {
  if constexpr (std::is_same_v<TQ, TC>) {
    load_head<ND>(p, v);
  } else {
    static_assert(std::is_same_v<TC, at::Half>, "a cache of another type is float16");
    for (int j = 0; j < ND; ++j) v[j] = load16(p + j * 16);
  }
}
template <typename TC, int ND, typename TQ>
inline void store_output(TQ* p, const __m512* v, float scale) {
  if constexpr (std::is_same_v<TQ, TC>) {
    store_head<ND>(p, v, scale);
  } else {
    for (int j = 0; j < ND; ++j) store16(p + j * 16, _mm512_mul_ps(v[j], _mm512_set1_ps(scale)));
  }
}

// One task per (request, kv head, chunk of the context: DecodeSplit): its REP query heads read
// that head's K and V rows of the chunk once. ND = head_dim / 16 and REP are compile-time so the
// accumulators live in registers.
template <typename TQ, typename TC, int ND, int REP>
void paged_decode_avx512(const TQ* q, const TC* kc, const TC* vc, const int32_t* bt, TQ* out,
                         int64_t Hq, int64_t Hkv, int64_t D, int64_t max_blocks, int64_t block_size,
                         float scale, int64_t q_stride, KvLayout kv, const DecodeSplit& split) {
  const int64_t row_len = Hkv * D;
  at::parallel_for(0, split.tasks(), 1, [&](int64_t begin, int64_t end) {
    alignas(64) float scores[REP * kSplitTokens];
    for (int64_t task = begin; task < end; ++task) {
      const DecodeTask tk = split.task(task);
      const int64_t b = tk.b, g = tk.g, t_begin = tk.t0, t_end = tk.t1;
      const int64_t L = t_end - t_begin, L16 = (L + 15) / 16 * 16;
      const TQ* qb = q + b * q_stride + g * REP * D;
      __m512 qv[REP][ND];
      for (int h = 0; h < REP; ++h) {
        load_query<TC, ND>(qb + h * D, qv[h]);
        for (int j = 0; j < ND; ++j) qv[h][j] = _mm512_mul_ps(qv[h][j], _mm512_set1_ps(scale));
      }
      const int32_t* table = bt + b * max_blocks;
      // The rows of one head (2 * D bytes each; contiguous within a block in the head-major
      // layout) sit in blocks scattered through the pool: fetch the next 16 tokens' K (or V)
      // rows while this group is being computed.
      auto row = [&](const TC* cache, int64_t t) {  // head g of token t
        return cache + (int64_t)table[t / block_size] * block_size * row_len +
               t % block_size * kv.token + g * kv.head;
      };
      auto prefetch_rows = [&](const TC* cache, int64_t t0) {
        const int64_t n = std::min<int64_t>(16, t_end - t0);
        for (int64_t o = 0; o < n; ++o) {
          const char* r = reinterpret_cast<const char*>(row(cache, t0 + o));
          for (int64_t off = 0; off < D * (int64_t)sizeof(TC); off += 64)
            _mm_prefetch(r + off, _MM_HINT_T0);
        }
      };
      // scores[h, t] = q_h . k_t, 16 tokens at a time (rows past the end repeat the last one)
      prefetch_rows(kc, t_begin);
      for (int64_t t0 = t_begin; t0 < t_end; t0 += 16) {
        if (t0 + 16 < t_end)
          prefetch_rows(kc, t0 + 16);
        else
          prefetch_rows(vc, t_begin);
        __m512 part[REP][16];
        for (int o = 0; o < 16; ++o) {
          const int64_t t = std::min<int64_t>(t0 + o, t_end - 1);
          const TC* kp = row(kc, t);
          __m512 k[ND];
          load_head<ND>(kp, k);
          for (int h = 0; h < REP; ++h) {
            __m512 acc = _mm512_mul_ps(qv[h][0], k[0]);
            for (int j = 1; j < ND; ++j) acc = _mm512_fmadd_ps(qv[h][j], k[j], acc);
            part[h][o] = acc;
          }
        }
        for (int h = 0; h < REP; ++h)
          _mm512_storeu_ps(scores + h * L16 + (t0 - t_begin), reduce_add16(part[h]));
      }
      // softmax numerators per head; the 1/sum is applied to the output
      float row_max[REP], sum[REP];
      const __mmask16 tail = (__mmask16)((1u << (L - (L16 - 16))) - 1u);
      for (int h = 0; h < REP; ++h) {
        float* sr = scores + h * L16;
        __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        for (int64_t t = 0; t < L16 - 16; t += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sr + t));
        mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, sr + L16 - 16));
        row_max[h] = _mm512_reduce_max_ps(mx);
        const __m512 m = _mm512_set1_ps(row_max[h]);
        __m512 total = _mm512_setzero_ps();
        for (int64_t t = 0; t < L16; t += 16) {
          __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + t), m));
          if (t == L16 - 16) e = _mm512_maskz_mov_ps(tail, e);
          _mm512_storeu_ps(sr + t, e);
          total = _mm512_add_ps(total, e);
        }
        sum[h] = _mm512_reduce_add_ps(total);
      }
      // out_h = sum_t p[h, t] v_t / sum_h
      __m512 acc[REP][ND];
      for (int h = 0; h < REP; ++h)
        for (int j = 0; j < ND; ++j) acc[h][j] = _mm512_setzero_ps();
      for (int64_t t0 = t_begin; t0 < t_end;) {
        const int64_t o0 = t0 % block_size, n = std::min(block_size - o0, t_end - t0);
        const TC* vb = vc + (int64_t)table[t0 / block_size] * block_size * row_len + g * kv.head;
        for (int64_t o = o0; o < o0 + n; ++o) {
          const int64_t t = t0 + o - o0;
          // every 16 tokens, the next 16 tokens' V rows (whatever the block size)
          if ((t - t_begin) % 16 == 0 && t + 16 < t_end) prefetch_rows(vc, t + 16);
          const TC* vp = vb + o * kv.token;
          const float* p = scores + (t - t_begin);
          __m512 v[ND];
          load_head<ND>(vp, v);
          for (int j = 0; j < ND; ++j)
            for (int h = 0; h < REP; ++h)
              acc[h][j] = _mm512_fmadd_ps(_mm512_set1_ps(p[h * L16]), v[j], acc[h][j]);
        }
        t0 += n;
      }
      TQ* ob = out + b * Hq * D + g * REP * D;
      if (tk.nc == 1) {
        for (int h = 0; h < REP; ++h) store_output<TC, ND>(ob + h * D, acc[h], 1.f / sum[h]);
        continue;
      }
      float* part = split.partial(task);
      for (int h = 0; h < REP; ++h)
        for (int j = 0; j < ND; ++j) _mm512_storeu_ps(part + h * D + j * 16, acc[h][j]);
      if (!split.finish_chunk(task, tk, row_max, sum)) continue;
      alignas(64) float merged[REP * ND * 16];
      float inv_sum[REP];
      split.merge(tk, merged, inv_sum);
      for (int h = 0; h < REP; ++h) {
        for (int j = 0; j < ND; ++j) acc[h][j] = _mm512_load_ps(merged + h * D + j * 16);
        store_output<TC, ND>(ob + h * D, acc[h], inv_sum[h]);
      }
    }
  });
}

// The kernel family of this build: paged_decode_avx512<TQ, TC, ND = head_dim / 16, REP>.
template <typename TQ, typename TC, int ND, int REP>
constexpr auto paged_decode_vector = paged_decode_avx512<TQ, TC, ND, REP>;
constexpr int kDecodeLanes = 16;

#endif  // defined(__AVX512F__)

}  // namespace
