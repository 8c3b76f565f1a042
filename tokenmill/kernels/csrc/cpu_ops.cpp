// Fused CPU kernels for the decode hot path (float32 and bfloat16).
//
// Each op replaces a chain of small PyTorch ops whose launch overhead dominates a decode step on
// CPU. Numerics follow the reference PyTorch formulas (float32 accumulation, rounding to the
// tensor dtype where the reference rounds).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// Loads and stores through plain bit operations so the compiler can vectorize them
// (c10's BFloat16 conversions are branchy). Stores round to nearest even, like c10.
inline float tf(float x) { return x; }
inline float tf(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
template <typename T> inline T from_f(float f);
template <> inline float from_f<float>(float f) { return f; }
template <> inline at::BFloat16 from_f<at::BFloat16>(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return at::BFloat16(static_cast<uint16_t>(bits >> 16), at::BFloat16::from_bits());
}

// Paged attention for single-query requests.
// q [B, Hq, D]; k_cache, v_cache [slots, Hkv, D]; block_tables [B, max_blocks] int32;
// seq_lens [B] int32; out [B, Hq, D]. Query heads g*rep .. g*rep+rep-1 share kv head g.
template <typename T>
void paged_decode_kernel(const T* q, const T* kc, const T* vc, const int32_t* bt,
                         const int32_t* seq_lens, T* out, int64_t B, int64_t Hq, int64_t Hkv,
                         int64_t D, int64_t max_blocks, int64_t block_size, float scale) {
  // One task per request: a slot's K (or V) row holds all kv heads contiguously, so walking the
  // request's blocks reads memory in order. scores: [Hq, S].
  const int64_t rep = Hq / Hkv, row_len = Hkv * D;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(Hq * D), acc(Hq * D), row(row_len), scores;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t S = seq_lens[b];
      scores.resize(Hq * S);
      for (int64_t i = 0; i < Hq * D; ++i) qf[i] = tf(q[b * Hq * D + i]) * scale;
      const int32_t* table = bt + b * max_blocks;
      for (int64_t t0 = 0; t0 < S; t0 += block_size) {
        const int64_t base = (int64_t)table[t0 / block_size] * block_size;
        const int64_t n = std::min(block_size, S - t0);
        for (int64_t o = 0; o < n; ++o) {
          const T* kp = kc + (base + o) * row_len;
          for (int64_t i = 0; i < row_len; ++i) row[i] = tf(kp[i]);
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
        for (int64_t t = 0; t < S; ++t) { sr[t] = std::exp(sr[t] - mx); sum += sr[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < S; ++t) sr[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = 0; t0 < S; t0 += block_size) {
        const int64_t base = (int64_t)table[t0 / block_size] * block_size;
        const int64_t n = std::min(block_size, S - t0);
        for (int64_t o = 0; o < n; ++o) {
          const T* vp = vc + (base + o) * row_len;
          for (int64_t i = 0; i < row_len; ++i) row[i] = tf(vp[i]);
          for (int64_t h = 0; h < Hq; ++h) {
            const float p = scores[h * S + t0 + o];
            const float* vh = row.data() + (h / rep) * D;
            float* ah = acc.data() + h * D;
            for (int64_t d = 0; d < D; ++d) ah[d] += p * vh[d];
          }
        }
      }
      for (int64_t i = 0; i < Hq * D; ++i) out[b * Hq * D + i] = from_f<T>(acc[i]);
    }
  });
}

// residual += delta (rounded to T), out = weight * T(rmsnorm(residual)), per row.
template <typename T>
void add_rms_norm_kernel(T* residual, const T* delta, const T* weight, T* out, int64_t N,
                         int64_t H, float eps) {
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

// out[n, i] = T(T(silu(gate)) * up) with gate_up [N, 2I] = [gate | up].
template <typename T>
void silu_mul_kernel(const T* gate_up, T* out, int64_t N, int64_t I) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* g = gate_up + n * 2 * I;
      const T* u = g + I;
      for (int64_t i = 0; i < I; ++i) {
        const float x = tf(g[i]);
        const T s = from_f<T>(x / (1.f + std::exp(-x)));
        out[n * I + i] = from_f<T>(tf(s) * tf(u[i]));
      }
    }
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

#define DISPATCH(dtype, NAME, ...)                                              \
  if ((dtype) == at::kFloat) { using scalar_t = float; __VA_ARGS__(); }         \
  else if ((dtype) == at::kBFloat16) { using scalar_t = at::BFloat16; __VA_ARGS__(); } \
  else TORCH_CHECK(false, NAME ": unsupported dtype ", dtype)

}  // namespace

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache,
                                     torch::Tensor v_cache, torch::Tensor block_tables,
                                     torch::Tensor seq_lens, int64_t block_size, double scale) {
  q = q.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt);
  auto bt = block_tables.contiguous();
  auto sl = seq_lens.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  TORCH_CHECK(Hq % Hkv == 0 && k_cache.size(2) == D);
  auto out = torch::empty_like(q);
  DISPATCH(q.scalar_type(), "paged_decode_attention", [&] {
    paged_decode_kernel<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
                                  v_cache.data_ptr<scalar_t>(), bt.data_ptr<int32_t>(),
                                  sl.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), B, Hq, Hkv,
                                  D, bt.size(1), block_size, static_cast<float>(scale));
  });
  return out;
}

torch::Tensor add_rms_norm(torch::Tensor residual, c10::optional<torch::Tensor> delta,
                           torch::Tensor weight, double eps) {
  TORCH_CHECK(residual.is_contiguous() && residual.dim() == 2, "residual must be [N, H]");
  auto out = torch::empty_like(residual);
  torch::Tensor d;
  if (delta.has_value()) d = delta->contiguous();
  DISPATCH(residual.scalar_type(), "add_rms_norm", [&] {
    add_rms_norm_kernel<scalar_t>(residual.data_ptr<scalar_t>(),
                                  d.defined() ? d.data_ptr<scalar_t>() : nullptr,
                                  weight.contiguous().data_ptr<scalar_t>(),
                                  out.data_ptr<scalar_t>(), residual.size(0), residual.size(1),
                                  static_cast<float>(eps));
  });
  return out;
}

torch::Tensor silu_mul(torch::Tensor gate_up) {
  gate_up = gate_up.contiguous();
  const int64_t N = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = torch::empty({N, I}, gate_up.options());
  DISPATCH(gate_up.scalar_type(), "silu_mul", [&] {
    silu_mul_kernel<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, I);
  });
  return out;
}

void rotary_inplace(torch::Tensor x, torch::Tensor positions, torch::Tensor cos_t,
                    torch::Tensor sin_t) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2),
              "x must be [N, H, D] with contiguous heads");
  TORCH_CHECK(cos_t.scalar_type() == at::kFloat && sin_t.scalar_type() == at::kFloat);
  auto pos = positions.to(at::kLong).contiguous();
  DISPATCH(x.scalar_type(), "rotary_inplace", [&] {
    rotary_kernel<scalar_t>(x.data_ptr<scalar_t>(), pos.data_ptr<int64_t>(),
                            cos_t.contiguous().data_ptr<float>(),
                            sin_t.contiguous().data_ptr<float>(), x.size(0), x.size(1),
                            x.size(2), x.stride(0));
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("silu_mul", &silu_mul);
  m.def("rotary_inplace", &rotary_inplace);
}
