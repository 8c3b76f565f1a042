// y = x W^T with W kept in GGUF's quantized blocks, integer dot products on x86 (AVX2 `maddubs`,
// AVX-512 VNNI `vpdpbusd`). One source, built once per ISA with that ISA's flags
// (tokenmill/kernels/cpu_ops.py picks the build at run time from CPUID).
//
// Activations are quantized once per call to 8-bit blocks of 32 (q = round-to-nearest-even of
// x * 127 / max|x|, d = max|x| * (1 / 127)) that carry d * (sum of each 16-half) for the weights'
// offsets. A QuantLinear quantizes a batch of kPreparedMinM+ tokens straight into the batched
// path's block-major layout (BatchActs), once for all its segments, in one threaded pass.
//
// A layer may keep a few input channels out of that rounding (QuantLinear::set_exact_channels:
// the activations' outlier channels, chosen at start-up): they are read as 0 when the blocks are
// quantized, so they no longer set their blocks' scales, and their share x[:, c] * W[:, c] is
// added in float32 from a table of those weight columns, dequantized once: each tile's float32
// sums start from it (the Epilogue, with the bias) and are rounded once to the output's dtype.
//
// Weights are repacked at load (tokenmill/quant/gguf_pack.py, which documents the layout) into
// tiles of 16 output rows. Inside a tile every 32-input block unpacks to eight 64-byte vectors
// U[t] whose lane r (4 bytes) holds inputs 4t..4t+3 of row r as unsigned integers (IQ4_NL /
// IQ4_XS and the lattice types: their codebook values + 128, looked up from the packed indices;
// the avx2 level keeps them signed), plus a scale s and an offset o per row (w = s * u + o; Q2_K,
// Q3_K, Q6_K, IQ1_M, IQ2_XS and IQ2_S have one pair per 16 inputs). Then
//   y[m][row] += s * dx * sum(u * xq) + o * dx * sum(xq)
// where the integer sum is exact (int32) and every float product of it matches what a float
// matmul over the dequantized weights and activations computes, up to the order of additions.
// Every path unpacks each weight block once per pass and applies it to every token of the pass
// as the weights stream in: up to 4 tokens with accumulators in registers (tile_streaming; small
// decode batches take several such passes over each tile), larger batches in passes of up to 64
// tokens with accumulators in L1 (gemm_batched), where a prefill takes several passes over each
// tile, which by then sits in L2.
//
// On CPUs with AMX, batches of kAmxBf16MinM+ tokens (prefill chunks, large decode batches) take
// another route: each weight block is dequantized once per pass to bfloat16 (w = s * u + o in
// float32, rounded to nearest even) and multiplied with the activations as they are (bfloat16,
// or float32 rounded to it) on the tiles, float32 sums over the whole row. The int8 tile
// products need a float rescale of every 32-input block for every token, which costs as much
// as VNNI's; bfloat16 products need none, so only the dequantization is per block (1B-shape
// Q4_K_M, 2 threads: 1.3-1.8x at 64 tokens, 1.5-2.3x from 128 on). Its error from the float32
// product of the dequantized weights is bfloat16 rounding of both operands (about 0.2% of a
// weight each), below the 8-bit activation rounding it replaces; exact channels play no part
// there (no channel is rounded to 8 bits).
//
// One translation unit, in parts (each header included here only, each on the ones before it):
// quant_common.h (the level's macros, ActMeta, Epilogue), quant_act.h (activation
// quantization), quant_vec.h (a tile's vector types), quant_block.h (unpacking weight blocks),
// quant_streaming.h (up to a few tokens per pass), quant_batch_acts.h, quant_batch_kernels.h and
// quant_batched.h (batches of 5+ tokens), quant_amx.h (the AMX tiles), quant_dispatch.h (which
// path and type a call takes); this file holds the entry points and QuantLinear.
#include "quant_gemm.h"

#include "quant_dispatch.h"

void set_weight_prefetch(int64_t l1_bytes, int64_t l2_bytes) {
  TORCH_CHECK(l1_bytes >= 0 && l2_bytes >= 0 && l1_bytes % 64 == 0 && l2_bytes % 64 == 0,
              "prefetch distances are whole 64-byte lines, >= 0: ", l1_bytes, ", ", l2_bytes);
  g_prefetch_l1 = l1_bytes;
  g_prefetch_l2 = l2_bytes;
}

std::vector<int64_t> weight_prefetch() { return {g_prefetch_l1, g_prefetch_l2}; }

std::string quant_isa() {
#if defined(TM_AMX)
  return amx_permitted() ? "amx" : "avx512";
#elif defined(TM_AVX512)
  return "avx512";
#elif defined(TM_AVXVNNI)
  return "avxvnni";
#elif defined(TM_AVX2)
  return "avx2";
#else
  return "";
#endif
}

int64_t bf16_tiles_min_tokens() {
#if defined(TM_AMX)
  return amx_permitted() ? kAmxBf16MinM : 0;
#else
  return 0;
#endif
}

// Rows `ids` of a packed [N, K] weight, dequantized to float32 [len(ids), K] (w = s * u + o,
// the same float32 values as gguf's dequantization).
at::Tensor quant_rows(at::Tensor packed, int64_t qtype, int64_t N, int64_t K, at::Tensor ids) {
  TORCH_CHECK(unit_bytes(qtype) > 0, "unsupported GGUF type ", qtype);
  TORCH_CHECK(packed.numel() == (N + 15) / 16 * (K / unit_k(qtype)) * unit_bytes(qtype),
              "packed weights do not match N, K and the type");
  auto idx = ids.to(at::kLong).contiguous().view(-1);
  TORCH_CHECK(idx.numel() == 0 || (idx.min().item<int64_t>() >= 0 && idx.max().item<int64_t>() < N),
              "row index out of range");
  auto out = at::empty({idx.numel(), K}, packed.options().dtype(at::kFloat));
#if defined(TM_AVX512) || defined(TM_AVX2)
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const int64_t* p = idx.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  with_type(qtype, [&](auto t) { rows_typed<decltype(t)::value>(w, K, p, idx.numel(), o); });
#else
  TORCH_CHECK(false, "this kernel build has no integer-dot ISA");
#endif
  return out;
}

// Columns `channels` of a packed [N, K] weight, dequantized to float32 [len(channels), N] (the
// same values as quant_rows, hence gguf's dequantization).
at::Tensor quant_cols(at::Tensor packed, int64_t qtype, int64_t N, int64_t K,
                      std::vector<int64_t> channels) {
  TORCH_CHECK(unit_bytes(qtype) > 0, "unsupported GGUF type ", qtype);
  TORCH_CHECK(packed.numel() == (N + 15) / 16 * (K / unit_k(qtype)) * unit_bytes(qtype),
              "packed weights do not match N, K and the type");
  for (int64_t c : channels) TORCH_CHECK(c >= 0 && c < K, "channel ", c, " is not in [0, ", K, ")");
  auto out =
      at::empty({static_cast<int64_t>(channels.size()), N}, packed.options().dtype(at::kFloat));
#if defined(TM_AVX512) || defined(TM_AVX2)
  const uint8_t* w = packed.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  with_type(qtype, [&](auto t) { cols_typed<decltype(t)::value>(w, N, K, channels, o); });
#else
  TORCH_CHECK(false, "this kernel build has no integer-dot ISA");
#endif
  return out;
}

namespace {

// Rows of x quantized into q / meta, with input channels `zero` (sorted, distinct) read as 0.
template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, const std::vector<int64_t>& zero, int8_t* q,
                   ActMeta* meta) {
  quantize_tokens(x, M, K, zero, 16,
                  [&](int64_t m, int64_t b, __m256i bytes, const ActMeta& mt, int, int) {
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + m * K + b * 32), bytes);
                    meta[m * (K / 32) + b] = mt;
                  });
}

std::vector<at::Tensor> quantize_except(const at::Tensor& x_in, const std::vector<int64_t>& zero) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) % 32 == 0,
              "x must be [M, K] with K a multiple of 32");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  auto q = at::empty({M, K}, x.options().dtype(at::kChar));
  auto meta = at::empty({M, K / 32, 4}, x.options().dtype(at::kFloat));
  auto* mp = reinterpret_cast<ActMeta*>(meta.data_ptr<float>());
  if (x.scalar_type() == at::kFloat)
    quantize_rows(x.data_ptr<float>(), M, K, zero, q.data_ptr<int8_t>(), mp);
  else
    quantize_rows(x.data_ptr<at::BFloat16>(), M, K, zero, q.data_ptr<int8_t>(), mp);
  return {q, meta};
}

// a[m * k + j] = x[m, idx[j]] in float32: the exact channels' activations.
template <typename TX>
void gather_channels(const TX* x, int64_t M, int64_t K, const std::vector<int64_t>& idx, float* a) {
  const int64_t k = static_cast<int64_t>(idx.size());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < k; ++j) a[m * k + j] = vec_math::tf(x[m * K + idx[j]]);
}

}  // namespace

// x [M, K] float32/bfloat16 -> (q int8 [M, K], meta float32 [M, K / 32, 4] = ActMeta).
std::vector<at::Tensor> quantize_activations(at::Tensor x) { return quantize_except(x, {}); }

namespace {

// Checks a GEMM of M tokens x K inputs into y[:, col:col + N] and sets ep's bias.
void check_gemm(int64_t M, int64_t K, const at::Tensor& packed, int64_t qtype, int64_t N,
                const at::Tensor& y, int64_t col, const c10::optional<at::Tensor>& bias,
                Epilogue& ep) {
  TORCH_CHECK(unit_bytes(qtype) > 0, "unsupported GGUF type ", qtype);
  const int64_t n_tiles = (N + 15) / 16;
  TORCH_CHECK(K % unit_k(qtype) == 0 && N > 0, "K must be a multiple of ", unit_k(qtype));
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.numel() == n_tiles * (K / unit_k(qtype)) * unit_bytes(qtype),
              "packed weights do not match N, K and the type");
  TORCH_CHECK(y.dim() == 2 && y.size(0) == M && y.stride(1) == 1 && col + N <= y.size(1),
              "bad output tensor");
  if (bias.has_value()) {
    TORCH_CHECK(
        bias->scalar_type() == at::kFloat && bias->numel() == n_tiles * 16 && bias->is_contiguous(),
        "bias must be float32 [ceil(N / 16) * 16]");
    ep.bias = bias->data_ptr<float>();
  }
}

// quant_gemm with the exact channels' share in `ep` (its bias is set here).
void gemm_into(const at::Tensor& xq, const at::Tensor& meta, const at::Tensor& packed,
               int64_t qtype, int64_t N, const at::Tensor& y, int64_t col,
               const c10::optional<at::Tensor>& bias, Epilogue ep) {
  const int64_t M = xq.size(0), K = xq.size(1);
  TORCH_CHECK(xq.is_contiguous() && meta.is_contiguous(), "bad activation tensors");
  check_gemm(M, K, packed, qtype, N, y, col, bias, ep);
  if (M == 0) return;
#if defined(TM_AVX512) || defined(TM_AVX2)
  const auto* mp = reinterpret_cast<const ActMeta*>(meta.data_ptr<float>());
  if (y.scalar_type() == at::kFloat)
    gemm_dispatch(qtype, packed.data_ptr<uint8_t>(), xq.data_ptr<int8_t>(), mp, M, N, K, ep,
                  y.data_ptr<float>() + col, y.stride(0));
  else
    gemm_dispatch(qtype, packed.data_ptr<uint8_t>(), xq.data_ptr<int8_t>(), mp, M, N, K, ep,
                  reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()) + col, y.stride(0));
#else
  TORCH_CHECK(false, "this kernel build has no integer-dot ISA");
#endif
}

#if defined(TM_AVX512) || defined(TM_AVX2)
// The same from activations prepared block-major (BatchActs::quantize).
void gemm_into(const BatchActs& acts, int64_t K, const at::Tensor& packed, int64_t qtype, int64_t N,
               const at::Tensor& y, int64_t col, const c10::optional<at::Tensor>& bias,
               Epilogue ep) {
  check_gemm(acts.M, K, packed, qtype, N, y, col, bias, ep);
  if (y.scalar_type() == at::kFloat)
    gemm_dispatch(qtype, packed.data_ptr<uint8_t>(), acts, N, K, ep, y.data_ptr<float>() + col,
                  y.stride(0));
  else
    gemm_dispatch(qtype, packed.data_ptr<uint8_t>(), acts, N, K, ep,
                  reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()) + col, y.stride(0));
}
#endif

}  // namespace

// y[:, col:col + N] = dequant(W) applied to the quantized activations (+ bias float32, padded
// with zeros to whole 16-row tiles). y is [M, >= col + N], float32 or bfloat16, rows contiguous.
// The packed weight has ceil(N / 16) tiles (the last one padded with zero rows).
void quant_gemm(at::Tensor xq, at::Tensor meta, at::Tensor packed, int64_t qtype, int64_t N,
                at::Tensor y, int64_t col, c10::optional<at::Tensor> bias) {
  gemm_into(xq, meta, packed, qtype, N, y, col, bias, Epilogue{});
}

// A quantized linear layer as one object: its runs of same-typed shards ("segments"), checked
// once at construction, so a call is a single crossing from Python: quantize x once, run every
// segment into its columns of y.
QuantLinear::QuantLinear(std::vector<at::Tensor> packed, std::vector<int64_t> qtypes,
                         std::vector<int64_t> rows, std::vector<c10::optional<at::Tensor>> bias,
                         int64_t in_features)
    : packed_(std::move(packed)),
      qtypes_(std::move(qtypes)),
      rows_(std::move(rows)),
      bias_(std::move(bias)),
      K_(in_features) {
  TORCH_CHECK(packed_.size() == qtypes_.size() && packed_.size() == rows_.size() &&
                  packed_.size() == bias_.size() && !packed_.empty(),
              "inconsistent segments");
  for (size_t i = 0; i < packed_.size(); ++i) {
    cols_.push_back(N_);
    N_ += rows_[i];
    const int64_t q = qtypes_[i];
    TORCH_CHECK(unit_bytes(q) > 0, "unsupported GGUF type ", q);
    TORCH_CHECK(K_ % unit_k(q) == 0 && packed_[i].scalar_type() == at::kByte &&
                    packed_[i].is_contiguous() &&
                    packed_[i].numel() == (rows_[i] + 15) / 16 * (K_ / unit_k(q)) * unit_bytes(q),
                "segment ", i, ": packed weights do not match its rows, K and type");
    if (bias_[i].has_value())
      TORCH_CHECK(bias_[i]->scalar_type() == at::kFloat && bias_[i]->is_contiguous() &&
                      bias_[i]->numel() == (rows_[i] + 15) / 16 * 16,
                  "segment ", i, ": bias must be float32, padded to whole tiles");
  }
}

at::Tensor QuantLinear::forward(at::Tensor x) const {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K_, "x must be [M, ", K_, "]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16");
  x = x.contiguous();
  const int64_t M = x.size(0);
  if (observed_.defined()) {  // calibration: the running max of |x| per input channel
    const at::Tensor xf = x.to(at::kFloat);
    const float* xp = xf.data_ptr<float>();
    float* amax = observed_.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = 0; c < K_; ++c) amax[c] = std::max(amax[c], std::fabs(xp[m * K_ + c]));
  }
  auto y = at::empty({M, N_}, x.options());
#if defined(TM_AMX)
  if (M >= kAmxBf16MinM && amx_permitted()) {  // bfloat16 tiles, every channel as it is
    const int64_t Mp = (M + 15) / 16 * 16;
    const std::vector<uint16_t> xb = x.scalar_type() == at::kFloat
                                         ? block_major_bf16(x.data_ptr<float>(), M, Mp, K_)
                                         : block_major_bf16(x.data_ptr<at::BFloat16>(), M, Mp, K_);
    for (size_t i = 0; i < packed_.size(); ++i) {
      const float* bias = bias_[i].has_value() ? bias_[i]->data_ptr<float>() : nullptr;
      const uint8_t* w = packed_[i].data_ptr<uint8_t>();
      const bool known = with_type(qtypes_[i], [&](auto t) {
        constexpr int64_t Q = decltype(t)::value;
        if (y.scalar_type() == at::kFloat)
          gemm_amx_bf16<Q>(w, xb.data(), M, Mp, rows_[i], K_, bias, y.data_ptr<float>() + cols_[i],
                           N_);
        else
          gemm_amx_bf16<Q>(w, xb.data(), M, Mp, rows_[i], K_, bias,
                           reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()) + cols_[i], N_);
      });
      TORCH_CHECK(known, "unsupported GGUF type ", qtypes_[i]);
    }
    return y;
  }
#endif
  // the exact channels' activations, float32 [M, k], for the GEMM's epilogue
  const int k = static_cast<int>(exact_.size());
  std::vector<float> a(M * k);
  if (x.scalar_type() == at::kFloat)
    gather_channels(x.data_ptr<float>(), M, K_, exact_, a.data());
  else
    gather_channels(x.data_ptr<at::BFloat16>(), M, K_, exact_, a.data());
  auto epilogue = [&](size_t i) {
    return k > 0 ? Epilogue{nullptr, exact_w_.data_ptr<float>() + cols_[i], a.data(), N_, k}
                 : Epilogue{};
  };
#if defined(TM_AVX512) || defined(TM_AVX2)
  if (M >= kPreparedMinM) {  // one block-major copy for every segment, made as x is quantized
    std::vector<StartSpec> specs;
    for (int64_t q : qtypes_) {
      const StartSpec s = start_spec(q);
      if (s.c != 0 && std::find(specs.begin(), specs.end(), s) == specs.end()) specs.push_back(s);
    }
    const BatchActs acts =
        x.scalar_type() == at::kFloat
            ? BatchActs::quantize(x.data_ptr<float>(), M, K_, exact_, std::move(specs))
            : BatchActs::quantize(x.data_ptr<at::BFloat16>(), M, K_, exact_, std::move(specs));
    for (size_t i = 0; i < packed_.size(); ++i)
      gemm_into(acts, K_, packed_[i], qtypes_[i], rows_[i], y, cols_[i], bias_[i], epilogue(i));
    return y;
  }
#endif
  auto qm = quantize_except(x, exact_);
  for (size_t i = 0; i < packed_.size(); ++i)
    gemm_into(qm[0], qm[1], packed_[i], qtypes_[i], rows_[i], y, cols_[i], bias_[i], epilogue(i));
  return y;
}

void QuantLinear::observe_inputs(bool on) {
  observed_ = on ? at::zeros({K_}, packed_[0].options().dtype(at::kFloat)) : at::Tensor();
}

at::Tensor QuantLinear::observed_absmax() const {
  TORCH_CHECK(observed_.defined(), "observe_inputs(True) was not called");
  return observed_.clone();
}

void QuantLinear::set_exact_channels(std::vector<int64_t> channels) {
  std::sort(channels.begin(), channels.end());
  TORCH_CHECK(static_cast<int64_t>(channels.size()) <= kMaxExactChannels, "at most ",
              kMaxExactChannels, " exact channels");
  TORCH_CHECK(std::adjacent_find(channels.begin(), channels.end()) == channels.end(),
              "exact channels must be distinct");
  for (int64_t c : channels)
    TORCH_CHECK(c >= 0 && c < K_, "channel ", c, " is not in [0, ", K_, ")");
  const int64_t k = static_cast<int64_t>(channels.size());
  // [k, N_] and 16 floats of padding: a partial last tile's loads stay inside (see
  // epilogue_fill)
  at::Tensor table = at::zeros({k * N_ + 16}, packed_[0].options().dtype(at::kFloat));
  at::Tensor w = table.narrow(0, 0, k * N_).view({k, N_});
  for (size_t i = 0; i < packed_.size() && k > 0; ++i)
    w.narrow(1, cols_[i], rows_[i])
        .copy_(quant_cols(packed_[i], qtypes_[i], rows_[i], K_, channels));
  exact_ = std::move(channels);
  exact_w_ = k > 0 ? table : at::Tensor();
}
