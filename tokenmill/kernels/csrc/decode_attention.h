// Paged decode attention, the portable kernel and the split of long contexts into chunks
// (DecodeSplit); the vectorized kernels are in decode_attention_avx512.h / _avx2.h.
// Part of cpu_ops.cpp's translation unit: included there only.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>

#include "cpu_ops.h"
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

}  // namespace
