// Fused CPU kernels for the decode hot path (float32 and bfloat16; KV caches also float16).
//
// Each op replaces a chain of small PyTorch ops whose launch overhead dominates a decode step on
// CPU. Numerics follow the reference PyTorch formulas (float32 accumulation, rounding to the
// tensor dtype where the reference rounds).
//
// One translation unit, in parts: decode_attention.h (the portable paged decode attention and
// its split of long contexts), decode_attention_avx512.h / _avx2.h (its vector kernels) and
// sampling.h (argmax, sampling); this file holds the elementwise ops and the entry points.
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

#include "decode_attention_avx2.h"
#include "decode_attention_avx512.h"
#include "sampling.h"
#include "vec_math.h"

namespace {

using vec_math::from_f;
using vec_math::tf;

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
