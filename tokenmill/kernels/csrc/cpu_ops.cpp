// Fused CPU kernels for the decode hot path (float32 and bfloat16; KV caches also float16).
//
// Each op replaces a chain of small PyTorch ops whose launch overhead dominates a decode step on
// CPU. Numerics follow the reference PyTorch formulas (float32 accumulation, rounding to the
// tensor dtype where the reference rounds).
#include "cpu_ops.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "vec_math.h"

namespace {

using vec_math::from_f;
using vec_math::tf;

// Paged attention for single-query requests.
// q [B, Hq, D] (row stride q_stride, heads contiguous) in TQ; k_cache, v_cache in layout kv (see
// KvLayout), in TC (TQ, or float16 beside it: --kv-cache-dtype); block_tables [B, max_blocks]
// int32; seq_lens [B] int32; out [B, Hq, D] contiguous, in TQ.
// Query heads g*rep .. g*rep+rep-1 share kv head g.
template <typename TQ, typename TC>
void paged_decode_kernel(const TQ* q, const TC* kc, const TC* vc, const int32_t* bt,
                         const int32_t* seq_lens, TQ* out, int64_t B, int64_t Hq, int64_t Hkv,
                         int64_t D, int64_t max_blocks, int64_t block_size, float scale,
                         int64_t q_stride, KvLayout kv) {
  // One task per request, walking its blocks in order; a token's kv heads are gathered into
  // `row` as float. scores: [Hq, S].
  const int64_t rep = Hq / Hkv, row_len = Hkv * D;
  // token o of the block at `base` (block id * block_size * row_len), every kv head -> row
  auto gather = [&](const TC* cache, int64_t base, int64_t o, float* row) {
    for (int64_t g = 0; g < Hkv; ++g) {
      const TC* p = cache + base + o * kv.token + g * kv.head;
      for (int64_t d = 0; d < D; ++d) row[g * D + d] = tf(p[d]);
    }
  };
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(Hq * D), acc(Hq * D), row(row_len), scores;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t S = seq_lens[b];
      scores.resize(Hq * S);
      for (int64_t i = 0; i < Hq * D; ++i) qf[i] = tf(q[b * q_stride + i]) * scale;
      const int32_t* table = bt + b * max_blocks;
      for (int64_t t0 = 0; t0 < S; t0 += block_size) {
        const int64_t base = (int64_t)table[t0 / block_size] * block_size * row_len;
        const int64_t n = std::min(block_size, S - t0);
        for (int64_t o = 0; o < n; ++o) {
          gather(kc, base, o, row.data());
          for (int64_t h = 0; h < Hq; ++h) {
            const float* qh = qf.data() + h * D;
            const float* kh = row.data() + (h / rep) * D;
            float s = 0.f;
            for (int64_t d = 0; d < D; ++d) s += qh[d] * kh[d];
            scores[h * S + t0 + o] = s;
          }
        }
      }
      for (int64_t h = 0; h < Hq; ++h) {
        float* sr = scores.data() + h * S;
        float mx = -std::numeric_limits<float>::max();
        for (int64_t t = 0; t < S; ++t) mx = std::max(mx, sr[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < S; ++t) {
          sr[t] = std::exp(sr[t] - mx);
          sum += sr[t];
        }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < S; ++t) sr[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = 0; t0 < S; t0 += block_size) {
        const int64_t base = (int64_t)table[t0 / block_size] * block_size * row_len;
        const int64_t n = std::min(block_size, S - t0);
        for (int64_t o = 0; o < n; ++o) {
          gather(vc, base, o, row.data());
          for (int64_t h = 0; h < Hq; ++h) {
            const float p = scores[h * S + t0 + o];
            const float* vh = row.data() + (h / rep) * D;
            float* ah = acc.data() + h * D;
            for (int64_t d = 0; d < D; ++d) ah[d] += p * vh[d];
          }
        }
      }
      for (int64_t i = 0; i < Hq * D; ++i) out[b * Hq * D + i] = from_f<TQ>(acc[i]);
    }
  });
}

// Split-KV decoding for the vectorized kernels. Request b's context of S tokens is cut into
// ceil(S / kSplitTokens) chunks of equal length (a multiple of 16 tokens), one task per (request,
// kv head, chunk). Without it, batch 1 of a model with 3 kv heads gives 2 threads 3 tasks (one
// idles a third of the time), and a batch's one long request is one thread's long tail. The cuts
// depend on S alone, so a request's output does not depend on its batch. A chunk's task keeps its
// heads' unnormalized output, softmax maximum and sum (`partial`); the task that finishes a
// (request, kv head) last merges its chunks in chunk order with log-sum-exp weights, so the result
// does not depend on the threads' timing either. An unsplit request (S <= kSplitTokens) writes
// its output directly, as before the split existed.
constexpr int64_t kSplitTokens = 256;

struct DecodeTask {
  int64_t b, g;    // request, kv head
  int64_t nc;      // the request's chunks
  int64_t t0, t1;  // this chunk's tokens [t0, t1)
};

class DecodeSplit {
 public:
  // rep * (d + 2) floats per task of a split request: its heads' outputs, maxima, sums.
  DecodeSplit(const int32_t* seq_lens, int64_t B, int64_t Hkv, int64_t rep, int64_t d)
      : Hkv_(Hkv), rep_(rep), d_(d), seq_lens_(seq_lens), first_(B + 1), len_(B) {
    bool split = false;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t S = seq_lens[b];
      const int64_t parts = (S + kSplitTokens - 1) / kSplitTokens;
      len_[b] = parts == 1 ? S : ((S + parts - 1) / parts + 15) / 16 * 16;
      const int64_t nc = (S + len_[b] - 1) / len_[b];
      first_[b + 1] = first_[b] + Hkv * nc;
      split |= nc > 1;
    }
    if (split) {
      partial_.reset(new float[first_[B] * rep_ * (d_ + 2)]);
      done_.reset(new std::atomic<int>[B * Hkv]);
      for (int64_t i = 0; i < B * Hkv; ++i) done_[i].store(0, std::memory_order_relaxed);
    }
  }
  int64_t tasks() const { return first_.back(); }
  DecodeTask task(int64_t i) const {
    const int64_t b = std::upper_bound(first_.begin(), first_.end(), i) - first_.begin() - 1;
    const int64_t nc = (first_[b + 1] - first_[b]) / Hkv_, r = i - first_[b];
    const int64_t t0 = r % nc * len_[b];
    return {b, r / nc, nc, t0, std::min<int64_t>(seq_lens_[b], t0 + len_[b])};
  }
  float* partial(int64_t i) const { return partial_.get() + i * rep_ * (d_ + 2); }
  // Records task i's (chunk t's) softmax maxima and sums beside its outputs, already in
  // partial(i); true for the last chunk of its (request, kv head) to finish, whose task then
  // merges. The acquire-release count makes every chunk's partial visible to that task.
  bool finish_chunk(int64_t i, const DecodeTask& t, const float* row_max, const float* sum) const {
    std::copy(row_max, row_max + rep_, partial(i) + rep_ * d_);
    std::copy(sum, sum + rep_, partial(i) + rep_ * d_ + rep_);
    return done_[t.b * Hkv_ + t.g].fetch_add(1, std::memory_order_acq_rel) == t.nc - 1;
  }
  // The merged output of t's (request, kv head), in the kernel's lane order, into out[rep * d],
  // and each head's 1 / softmax sum into inv_sum[rep].
  void merge(const DecodeTask& t, float* out, float* inv_sum) const {
    const int64_t first = first_[t.b] + t.g * t.nc, rep = rep_, d = d_;
    std::fill(out, out + rep * d, 0.f);
    for (int64_t h = 0; h < rep; ++h) {
      float m = -std::numeric_limits<float>::infinity(), sum = 0.f;
      for (int64_t c = 0; c < t.nc; ++c) m = std::max(m, partial(first + c)[rep * d + h]);
      for (int64_t c = 0; c < t.nc; ++c) {
        const float* p = partial(first + c);
        const float w = std::exp(p[rep * d + h] - m);
        sum += w * p[rep * d + rep + h];
        for (int64_t i = 0; i < d; ++i) out[h * d + i] += w * p[h * d + i];
      }
      inv_sum[h] = 1.f / sum;
    }
  }

 private:
  int64_t Hkv_, rep_, d_;
  const int32_t* seq_lens_;
  std::vector<int64_t> first_, len_;  // first task of each request (and the total); chunk length
  std::unique_ptr<float[]> partial_;
  std::unique_ptr<std::atomic<int>[]> done_;
};

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
#elif defined(__AVX2__) && defined(__FMA__)
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
#endif  // __AVX512F__ / __AVX2__

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
template <typename TQ, typename TC>
using DecodeFn = void (*)(const TQ*, const TC*, const TC*, const int32_t*, TQ*, int64_t, int64_t,
                          int64_t, int64_t, int64_t, float, int64_t, KvLayout, const DecodeSplit&);

// The kernel for REP = 1 + index into REPS.
template <typename TQ, typename TC, int ND, int... REPS>
DecodeFn<TQ, TC> pick_rep(int64_t rep, std::integer_sequence<int, REPS...>) {
  constexpr DecodeFn<TQ, TC> kernels[] = {paged_decode_vector<TQ, TC, ND, REPS + 1>...};
  return rep >= 1 && rep <= static_cast<int64_t>(sizeof...(REPS)) ? kernels[rep - 1] : nullptr;
}

// The vectorized kernel for this head geometry (head_dim 64 or 128, up to 8 query heads per kv
// head), or nullptr: the portable kernel then runs.
template <typename TQ, typename TC>
DecodeFn<TQ, TC> vector_decode_kernel(int64_t Hq, int64_t Hkv, int64_t D) {
  const auto reps = std::make_integer_sequence<int, 8>{};
  if (D == 64) return pick_rep<TQ, TC, 64 / kDecodeLanes>(Hq / Hkv, reps);
  if (D == 128) return pick_rep<TQ, TC, 128 / kDecodeLanes>(Hq / Hkv, reps);
  return nullptr;
}
#endif

// The index of the first maximum of row[0:V] (torch.argmax's choice).
template <typename T>
int64_t argmax_row(const T* row, int64_t V) {
  int64_t v0 = 0;
  float best = -std::numeric_limits<float>::infinity();
  int64_t best_i = 0;
#if defined(__AVX512F__)
  if (V >= 16) {
    __m512 mx = load16(row);
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i cur = idx;
    const __m512i step = _mm512_set1_epi32(16);
    for (v0 = 16; v0 + 16 <= V; v0 += 16) {
      cur = _mm512_add_epi32(cur, step);
      const __m512 v = load16(row + v0);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, mx, _CMP_GT_OQ);
      mx = _mm512_mask_mov_ps(mx, gt, v);
      idx = _mm512_mask_mov_epi32(idx, gt, cur);
    }
    alignas(64) float mv[16];
    alignas(64) int32_t iv[16];
    _mm512_store_ps(mv, mx);
    _mm512_store_si512(iv, idx);
    best = mv[0];
    best_i = iv[0];
    for (int l = 1; l < 16; ++l)
      if (mv[l] > best || (mv[l] == best && iv[l] < best_i)) {
        best = mv[l];
        best_i = iv[l];
      }
  }
#endif
  for (int64_t i = v0; i < V; ++i) {
    const float v = tf(row[i]);
    if (v > best || (i == 0)) {
      best = v;
      best_i = i;
    }
  }
  return best_i;
}

// Row-wise argmax (first index of the maximum, as torch.argmax) of x [R, V].
template <typename T>
void argmax_rows_kernel(const T* x, int64_t* out, int64_t R, int64_t V) {
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) out[r] = argmax_row(x + r * V, V);
  });
}

// ---- Sampling: a row's argmax at temperature 0, else the inverse CDF of softmax(row / T) ----
// Two levels, as sampler.py's inverse_cdf: the masses of blocks of kCdfBlock tokens pick the
// block, then one block's float64 cumulative sum picks the token. The terms exp(x / T - max) are
// not normalized (the target is u x their total) and those with an exponent below kExpFloor are
// 0: a masked (-inf) token exactly, any other below float's normal range (< 1.2e-38 of the most
// likely token's probability).
constexpr int64_t kCdfBlock = 256;
constexpr float kExpFloor = -87.f;

#if defined(__AVX512F__)
constexpr int kSampleLanes = 16;
using SampleVec = __m512;
inline SampleVec sample_set1(float v) { return _mm512_set1_ps(v); }
inline SampleVec sample_load(const float* p) { return _mm512_loadu_ps(p); }
inline void sample_store(float* p, SampleVec v) { _mm512_storeu_ps(p, v); }
inline SampleVec sample_add(SampleVec a, SampleVec b) { return _mm512_add_ps(a, b); }
inline SampleVec sample_max(SampleVec a, SampleVec b) { return _mm512_max_ps(a, b); }
inline float sample_hsum(SampleVec v) { return _mm512_reduce_add_ps(v); }
inline float sample_hmax(SampleVec v) { return _mm512_reduce_max_ps(v); }
// exp(x / t - m) per lane, 0 where the exponent is below kExpFloor (or NaN)
inline SampleVec softmax_terms(SampleVec x, SampleVec t, SampleVec m) {
  const __m512 e = _mm512_sub_ps(_mm512_div_ps(x, t), m);
  const __mmask16 keep = _mm512_cmp_ps_mask(e, _mm512_set1_ps(kExpFloor), _CMP_GE_OQ);
  return _mm512_maskz_mov_ps(keep, vec_math::exp512(e));
}
#else
constexpr int kSampleLanes = 8;
using SampleVec = __m256;
inline SampleVec sample_set1(float v) { return _mm256_set1_ps(v); }
inline SampleVec sample_load(const float* p) { return _mm256_loadu_ps(p); }
inline void sample_store(float* p, SampleVec v) { _mm256_storeu_ps(p, v); }
inline SampleVec sample_add(SampleVec a, SampleVec b) { return _mm256_add_ps(a, b); }
inline SampleVec sample_max(SampleVec a, SampleVec b) { return _mm256_max_ps(a, b); }
inline float sample_hsum(SampleVec v) { return vec_math::hsum8(v); }
inline float sample_hmax(SampleVec v) { return vec_math::hmax8(v); }
inline SampleVec softmax_terms(SampleVec x, SampleVec t, SampleVec m) {
  const __m256 e = _mm256_sub_ps(_mm256_div_ps(x, t), m);
  const __m256 keep = _mm256_cmp_ps(e, _mm256_set1_ps(kExpFloor), _CMP_GE_OQ);
  return _mm256_and_ps(keep, vec_math::exp256(e));
}
#endif

// x[0:n] (n <= kSampleLanes) in a vector, padded with -inf (a term of 0, never a maximum).
inline SampleVec sample_load_tail(const float* x, int64_t n) {
  float pad[kSampleLanes];
  std::fill(pad, pad + kSampleLanes, -std::numeric_limits<float>::infinity());
  std::memcpy(pad, x, n * sizeof(float));
  return sample_load(pad);
}

inline float row_max(const float* x, int64_t V) {
  SampleVec mx = sample_set1(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kSampleLanes <= V; i += kSampleLanes) mx = sample_max(mx, sample_load(x + i));
  if (i < V) mx = sample_max(mx, sample_load_tail(x + i, V - i));
  return sample_hmax(mx);
}

// The terms of x[0:n] (n <= kCdfBlock) into p (when not null); returns their float sum.
inline float block_terms(const float* x, int64_t n, float t, float m, float* p) {
  const SampleVec tv = sample_set1(t), mv = sample_set1(m);
  SampleVec acc = sample_set1(0.f);
  int64_t i = 0;
  for (; i + kSampleLanes <= n; i += kSampleLanes) {
    const SampleVec e = softmax_terms(sample_load(x + i), tv, mv);
    if (p != nullptr) sample_store(p + i, e);
    acc = sample_add(acc, e);
  }
  if (i < n) {
    const SampleVec e = softmax_terms(sample_load_tail(x + i, n - i), tv, mv);
    if (p != nullptr) {
      float tail[kSampleLanes];
      sample_store(tail, e);
      std::memcpy(p + i, tail, (n - i) * sizeof(float));
    }
    acc = sample_add(acc, e);
  }
  return sample_hsum(acc);
}

// In a non-decreasing c[0:n], the first index whose value exceeds target, capped at the first
// index that holds the total (the last one that adds mass: rounding can put the target at or
// past the total).
inline int64_t first_above(const double* c, int64_t n, double target) {
  const int64_t first = std::upper_bound(c, c + n, target) - c;
  const int64_t last = std::lower_bound(c, c + n, c[n - 1]) - c;
  return std::min(first, last);
}

int64_t sample_row(const float* x, int64_t V, float t, double u) {
  if (!(t > 0.f)) return argmax_row(x, V);
  const float mx = row_max(x, V);
  // Every token masked: nothing to sample from. (A bit test: -ffast-math lets the compiler
  // assume a comparison with -inf false.)
  uint32_t mx_bits;
  std::memcpy(&mx_bits, &mx, sizeof(mx_bits));
  if (mx_bits == 0xFF800000u) return argmax_row(x, V);
  const float m = mx / t;  // = max(x / t): the division is monotonic and correctly rounded
  const int64_t nb = (V + kCdfBlock - 1) / kCdfBlock;
  std::vector<double> cdf(nb + 1, 0.0);  // cdf[b]: the mass of the blocks before block b
  for (int64_t b = 0; b < nb; ++b)
    cdf[b + 1] = cdf[b] + block_terms(x + b * kCdfBlock, std::min(kCdfBlock, V - b * kCdfBlock), t,
                                      m, nullptr);
  const double target = u * cdf[nb];
  const int64_t b = std::max<int64_t>(first_above(cdf.data(), nb + 1, target) - 1, 0);
  const int64_t n = std::min(kCdfBlock, V - b * kCdfBlock);
  float p[kCdfBlock];
  block_terms(x + b * kCdfBlock, n, t, m, p);
  double inner[kCdfBlock];
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) inner[i] = sum += p[i];
  return b * kCdfBlock + first_above(inner, n, target - cdf[b]);
}

// dst[0:D] = src[0:D] in dst's type (rounded to nearest even; a copy when the types match).
template <typename TS, typename TC>
inline void copy_row(TC* dst, const TS* src, int64_t D) {
  if constexpr (std::is_same_v<TS, TC>) {
    std::memcpy(dst, src, D * sizeof(TC));
  } else {
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) vec_math::store8(dst + d, vec_math::load8(src + d));
    for (; d < D; ++d) dst[d] = from_f<TC>(tf(src[d]));
  }
}

// k_cache[slot_mapping[n]] = k[n] (and v): Hkv rows of D elements each, into a cache of layout
// kv, converted from TS to the cache's TC; k, v may be strided views.
template <typename TS, typename TC>
void write_kv_kernel(const TS* k, const TS* v, TC* kc, TC* vc, const int64_t* slots, int64_t N,
                     int64_t Hkv, int64_t D, KvLayout kv, int64_t k_stride, int64_t v_stride) {
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t g = 0; g < Hkv; ++g) {
        const int64_t at = kv.at(slots[n], g, Hkv * D);
        copy_row(kc + at, k + n * k_stride + g * D, D);
        copy_row(vc + at, v + n * v_stride + g * D, D);
      }
  });
}

// residual += delta (rounded to T), out = weight * T(rmsnorm(residual)), per row.
template <typename T>
void add_rms_norm_kernel(T* residual, const T* delta, const T* weight, T* out, int64_t N, int64_t H,
                         float eps) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> x(H);
    for (int64_t n = begin; n < end; ++n) {
      T* res = residual + n * H;
      float ss = 0.f;
      for (int64_t h = 0; h < H; ++h) {
        T v = delta ? from_f<T>(tf(res[h]) + tf(delta[n * H + h])) : res[h];
        res[h] = v;
        x[h] = tf(v);
        ss += x[h] * x[h];
      }
      const float inv = 1.f / std::sqrt(ss / H + eps);
      for (int64_t h = 0; h < H; ++h)
        out[n * H + h] = from_f<T>(tf(weight[h]) * tf(from_f<T>(x[h] * inv)));
    }
  });
}

// out[n, i] = T(T(silu(gate)) * up) with gate_up [N, 2I] = [gate | up] (vec_math::silu_mul_row).
template <typename T>
void silu_mul_kernel(const T* gate_up, T* out, int64_t N, int64_t I) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      vec_math::silu_mul_row(gate_up + n * 2 * I, gate_up + n * 2 * I + I, out + n * I, I);
  });
}

// In-place rotate-half rotary embedding on x [N, H, D] (row stride `stride_n`, head stride D)
// with cos/sin tables [max_pos, D] (float32; sin carries rotate_half's sign in its first half).
template <typename T>
void rotary_kernel(T* x, const int64_t* positions, const float* cos_t, const float* sin_t,
                   int64_t N, int64_t H, int64_t D, int64_t stride_n) {
  const int64_t half = D / 2;
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> v(D);
    for (int64_t n = begin; n < end; ++n) {
      const float* c = cos_t + positions[n] * D;
      const float* s = sin_t + positions[n] * D;
      for (int64_t h = 0; h < H; ++h) {
        T* p = x + n * stride_n + h * D;
        for (int64_t d = 0; d < D; ++d) v[d] = tf(p[d]);
        for (int64_t d = 0; d < half; ++d) {
          p[d] = from_f<T>(v[d] * c[d] + v[d + half] * s[d]);
          p[d + half] = from_f<T>(v[d + half] * c[d + half] + v[d] * s[d + half]);
        }
      }
    }
  });
}

#define DISPATCH(dtype, NAME, ...)       \
  if ((dtype) == at::kFloat) {           \
    using scalar_t = float;              \
    __VA_ARGS__();                       \
  } else if ((dtype) == at::kBFloat16) { \
    using scalar_t = at::BFloat16;       \
    __VA_ARGS__();                       \
  } else                                 \
    TORCH_CHECK(false, NAME ": unsupported dtype ", dtype)

// DISPATCH over the pairs the KV cache's kernels take (as_kernel_dtype): scalar_t the rows'
// or query's type (float, bfloat16), cache_t the cache's (scalar_t, or float16 beside it).
#define DISPATCH_KV_PAIR(dtype, cache_dtype, NAME, ...) \
  DISPATCH(dtype, NAME, [&] {                           \
    if ((cache_dtype) == at::kHalf) {                   \
      using cache_t = at::Half;                         \
      __VA_ARGS__();                                    \
    } else {                                            \
      using cache_t = scalar_t;                         \
      __VA_ARGS__();                                    \
    }                                                   \
  })

}  // namespace

at::Tensor as_kernel_dtype(const at::Tensor& x, const at::Tensor& cache) {
  const auto t = x.scalar_type(), c = cache.scalar_type();
  if (c == at::kHalf) return t == at::kFloat || t == at::kBFloat16 ? x : x.to(at::kFloat);
  return t == c ? x : x.to(c);
}

KvLayout kv_layout(const at::Tensor& cache, int64_t block_size) {
  TORCH_CHECK(cache.is_contiguous(), "KV caches must be contiguous");
  if (cache.dim() == 3) return {1, cache.size(1) * cache.size(2), cache.size(2)};
  TORCH_CHECK(cache.dim() == 4,
              "KV caches must be [slots, kv_heads, head_dim] or [blocks, kv_heads, block_size, "
              "head_dim], got ",
              cache.sizes());
  TORCH_CHECK(block_size == 0 || cache.size(2) == block_size, "a KV cache of blocks of ",
              cache.size(2), " slots read with block size ", block_size);
  return {cache.size(2), cache.size(3), cache.size(2) * cache.size(3)};
}

// vectorized=false runs the portable kernel (tests compare the two).
at::Tensor decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                            at::Tensor block_tables, at::Tensor seq_lens, int64_t block_size,
                            double scale, bool vectorized) {
  if (q.stride(2) != 1 || q.stride(1) != q.size(2)) q = q.contiguous();
  const KvLayout kv = kv_layout(k_cache, block_size);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous(),
              "the V cache must be shaped as the K cache");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt);
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "the K and V caches' dtypes differ");
  const auto q_dtype = q.scalar_type();
  q = as_kernel_dtype(q, k_cache);
  auto bt = block_tables.contiguous();
  auto sl = seq_lens.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  TORCH_CHECK(Hq % Hkv == 0 && k_cache.size(-1) == D, "q and the cache heads do not match");
  TORCH_CHECK(sl.numel() == B && bt.size(0) == B, "one seq_len and block table row per query");
  const int32_t* lens = sl.data_ptr<int32_t>();
  TORCH_CHECK(std::all_of(lens, lens + B,
                          [&](int32_t n) { return n >= 1 && n <= bt.size(1) * block_size; }),
              "a decoding request attends to 1 to block_tables.size(1) * block_size tokens");
  auto out = at::empty({B, Hq, D}, q.options());
  DISPATCH_KV_PAIR(q.scalar_type(), k_cache.scalar_type(), "paged_decode_attention", [&] {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    if (vectorized)
      if (auto fast = vector_decode_kernel<scalar_t, cache_t>(Hq, Hkv, D)) {
        const DecodeSplit split(sl.data_ptr<int32_t>(), B, Hkv, Hq / Hkv, D);
        fast(q.data_ptr<scalar_t>(), k_cache.data_ptr<cache_t>(), v_cache.data_ptr<cache_t>(),
             bt.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), Hq, Hkv, D, bt.size(1), block_size,
             static_cast<float>(scale), q.stride(0), kv, split);
        return;
      }
#endif
    paged_decode_kernel<scalar_t, cache_t>(
        q.data_ptr<scalar_t>(), k_cache.data_ptr<cache_t>(), v_cache.data_ptr<cache_t>(),
        bt.data_ptr<int32_t>(), sl.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), B, Hq, Hkv, D,
        bt.size(1), block_size, static_cast<float>(scale), q.stride(0), kv);
  });
  return out.scalar_type() == q_dtype ? out : out.to(q_dtype);
}

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                  at::Tensor block_tables, at::Tensor seq_lens, int64_t block_size,
                                  double scale) {
  return decode_attention(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale, true);
}

at::Tensor paged_decode_attention_reference(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                            at::Tensor block_tables, at::Tensor seq_lens,
                                            int64_t block_size, double scale) {
  return decode_attention(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale, false);
}

void write_kv(at::Tensor k, at::Tensor v, at::Tensor k_cache, at::Tensor v_cache,
              at::Tensor slot_mapping) {
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.sizes() == v.sizes(), "k, v must be [N, H, D]");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "the K and V caches' dtypes differ");
  if (k.scalar_type() != k_cache.scalar_type()) {  // float16 rows take float32 ones
    k = as_kernel_dtype(k, k_cache);
    v = as_kernel_dtype(v, v_cache);
  }
  TORCH_CHECK(
      k.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(2) == 1 && v.stride(1) == v.size(2),
      "k, v rows must hold contiguous heads");
  const KvLayout kv = kv_layout(k_cache, 0);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous(),
              "the V cache must be shaped as the K cache");
  TORCH_CHECK(k.size(1) == k_cache.size(1) && k.size(2) == k_cache.size(-1),
              "k, v heads do not match the cache's");
  auto slots = slot_mapping.to(at::kLong).contiguous();
  TORCH_CHECK(slots.numel() == k.size(0));
  auto run = [&](auto* k_ptr, auto* v_ptr, auto* kc_ptr, auto* vc_ptr) {
    write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slots.data_ptr<int64_t>(), k.size(0), k.size(1),
                    k.size(2), kv, k.stride(0), v.stride(0));
  };
  if (k.scalar_type() == at::kHalf)  // into a float16 cache: a copy
    run(k.data_ptr<at::Half>(), v.data_ptr<at::Half>(), k_cache.data_ptr<at::Half>(),
        v_cache.data_ptr<at::Half>());
  else
    DISPATCH_KV_PAIR(k.scalar_type(), k_cache.scalar_type(), "write_kv", [&] {
      run(k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), k_cache.data_ptr<cache_t>(),
          v_cache.data_ptr<cache_t>());
    });
}

// Structured output: in rows `rows[i]` of logits [R, V] (row i when rows is null), set to -inf
// every token whose bit is clear in mask row i [W] (token t: bit t % 32 of word t // 32); tokens
// past 32 * W are never allowed.
template <typename T>
void token_bitmask_kernel(T* logits, const int32_t* mask, const int64_t* rows, int64_t K, int64_t V,
                          int64_t W) {
  const T neg = from_f<T>(-std::numeric_limits<float>::infinity());
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* row = logits + (rows ? rows[i] : i) * V;
      const uint32_t* m = reinterpret_cast<const uint32_t*>(mask + i * W);
      for (int64_t w = 0; w < W && w * 32 < V; ++w) {
        const uint32_t bits = m[w];
        if (bits == 0xFFFFFFFFu) continue;
        T* dst = row + w * 32;
        const int n = static_cast<int>(std::min<int64_t>(32, V - w * 32));
        for (int j = 0; j < n; ++j)
          if (!((bits >> j) & 1u)) dst[j] = neg;
      }
      for (int64_t t = W * 32; t < V; ++t) row[t] = neg;
    }
  });
}

void apply_token_bitmask(at::Tensor logits, at::Tensor bitmask, at::Tensor rows) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "logits must be contiguous [R, V]");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.scalar_type() == at::kInt, "bitmask must be int32");
  auto mask = bitmask.contiguous();
  auto r = rows.to(at::kLong).contiguous();
  const int64_t K = mask.size(0);
  TORCH_CHECK(r.numel() == 0 ? K == logits.size(0) : r.numel() == K,
              "one bitmask row per logits row (or per entry of rows)");
  if (r.numel()) {
    TORCH_CHECK(r.min().item<int64_t>() >= 0 && r.max().item<int64_t>() < logits.size(0),
                "rows out of range");
  }
  DISPATCH(logits.scalar_type(), "apply_token_bitmask", [&] {
    token_bitmask_kernel<scalar_t>(logits.data_ptr<scalar_t>(), mask.data_ptr<int32_t>(),
                                   r.numel() ? r.data_ptr<int64_t>() : nullptr, K, logits.size(1),
                                   mask.size(1));
  });
}

at::Tensor argmax_rows(at::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "x must be [R, V] with V > 0");
  x = x.contiguous();
  auto out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  DISPATCH(x.scalar_type(), "argmax_rows", [&] {
    argmax_rows_kernel<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<int64_t>(), x.size(0),
                                 x.size(1));
  });
  return out;
}

at::Tensor sample_rows(at::Tensor logits, at::Tensor temperature, at::Tensor u) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 && logits.scalar_type() == at::kFloat,
              "logits must be float32 [R, V] with V > 0");
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(temperature.scalar_type() == at::kFloat && temperature.numel() == R,
              "temperature must be float32 [R]");
  TORCH_CHECK(u.scalar_type() == at::kDouble && u.numel() == R, "u must be float64 [R]");
  logits = logits.contiguous();
  temperature = temperature.contiguous();
  u = u.contiguous();
  auto out = at::empty({R}, logits.options().dtype(at::kLong));
  const float* x = logits.data_ptr<float>();
  const float* t = temperature.data_ptr<float>();
  const double* uu = u.data_ptr<double>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) o[r] = sample_row(x + r * V, V, t[r], uu[r]);
  });
  return out;
}

at::Tensor add_rms_norm(at::Tensor residual, c10::optional<at::Tensor> delta, at::Tensor weight,
                        double eps) {
  TORCH_CHECK(residual.is_contiguous() && residual.dim() == 2, "residual must be [N, H]");
  auto out = at::empty_like(residual);
  at::Tensor d;
  if (delta.has_value()) d = delta->contiguous();
  DISPATCH(residual.scalar_type(), "add_rms_norm", [&] {
    add_rms_norm_kernel<scalar_t>(
        residual.data_ptr<scalar_t>(), d.defined() ? d.data_ptr<scalar_t>() : nullptr,
        weight.contiguous().data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), residual.size(0),
        residual.size(1), static_cast<float>(eps));
  });
  return out;
}

at::Tensor silu_mul(at::Tensor gate_up) {
  gate_up = gate_up.contiguous();
  const int64_t N = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = at::empty({N, I}, gate_up.options());
  DISPATCH(gate_up.scalar_type(), "silu_mul", [&] {
    silu_mul_kernel<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, I);
  });
  return out;
}

void rotary_inplace(at::Tensor x, at::Tensor positions, at::Tensor cos_t, at::Tensor sin_t) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2),
              "x must be [N, H, D] with contiguous heads");
  TORCH_CHECK(cos_t.scalar_type() == at::kFloat && sin_t.scalar_type() == at::kFloat);
  auto pos = positions.to(at::kLong).contiguous();
  DISPATCH(x.scalar_type(), "rotary_inplace", [&] {
    rotary_kernel<scalar_t>(
        x.data_ptr<scalar_t>(), pos.data_ptr<int64_t>(), cos_t.contiguous().data_ptr<float>(),
        sin_t.contiguous().data_ptr<float>(), x.size(0), x.size(1), x.size(2), x.stride(0));
  });
}
