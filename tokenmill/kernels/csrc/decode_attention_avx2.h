// Paged decode attention in 8-float vectors (AVX2 builds without AVX-512).
// Part of cpu_ops.cpp's translation unit: included there only.
#pragma once

#include "decode_attention.h"

namespace {

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)

// AVX2 versions of the decode attention loops, the AVX-512 kernel's structure in 8-float
// vectors. Sixteen registers cannot hold a head's query (a D = 64 head is 8 of them) beside
// the accumulators, so the scaled queries sit in L1 and each dot step reads them from there.
using vec_math::exp256;
using vec_math::load8;
using vec_math::store8;

// out[i] = sum of the lanes of a[i], for 8 vectors at once (a transposing tree of adds).
inline __m256 reduce_add8(const __m256* a) {
  const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

using vec_math::hsum8;

// The AVX2 twins of load_head / store_head: N vectors of 8 floats from p, in order for float32;
// for bfloat16 (N even), each 16 values (one 32-byte load) as their even and odd elements;
// float16 in order.
template <int N>
inline void load_vectors(const float* p, __m256* v) {
  for (int j = 0; j < N; ++j) v[j] = _mm256_loadu_ps(p + j * 8);
}
template <int N>
inline void load_vectors(const at::Half* p, __m256* v) {
  for (int j = 0; j < N; ++j) v[j] = load8(p + j * 8);
}
template <int N>
inline void load_vectors(const at::BFloat16* p, __m256* v) {
  static_assert(N % 2 == 0, "bfloat16 loads 16 values at a time");
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int j = 0; j < N; j += 2) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j * 8));
    v[j] = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    v[j + 1] = _mm256_castsi256_ps(_mm256_and_si256(w, high));
  }
}
// p[0:8N] = v * scale, from load_vectors' order.
template <int N>
inline void store_vectors(float* p, const __m256* v, float scale) {
  for (int j = 0; j < N; ++j) store8(p + j * 8, _mm256_mul_ps(v[j], _mm256_set1_ps(scale)));
}
template <int N>
inline void store_vectors(at::Half* p, const __m256* v, float scale) {
  for (int j = 0; j < N; ++j) store8(p + j * 8, _mm256_mul_ps(v[j], _mm256_set1_ps(scale)));
}
template <int N>
inline void store_vectors(at::BFloat16* p, const __m256* v, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  for (int j = 0; j < N; j += 2) {
    const __m256 even = _mm256_mul_ps(v[j], s), odd = _mm256_mul_ps(v[j + 1], s);
    // per 128-bit lane: lo = e0 o0 e1 o1 | e4 o4 e5 o5, hi = e2 o2 e3 o3 | e6 o6 e7 o7
    const __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
    store8(p + j * 8, _mm256_permute2f128_ps(lo, hi, 0x20));
    store8(p + j * 8 + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
}

// The query in the lane order of the cache's rows (TC), and the output back, as the AVX-512
// kernel's load_query / store_output.
template <typename TC, int N, typename TQ>
inline void load_query(const TQ* p, __m256* v) {
  if constexpr (std::is_same_v<TQ, TC>) {
    load_vectors<N>(p, v);
  } else {
    static_assert(std::is_same_v<TC, at::Half>, "a cache of another type is float16");
    for (int j = 0; j < N; ++j) v[j] = load8(p + j * 8);
  }
}
template <typename TC, int N, typename TQ>
inline void store_output(TQ* p, const __m256* v, float scale) {
  if constexpr (std::is_same_v<TQ, TC>) {
    store_vectors<N>(p, v, scale);
  } else {
    for (int j = 0; j < N; ++j) store8(p + j * 8, _mm256_mul_ps(v[j], _mm256_set1_ps(scale)));
  }
}

// One task per (request, kv head, chunk), as the AVX-512 kernel. ND = head_dim / 8 and REP are
// compile-time; the output is accumulated CH vectors of the head at a time, as many as fit the
// registers beside REP accumulators each (one pass over the chunk's scores per CH vectors; every
// pass reads its own bytes of the V rows).
template <typename TQ, typename TC, int ND, int REP>
void paged_decode_avx2(const TQ* q, const TC* kc, const TC* vc, const int32_t* bt, TQ* out,
                       int64_t Hq, int64_t Hkv, int64_t D, int64_t max_blocks, int64_t block_size,
                       float scale, int64_t q_stride, KvLayout kv, const DecodeSplit& split) {
  constexpr int CH = REP <= 2 ? 4 : REP <= 4 ? 2 : 1;
  static_assert(ND % CH == 0, "chunks split the head");
  const int64_t row_len = Hkv * D;
  // ob[c * 8 : (c + CH) * 8] = acc * scale, acc in the order the V rows were loaded in
  auto store_part = [](TQ* ob, const __m256* acc, float scale) {
    if constexpr (CH % 2 == 0)
      store_output<TC, CH>(ob, acc, scale);
    else
      for (int i = 0; i < CH; ++i) store8(ob + i * 8, _mm256_mul_ps(acc[i], _mm256_set1_ps(scale)));
  };
  at::parallel_for(0, split.tasks(), 1, [&](int64_t begin, int64_t end) {
    alignas(32) float scores[REP * kSplitTokens];
    alignas(32) float qs[REP][ND * 8];
    for (int64_t task = begin; task < end; ++task) {
      const DecodeTask tk = split.task(task);
      const int64_t b = tk.b, g = tk.g, t_begin = tk.t0, t_end = tk.t1;
      const int64_t L = t_end - t_begin, L8 = (L + 7) / 8 * 8;
      const TQ* qb = q + b * q_stride + g * REP * D;
      for (int h = 0; h < REP; ++h) {  // in load_vectors' order, as the K rows
        __m256 v[ND];
        load_query<TC, ND>(qb + h * D, v);
        for (int j = 0; j < ND; ++j)
          _mm256_store_ps(qs[h] + j * 8, _mm256_mul_ps(v[j], _mm256_set1_ps(scale)));
      }
      const int32_t* table = bt + b * max_blocks;
      auto row = [&](const TC* cache, int64_t t) {  // head g of token t
        return cache + (int64_t)table[t / block_size] * block_size * row_len +
               t % block_size * kv.token + g * kv.head;
      };
      auto prefetch = [&](const TC* cache, int64_t t) {
        if (t >= t_end) return;
        const char* r = reinterpret_cast<const char*>(row(cache, t));
        for (int64_t off = 0; off < D * (int64_t)sizeof(TC); off += 64)
          _mm_prefetch(r + off, _MM_HINT_T0);
      };
      // The rows come from DRAM at batch sizes where the caches outgrow L3, and a token's dot
      // steps take a few dozen cycles: K is fetched kAhead tokens ahead, and V, when the
      // chunk's rows of this head fit half of L2, while the scores are computed (else
      // kAhead tokens ahead of the first output pass).
      constexpr int64_t kAhead = 32;
      const bool v_early = L * D * (int64_t)sizeof(TC) <= (128 << 10);
      for (int64_t t = t_begin; t < t_begin + kAhead; ++t) prefetch(kc, t);
      // scores[h, t] = q_h . k_t, 8 tokens at a time (rows past the end repeat the last one)
      for (int64_t t0 = t_begin; t0 < t_end; t0 += 8) {
        __m256 part[REP][8];
        for (int o = 0; o < 8; ++o) {
          prefetch(kc, t0 + o + kAhead);
          if (v_early) prefetch(vc, t0 + o);
          const TC* kp = row(kc, std::min<int64_t>(t0 + o, t_end - 1));
          __m256 k[ND];
          load_vectors<ND>(kp, k);
          for (int h = 0; h < REP; ++h) {
            __m256 acc = _mm256_mul_ps(_mm256_load_ps(qs[h]), k[0]);
            for (int j = 1; j < ND; ++j)
              acc = _mm256_fmadd_ps(_mm256_load_ps(qs[h] + j * 8), k[j], acc);
            part[h][o] = acc;
          }
        }
        for (int h = 0; h < REP; ++h)
          _mm256_storeu_ps(scores + h * L8 + (t0 - t_begin), reduce_add8(part[h]));
      }
      // softmax numerators per head (zero past the end); the 1/sum is applied to the output
      float row_max[REP], sum[REP];
      const __m256 tail =
          _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(L - (L8 - 8))),
                                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
      for (int h = 0; h < REP; ++h) {
        float* sr = scores + h * L8;
        __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
        for (int64_t t = 0; t < L8 - 8; t += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(sr + t));
        mx = _mm256_max_ps(mx, _mm256_blendv_ps(mx, _mm256_loadu_ps(sr + L8 - 8), tail));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        row_max[h] = _mm_cvtss_f32(m4);
        const __m256 m = _mm256_set1_ps(row_max[h]);
        __m256 total = _mm256_setzero_ps();
        for (int64_t t = 0; t < L8; t += 8) {
          __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sr + t), m));
          if (t == L8 - 8) e = _mm256_and_ps(e, tail);
          _mm256_storeu_ps(sr + t, e);
          total = _mm256_add_ps(total, e);
        }
        sum[h] = hsum8(total);
      }
      // out_h = sum_t p[h, t] v_t / sum_h, CH vectors of the head per pass; a split request's
      // chunk keeps its unnormalized sums in `part` instead
      TQ* ob = out + b * Hq * D + g * REP * D;
      float* part = tk.nc == 1 ? nullptr : split.partial(task);
      for (int c = 0; c < ND; c += CH) {
        __m256 acc[REP][CH];
        for (int h = 0; h < REP; ++h)
          for (int i = 0; i < CH; ++i) acc[h][i] = _mm256_setzero_ps();
        if (c == 0 && !v_early)
          for (int64_t t = t_begin; t < t_begin + kAhead; ++t) prefetch(vc, t);
        for (int64_t t0 = t_begin; t0 < t_end;) {
          const int64_t o0 = t0 % block_size, n = std::min(block_size - o0, t_end - t0);
          const TC* vb =
              vc + (int64_t)table[t0 / block_size] * block_size * row_len + g * kv.head + c * 8;
          for (int64_t o = o0; o < o0 + n; ++o) {
            const int64_t t = t0 + o - o0;
            if (c == 0 && !v_early) prefetch(vc, t + kAhead);
            const TC* vp = vb + o * kv.token;
            const float* p = scores + (t - t_begin);
            __m256 v[CH];
            if constexpr (CH % 2 == 0)
              load_vectors<CH>(vp, v);
            else
              for (int i = 0; i < CH; ++i) v[i] = load8(vp + i * 8);
            for (int h = 0; h < REP; ++h) {
              const __m256 ph = _mm256_broadcast_ss(p + h * L8);
              for (int i = 0; i < CH; ++i) acc[h][i] = _mm256_fmadd_ps(ph, v[i], acc[h][i]);
            }
          }
          t0 += n;
        }
        for (int h = 0; h < REP; ++h)
          if (part)
            for (int i = 0; i < CH; ++i) _mm256_storeu_ps(part + h * D + (c + i) * 8, acc[h][i]);
          else
            store_part(ob + h * D + c * 8, acc[h], 1.f / sum[h]);
      }
      if (!part || !split.finish_chunk(task, tk, row_max, sum)) continue;
      alignas(32) float merged[REP * ND * 8];
      float inv_sum[REP];
      split.merge(tk, merged, inv_sum);
      for (int h = 0; h < REP; ++h)
        for (int c = 0; c < ND; c += CH) {
          __m256 v[CH];
          for (int i = 0; i < CH; ++i) v[i] = _mm256_load_ps(merged + h * D + (c + i) * 8);
          store_part(ob + h * D + c * 8, v, inv_sum[h]);
        }
    }
  });
}

// The kernel family of this build: paged_decode_avx2<TQ, TC, ND = head_dim / 8, REP>.
template <typename TQ, typename TC, int ND, int REP>
constexpr auto paged_decode_vector = paged_decode_avx2<TQ, TC, ND, REP>;
constexpr int kDecodeLanes = 8;

#endif  // !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)

}  // namespace
