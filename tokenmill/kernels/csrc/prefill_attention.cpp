// Paged causal attention for multi-token chunks (a prompt, or a chunk of one after cached
// context), reading K and V straight from the paged cache: no gathered copy of the context, no
// padding, no mask tensor.
//
// A task is one KV head of one request and up to kRowTile query rows: the query heads that share
// the KV head (the rep of GQA) times a run of consecutive query tokens, so the K and V rows read
// for a block of keys serve all of them. Per block of kKeyBlock keys the task
//   1. transposes the keys to Kt [D][keys] (8 x 8 register transposes),
//   2. computes the scores S = Q Kt, 6 rows x 16 keys at a time (12 accumulators),
//   3. masks the keys after each row's position, and folds the block into that row's online
//      softmax (running max m, sum l; the output rescaled when the max grows),
//   4. adds P V to the output rows, 6 rows x 16 dims at a time, V rows read from the cache.
// Steps 2 and 4 run in 16-float vectors on AVX-512 builds, 8-float ones on AVX2 builds.
// All arithmetic is float32 (bfloat16 and float16 caches are widened on load, a float16 cache
// beside a float32 or bfloat16 query included: as_kernel_dtype); the result differs from the
// reference softmax(Q K^T) V only by the order of additions and the exp polynomial (~1e-7).
// Tasks are handed out longest first from a shared counter (a causal prompt's late rows see
// more keys).
#include "prefill_attention.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu_ops.h"
#include "prefill_blocks.h"
#include "vec_math.h"

#if defined(__AVX2__) && defined(__FMA__)
namespace {

struct Task {
  int64_t req, kv_head, first, count;  // query tokens [first, first + count) of the request
  int64_t cost;                        // rows x keys, for the longest-first order
};

// Per-thread buffers of one task (64-byte aligned; D a multiple of 16).
struct Scratch {
  std::vector<float> buf;
  float *q, *o, *s, *kt, *m, *l;
  explicit Scratch(int64_t D)
      : buf(kRowTile * D * 2 + kRowTile * kKeyBlock + D * kKeyBlock + 2 * kRowTile + 16) {
    float* p = buf.data();
    p += (64 - reinterpret_cast<uintptr_t>(p) % 64) % 64 / sizeof(float);
    q = p;
    o = q + kRowTile * D;
    s = o + kRowTile * D;
    kt = s + kRowTile * kKeyBlock;
    m = kt + D * kKeyBlock;
    l = m + kRowTile;
  }
};

// The task's rows: the query and output in TQ, the cache in TC (TQ, or float16 beside it).
template <typename TQ, typename TC>
void run_task(const Task& task, const TQ* q, const TC* kc, const TC* vc, const int32_t* bt,
              int64_t max_blocks, int64_t block_size, const int32_t* seq_lens, const int32_t* qsl,
              int64_t q_stride, TQ* out, int64_t Hq, int64_t Hkv, int64_t D, float scale,
              KvLayout kv, Scratch& w) {
  const int64_t rep = Hq / Hkv, row_len = Hkv * D, g = task.kv_head;
  const int R = static_cast<int>(task.count * rep);
  const int64_t q_len = qsl[task.req + 1] - qsl[task.req];
  const int64_t ctx0 = seq_lens[task.req] - q_len;  // position of the request's first query
  const int32_t* table = bt + task.req * max_blocks;
  // scaled queries; row r = token (r / rep), head g * rep + r % rep
  for (int r = 0; r < R; ++r) {
    const TQ* src = q + (qsl[task.req] + task.first + r / rep) * q_stride + (g * rep + r % rep) * D;
    for (int64_t d = 0; d < D; d += 8)
      _mm256_store_ps(w.q + r * D + d, _mm256_mul_ps(load8(src + d), _mm256_set1_ps(scale)));
    std::fill(w.o + r * D, w.o + (r + 1) * D, 0.f);
    w.m[r] = kNoScore;
    w.l[r] = 0.f;
  }
  static const TC zero_row[256] = {};  // keys past the end of a block (D <= 256)
  const TC* krows[kKeyBlock];
  const TC* vrows[kKeyBlock];
  const int64_t kv_end = ctx0 + task.first + task.count;  // keys the last row sees
  for (int64_t k0 = 0; k0 < kv_end; k0 += kKeyBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kKeyBlock, kv_end - k0));
    for (int t = 0; t < kKeyBlock; ++t) {
      if (t < n) {
        const int64_t pos = k0 + t;
        const int64_t at = static_cast<int64_t>(table[pos / block_size]) * block_size * row_len +
                           pos % block_size * kv.token + g * kv.head;
        krows[t] = kc + at;
        vrows[t] = vc + at;
      } else {
        krows[t] = vrows[t] = zero_row;
      }
    }
    const int nc = (n + 15) / 16 * 16;  // keys scored (whole 16-key column blocks)
    for (int t0 = 0; t0 < nc; t0 += 8)
      for (int64_t d0 = 0; d0 < D; d0 += 8) {
        __m256 x[8];
        for (int i = 0; i < 8; ++i) x[i] = load8(krows[t0 + i] + d0);
        transpose8(x);
        for (int i = 0; i < 8; ++i) _mm256_store_ps(w.kt + (d0 + i) * kKeyBlock + t0, x[i]);
      }
    for_row_groups(R, ScoreRows{w.q, D, w.kt, nc, w.s});
    // causal mask and online softmax, row by row; P overwrites S (0 past the row's last key)
    int n_pv = 0;  // keys any row of the task sees in this block
    for (int r = 0; r < R; ++r) {
      const int64_t pos = ctx0 + task.first + r / rep;
      const int lim = static_cast<int>(std::min<int64_t>(n, pos - k0 + 1));
      float* s = w.s + r * kKeyBlock;
      if (lim <= 0) {
        std::fill(s, s + nc, 0.f);
        continue;
      }
      n_pv = std::max(n_pv, lim);
      const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256 ninf = _mm256_set1_ps(kNoScore);
      __m256 mx = ninf;
      for (int t = 0; t < nc; t += 8) {
        const __m256 keep =
            _mm256_cmp_ps(_mm256_add_ps(lane, _mm256_set1_ps(t)), _mm256_set1_ps(lim), _CMP_LT_OQ);
        const __m256 v = _mm256_blendv_ps(ninf, _mm256_load_ps(s + t), keep);
        _mm256_store_ps(s + t, v);
        mx = _mm256_max_ps(mx, v);
      }
      const float m_new = std::max(w.m[r], hmax8(mx));
      const float alpha = std::exp(w.m[r] - m_new);  // 0 on the first block
      const __m256 mv = _mm256_set1_ps(m_new);
      __m256 sum = _mm256_setzero_ps();
      for (int t = 0; t < nc; t += 8) {
        const __m256 keep =
            _mm256_cmp_ps(_mm256_add_ps(lane, _mm256_set1_ps(t)), _mm256_set1_ps(lim), _CMP_LT_OQ);
        const __m256 p = _mm256_and_ps(exp256(_mm256_sub_ps(_mm256_load_ps(s + t), mv)), keep);
        _mm256_store_ps(s + t, p);
        sum = _mm256_add_ps(sum, p);
      }
      w.l[r] = w.l[r] * alpha + hsum8(sum);
      w.m[r] = m_new;
      if (alpha != 1.f) {
        float* o = w.o + r * D;
        for (int64_t d = 0; d < D; d += 8)
          _mm256_store_ps(o + d, _mm256_mul_ps(_mm256_load_ps(o + d), _mm256_set1_ps(alpha)));
      }
    }
    for_row_groups(R, AddPV<const TC>{w.s, vrows, n_pv, w.o, D});
  }
  for (int r = 0; r < R; ++r) {
    TQ* dst = out + ((qsl[task.req] + task.first + r / rep) * Hq + g * rep + r % rep) * D;
    const __m256 inv = _mm256_set1_ps(1.f / w.l[r]);
    for (int64_t d = 0; d < D; d += 8)
      store8(dst + d, _mm256_mul_ps(_mm256_load_ps(w.o + r * D + d), inv));
  }
}

}  // namespace
#endif

bool paged_prefill_attention_supported(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
#if defined(__AVX2__) && defined(__FMA__)
  return num_kv_heads > 0 && num_heads % num_kv_heads == 0 &&
         num_heads / num_kv_heads <= kRowTile && head_dim % 16 == 0 && head_dim <= 256;
#else
  return false;
#endif
}

at::Tensor paged_prefill_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                   at::Tensor block_tables, at::Tensor seq_lens,
                                   at::Tensor query_start_loc, int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous(),
              "q [tokens, heads, head_dim], V cache shaped as the K cache");
  const KvLayout kv = kv_layout(k_cache, block_size);
  const int64_t Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  TORCH_CHECK(paged_prefill_attention_supported(Hq, Hkv, D) && k_cache.size(-1) == D,
              "no prefill attention kernel for ", Hq, " / ", Hkv, " heads of ", D);
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "the K and V caches' dtypes differ");
  const auto q_dtype = q.scalar_type();
  q = as_kernel_dtype(q, k_cache);
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  query_start_loc.scalar_type() == at::kInt,
              "block_tables, seq_lens and query_start_loc must be int32");
  if (q.stride(2) != 1 || q.stride(1) != D) q = q.contiguous();
  auto bt = block_tables.contiguous(), sl = seq_lens.contiguous(),
       qsl = query_start_loc.contiguous();
  const int64_t B = sl.numel();
  TORCH_CHECK(qsl.numel() == B + 1 && bt.dim() == 2 && bt.size(0) == B,
              "one block table row and query range per request");
  const int32_t* qs = qsl.data_ptr<int32_t>();
  const int32_t* lens = sl.data_ptr<int32_t>();
  TORCH_CHECK(qs[0] == 0 && qs[B] == q.size(0), "query_start_loc must cover q's rows");
  auto out = at::empty({q.size(0), Hq, D}, q.options());
#if defined(__AVX2__) && defined(__FMA__)
  const int64_t rep = Hq / Hkv, tokens_per_task = std::max<int64_t>(1, kRowTile / rep);
  std::vector<Task> tasks;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t q_len = qs[b + 1] - qs[b];
    TORCH_CHECK(
        q_len >= 0 && q_len <= lens[b] && (lens[b] + block_size - 1) / block_size <= bt.size(1),
        "request ", b, ": bad query range, length or block table");
    for (int64_t first = 0; first < q_len; first += tokens_per_task) {
      const int64_t count = std::min(tokens_per_task, q_len - first);
      for (int64_t g = 0; g < Hkv; ++g)
        tasks.push_back({b, g, first, count, count * (lens[b] - q_len + first + count)});
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  const auto n_tasks = static_cast<int64_t>(tasks.size());
  auto run = [&](auto* q_ptr, auto* k_ptr, auto* v_ptr, auto* out_ptr) {
    at::parallel_for(
        0, std::min<int64_t>(at::get_num_threads(), n_tasks), 1, [&](int64_t, int64_t) {
          Scratch w(D);
          for (int64_t i = next++; i < n_tasks; i = next++)
            run_task(tasks[i], q_ptr, k_ptr, v_ptr, bt.data_ptr<int32_t>(), bt.size(1), block_size,
                     lens, qs, q.stride(0), out_ptr, Hq, Hkv, D, static_cast<float>(scale), kv, w);
        });
  };
  // the pairs as_kernel_dtype leaves: a cache of the query's dtype, or float16 beside it
  auto run_pair = [&](auto* q_ptr, auto* out_ptr) {
    if (k_cache.scalar_type() == at::kHalf)
      run(q_ptr, k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>(), out_ptr);
    else
      run(q_ptr, k_cache.data_ptr<std::remove_pointer_t<decltype(q_ptr)>>(),
          v_cache.data_ptr<std::remove_pointer_t<decltype(q_ptr)>>(), out_ptr);
  };
  if (q.scalar_type() == at::kFloat)
    run_pair(q.data_ptr<float>(), out.data_ptr<float>());
  else if (q.scalar_type() == at::kBFloat16)
    run_pair(q.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>());
  else
    TORCH_CHECK(false, "paged_prefill_attention: float32 or bfloat16 queries only");
#endif
  return out.scalar_type() == q_dtype ? out : out.to(q_dtype);
}
