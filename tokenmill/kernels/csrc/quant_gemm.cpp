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
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "amx.h"
#include "gguf_types.h"
#include "vec_math.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define TM_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TM_AVX2 1
#if defined(__AVXVNNI__)
// The avxvnni level: the AVX2 kernels with `vpdpbusd` on 256-bit vectors (AVX-VNNI, VEX-encoded:
// Intel cores from Alder Lake on, and CPUs without AVX-512) in place of `maddubs` + `madd`.
#define TM_AVXVNNI 1
#endif
#endif

namespace {

using namespace gguf_types;

// Per token and 32-input block of quantized activations.
struct ActMeta {
  float d;     // scale: x ~= d * q
  float dsum;  // d * sum(q)
  float dlo;   // d * sum(q[0:16])
  float dhi;   // d * sum(q[16:32])
};

// What a tile's float32 sums start from: the bias, and the exact channels' share
// sum_j a[m][j] * w[j][n] (QuantLinear::set_exact_channels), so neither takes a pass over y of
// its own.
struct Epilogue {
  const float* bias = nullptr;  // per output, padded to whole tiles
  const float* w = nullptr;     // the exact channels' weight columns, [k][ldw] (+16 floats)
  const float* a = nullptr;     // their activations, [tokens][k]
  int64_t ldw = 0;
  int k = 0;

  // The same for the outputs from column n and the tokens from m on.
  Epilogue at(int64_t n, int64_t m) const {
    return {bias ? bias + n : nullptr, w ? w + n : nullptr, a ? a + m * k : nullptr, ldw, k};
  }
};

// The 4 activation bytes at p as one int32: the group a dot step broadcasts to every row.
inline int32_t group4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---- activation quantization ----
// Per block of 32: amax = max |x|, d = amax * (1 / 127), q = round-to-nearest-even(x * (127 /
// amax)) (0 for an all-zero block), and the sums of q over each half, in 8-float vectors (every
// kernel level has AVX2), with the float operations in that order: the bytes of
// tests/test_quant_kernels.py's scalar reference.
inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// Quantizes one token's K inputs: put(b, bytes, meta, lo, hi) for each block b, with its 32
// bytes, metadata and the integer sums of its halves. Where zmask (one word per block, or null)
// has bit j of word b set, input b * 32 + j reads as 0.
template <typename T, typename Put>
inline void quantize_blocks(const T* x, int64_t K, const uint32_t* zmask, Put&& put) {
  for (int64_t b = 0; b < K / 32; ++b) {
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = vec_math::load8(x + b * 32 + i * 8);
    if (zmask && zmask[b]) {  // the block's channels read as 0: input b * 32 + j where bit j is set
      const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
      for (int i = 0; i < 4; ++i) {
        const __m256i bits = _mm256_set1_epi32(static_cast<int>((zmask[b] >> (8 * i)) & 0xFF));
        const __m256i hit = _mm256_cmpeq_epi32(_mm256_and_si256(bits, lane), lane);
        v[i] = _mm256_andnot_ps(_mm256_castsi256_ps(hit), v[i]);
      }
    }
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256 m01 = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
    const __m256 m23 = _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]));
    const float amax = vec_math::hmax8(_mm256_max_ps(m01, m23));
    const float d = amax * (1.f / 127.f);  // a product: -ffast-math cannot reorder it
    const float id = amax > 0.f ? 127.f / amax : 0.f;
    __m256i qi[4];  // the products rounded to nearest even (the default MXCSR mode)
    for (int i = 0; i < 4; ++i) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
    // two packs keep 128-bit lanes apart: dwords come out as q0[0:4] q1[0:4] q2[0:4] q3[0:4]
    // q0[4:8] q1[4:8] q2[4:8] q3[4:8]
    const __m256i p =
        _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
    const int slo = hsum_epi32(_mm256_add_epi32(qi[0], qi[1]));
    const int shi = hsum_epi32(_mm256_add_epi32(qi[2], qi[3]));
    put(b, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)),
        ActMeta{d, d * static_cast<float>(slo + shi), d * static_cast<float>(slo),
                d * static_cast<float>(shi)},
        slo, shi);
  }
}

// Quantizes the M tokens of x [M, K], threads over tokens (at least `grain` each), with input
// channels `zero` (sorted, distinct) read as 0: put(m, b, bytes, meta, lo, hi) for each block.
template <typename T, typename Put>
void quantize_tokens(const T* x, int64_t M, int64_t K, const std::vector<int64_t>& zero,
                     int64_t grain, Put&& put) {
  std::vector<uint32_t> zmask(zero.empty() ? 0 : K / 32, 0u);
  for (int64_t c : zero) zmask[c / 32] |= 1u << (c % 32);
  at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      quantize_blocks(x + m * K, K, zmask.empty() ? nullptr : zmask.data(),
                      [&](int64_t b, __m256i bytes, const ActMeta& mt, int lo, int hi) {
                        put(m, b, bytes, mt, lo, hi);
                      });
  });
}

#if defined(TM_AVX512) || defined(TM_AVX2)

// ---- 64-byte vector: one zmm (AVX-512) or two ymm (AVX2) ----
#ifdef TM_AVX512
struct V64 {
  __m512i v;
  static V64 load(const void* p) { return {_mm512_loadu_si512(p)}; }
  void store(void* p) const { _mm512_storeu_si512(p, v); }
  static V64 set1(uint8_t c) { return {_mm512_set1_epi8(static_cast<char>(c))}; }
  V64 operator&(V64 o) const { return {_mm512_and_si512(v, o.v)}; }
  V64 operator|(V64 o) const { return {_mm512_or_si512(v, o.v)}; }
  V64 operator^(V64 o) const { return {_mm512_xor_si512(v, o.v)}; }
  V64 srl16(int n) const { return {_mm512_srli_epi16(v, n)}; }
  V64 sll16(int n) const { return {_mm512_slli_epi16(v, n)}; }
  // byte i = table[byte i & 15] (bytes 0..15)
  V64 lookup(const V64& table) const { return {_mm512_shuffle_epi8(table.v, v)}; }
  static V64 table16(const int8_t* t) {
    return {_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)))};
  }
  // byte i = val where bit i of bits is set, else 0
  static V64 from_bits(uint64_t bits, uint8_t val) {
    return {_mm512_maskz_mov_epi8(bits, _mm512_set1_epi8(static_cast<char>(val)))};
  }
};
struct F16 {  // 16 floats, one per row of a tile
  __m512 v;
  static F16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static F16 half(const void* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  static F16 u8(const uint8_t* p) {
    return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)))};
  }
  // the low (shift 0) or high (shift 4) nibbles of 16 bytes
  static F16 u4(const uint8_t* p, int shift) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    return {
        _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(b, shift), _mm512_set1_epi32(0xF)))};
  }
  static F16 i8(const int8_t* p) {
    return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)))};
  }
  static F16 set1(float f) { return {_mm512_set1_ps(f)}; }
  static F16 zero() { return {_mm512_setzero_ps()}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  F16 operator*(F16 o) const { return {_mm512_mul_ps(v, o.v)}; }
  F16 operator+(F16 o) const { return {_mm512_add_ps(v, o.v)}; }
  static F16 fma(F16 a, F16 b, F16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
};
#else
struct V64 {
  __m256i a, b;
  static V64 load(const void* p) {
    auto q = reinterpret_cast<const __m256i*>(p);
    return {_mm256_loadu_si256(q), _mm256_loadu_si256(q + 1)};
  }
  void store(void* p) const {
    auto q = reinterpret_cast<__m256i*>(p);
    _mm256_storeu_si256(q, a);
    _mm256_storeu_si256(q + 1, b);
  }
  static V64 set1(uint8_t c) {
    const __m256i v = _mm256_set1_epi8(static_cast<char>(c));
    return {v, v};
  }
  V64 operator&(V64 o) const { return {_mm256_and_si256(a, o.a), _mm256_and_si256(b, o.b)}; }
  V64 operator|(V64 o) const { return {_mm256_or_si256(a, o.a), _mm256_or_si256(b, o.b)}; }
  V64 operator^(V64 o) const { return {_mm256_xor_si256(a, o.a), _mm256_xor_si256(b, o.b)}; }
  V64 srl16(int n) const { return {_mm256_srli_epi16(a, n), _mm256_srli_epi16(b, n)}; }
  V64 sll16(int n) const { return {_mm256_slli_epi16(a, n), _mm256_slli_epi16(b, n)}; }
  V64 lookup(const V64& table) const {
    return {_mm256_shuffle_epi8(table.a, a), _mm256_shuffle_epi8(table.b, b)};
  }
  static V64 table16(const int8_t* t) {
    const __m256i v =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
    return {v, v};
  }
  static __m256i bits32(uint32_t bits, uint8_t val) {
    // byte i takes bit i: spread byte i/8 of `bits` over 8 lanes, test one bit per lane.
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(static_cast<int>(bits)),
        _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL));
    const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
    const __m256i on = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    return _mm256_and_si256(on, _mm256_set1_epi8(static_cast<char>(val)));
  }
  static V64 from_bits(uint64_t bits, uint8_t val) {
    return {bits32(static_cast<uint32_t>(bits), val),
            bits32(static_cast<uint32_t>(bits >> 32), val)};
  }
};
struct F16 {
  __m256 a, b;
  static F16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static F16 half(const void* p) {
    auto q = reinterpret_cast<const __m128i*>(p);
    return {_mm256_cvtph_ps(_mm_loadu_si128(q)), _mm256_cvtph_ps(_mm_loadu_si128(q + 1))};
  }
  static F16 u8(const uint8_t* p) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p))),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8))))};
  }
  static F16 u4(const uint8_t* p, int shift) {
    const __m256i m = _mm256_set1_epi32(0xF);
    const auto half = [&](const uint8_t* q) {
      const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)q));
      return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(b, shift), m));
    };
    return {half(p), half(p + 8)};
  }
  static F16 i8(const int8_t* p) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8))))};
  }
  static F16 set1(float f) { return {_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
  static F16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  void store(float* p) const {
    _mm256_storeu_ps(p, a);
    _mm256_storeu_ps(p + 8, b);
  }
  F16 operator*(F16 o) const { return {_mm256_mul_ps(a, o.a), _mm256_mul_ps(b, o.b)}; }
  F16 operator+(F16 o) const { return {_mm256_add_ps(a, o.a), _mm256_add_ps(b, o.b)}; }
  static F16 fma(F16 x, F16 y, F16 z) {
    return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)};
  }
};
#endif

// One unpacked 32-input block of a 16-row tile: U[8] (see top), scales and offsets per row.
// Split types (Q2_K, Q3_K, Q6_K) have (s0, o0) for inputs 0..15 and (s1, o1) for 16..31.
struct alignas(64) Block {
  uint8_t u[8][64];
  float s0[16], o0[16], s1[16], o1[16];
};

// The codebook types: a weight is its block's scale times the type's codebook value at its 4-bit
// index: IQ4_NL / IQ4_XS (ggml's kvalues_iq4nl), and the lattice types, repacked (gguf_pack.py:
// a grid magnitude i at index h + i, its negative at h - 1 - i; h = 4 for the 6-value types,
// whose 3-bit indices are laid out as Q3_K's bits), whose scale is d * kFactor * sc.
template <int64_t Q>
constexpr bool kCodebookType = Q == IQ4_NL || Q == IQ4_XS || lattice(Q);
template <int64_t Q>
struct Codebook {
  int8_t v[16];
  constexpr Codebook() : v() {
    constexpr int8_t iq4[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                1,    13,   25,  38,  53,  69,  89,  113};
    constexpr int8_t iq1[3] = {1, 7, 9}, iq2[3] = {8, 25, 43};
    constexpr int8_t iq3xxs[8] = {4, 12, 20, 28, 36, 44, 52, 62};
    constexpr int8_t iq3s[8] = {1, 3, 5, 7, 9, 11, 13, 15};
    const int8_t* mag = Q == IQ1_S || Q == IQ1_M ? iq1
                        : Q == IQ3_XXS           ? iq3xxs
                        : Q == IQ3_S             ? iq3s
                                                 : iq2;
    const int levels = lattice3(Q) ? 3 : 8, h = lattice3(Q) ? 4 : 8;
    for (int i = 0; i < 16; ++i) v[i] = lattice(Q) ? 0 : iq4[i];
    if (lattice(Q))
      for (int i = 0; i < levels; ++i) {
        v[h + i] = mag[i];
        v[h - 1 - i] = static_cast<int8_t>(-mag[i]);
      }
  }
};
template <int64_t Q>
constexpr Codebook<Q> kCodebook;
// The power of two in a lattice type's scale d * kFactor * sc (1 for the others).
template <int64_t Q>
constexpr float kFactor = Q == IQ3_XXS                ? 0.25f
                          : Q == IQ3_S || !lattice(Q) ? 1.f
                                                      : 0.125f;

// Whether U holds signed bytes (AVX2 Q8_0 and codebook types: sign trick instead of an offset;
// with `vpdpbusd` the offset of 128 costs less than two sign operations per step).
template <int64_t Q>
constexpr bool kSignedU =
#if defined(TM_AVX512) || defined(TM_AVXVNNI)
    false;
#else
    Q == Q8_0 || kCodebookType<Q>;
#endif

// On AVX-512, types whose offset is an integer multiple of the scale (w = s * (u - c)) start each
// token's integer sum at -c * sum(q) (its chain start) instead of paying a float FMA for the
// offset: the exact integer sum of (u - c) * q, on every path. AVX2 applies every offset in float.
#ifdef TM_AVX512
constexpr bool kChainStarts = true;
#else
constexpr bool kChainStarts = false;
#endif

// The integer offset c of a symmetric type's unsigned weights (0: the offset is a float min, or
// the weights are signed bytes).
template <int64_t Q>
constexpr int32_t kIntOffset = kSignedU<Q>                     ? 0
                               : Q == Q8_0 || kCodebookType<Q> ? 128
                               : Q == Q4_0                     ? 8
                               : Q == Q5_0                     ? 16
                               : Q == Q3_K                     ? 4
                               : Q == Q6_K                     ? 32
                                                               : 0;

// U of a codebook type: the codebook, signed (AVX2) or + 128 as unsigned bytes (offset 128).
template <int64_t Q>
struct CodebookBytes {
  alignas(16) int8_t v[16];
  constexpr CodebookBytes() : v() {
    for (int i = 0; i < 16; ++i)
      v[i] = static_cast<int8_t>(kSignedU<Q> ? kCodebook<Q>.v[i] : kCodebook<Q>.v[i] ^ -128);
  }
};
template <int64_t Q>
constexpr CodebookBytes<Q> kCodebookBytes;
template <int64_t Q>
constexpr bool kSplit = Q == Q2_K || Q == Q3_K || Q == Q6_K || lattice_split(Q);

// Block b's scales and offsets per row, in registers (see Block): s(part), o(part).
struct Scales {
  F16 s0, o0, s1, o1;
  F16 s(int part) const { return part ? s1 : s0; }
  F16 o(int part) const { return part ? o1 : o0; }
};

// Where block b (0..7 for K types, 0 for legacy) of unit `src` keeps its low 4 bits (256
// bytes: byte c * 64 + r * 4 + i holds inputs 4c + i (low nibble) and 4c + 16 + i (high) of row
// r) and its fifth bits (Q5 types: eight 64-bit masks, bit r * 4 + i of mask t = input 4t + i).
template <int64_t Q>
inline const uint8_t* nibble_base(const uint8_t* src, int b) {
  if constexpr (Q == Q4_0 || Q == IQ4_NL) return src + 32;
  if constexpr (Q == IQ4_XS || Q == IQ3_XXS || Q == IQ3_S) return src + 160 + b * 256;
  if constexpr (Q == Q4_1) return src + 64;
  if constexpr (Q == Q5_0) return src + 96;
  if constexpr (Q == Q5_1) return src + 128;
  if constexpr (Q == Q4_K) return src + 320 + b * 256;
  if constexpr (Q == Q5_K) return src + 832 + b * 256;
  if constexpr (Q == Q6_K) return src + 288 + b * 256;
  return nullptr;
}
template <int64_t Q>
inline const uint8_t* high_bit_base(const uint8_t* src, int b) {
  if constexpr (Q == Q5_0) return src + 32;
  if constexpr (Q == Q5_1) return src + 64;
  if constexpr (Q == Q5_K) return src + 320 + b * 64;
  if constexpr (Q == Q3_K) return src + 1312 + b * 64;  // H3: masks of bit 2
  if constexpr (lattice3(Q)) return src + (lattice_split(Q) ? 1312 : 1184) + b * 64;
  return nullptr;
}
// Where block b of a Q2_K / Q3_K unit keeps its bit pairs (L2, 128 bytes) and of a Q6_K unit its
// 5th-6th bits (H6): byte x of vector h, bits 2i..2i+1 = those bits of U[4h + i][x].
template <int64_t Q>
inline const uint8_t* pair_base(const uint8_t* src, int b) {
  if constexpr (Q == Q2_K) return src + 320 + b * 128;
  if constexpr (Q == Q3_K) return src + 288 + b * 128;
  if constexpr (lattice3(Q)) return src + (lattice_split(Q) ? 288 : 160) + b * 128;
  if constexpr (Q == Q6_K) return src + 2336 + b * 128;
  return nullptr;
}

template <int64_t Q>
inline Scales block_scales(const uint8_t* src, int b) {
  if constexpr (lattice_split(Q)) {
    // per 16 inputs d * kFactor * sc; offsets -128 * s for U + 128
    const F16 d = F16::half(src) * F16::set1(kFactor<Q>);
    const F16 s0 = d * F16::i8(reinterpret_cast<const int8_t*>(src + 32 + 2 * b * 16));
    const F16 s1 = d * F16::i8(reinterpret_cast<const int8_t*>(src + 32 + (2 * b + 1) * 16));
    const F16 c = F16::set1(kSignedU<Q> ? 0.f : -128.f);
    return {s0, s0 * c, s1, s1 * c};
  } else if constexpr (kCodebookType<Q>) {
    // per 32 inputs d (IQ4_NL) or d (times kFactor) times an int8 scale (IQ4_XS, lattice
    // types); offset -128 * s for U + 128
    const F16 d = kFactor<Q> == 1.f ? F16::half(src) : F16::half(src) * F16::set1(kFactor<Q>);
    const F16 s = Q == IQ4_NL ? d : d * F16::i8(reinterpret_cast<const int8_t*>(src + 32 + b * 16));
    return {s, kSignedU<Q> ? F16::zero() : s * F16::set1(-128.f), F16::zero(), F16::zero()};
  } else if constexpr (Q == Q4_0 || Q == Q4_1 || Q == Q5_0 || Q == Q5_1) {
    const F16 d = F16::half(src);
    const bool has_m = Q == Q4_1 || Q == Q5_1;
    return {d, has_m ? F16::half(src + 32) : d * F16::set1(Q == Q4_0 ? -8.f : -16.f), F16::zero(),
            F16::zero()};
  } else if constexpr (Q == Q8_0) {
    const F16 d = F16::half(src);
    return {d, kSignedU<Q> ? F16::zero() : d * F16::set1(-128.f), F16::zero(), F16::zero()};
  } else if constexpr (Q == Q2_K) {
    // per 16 inputs a byte: the scale in its low nibble, the min in its high one
    const F16 d = F16::half(src), ndmin = F16::half(src + 32) * F16::set1(-1.f);
    const uint8_t* sm = src + 64 + 2 * b * 16;
    return {d * F16::u4(sm, 0), ndmin * F16::u4(sm, 4), d * F16::u4(sm + 16, 0),
            ndmin * F16::u4(sm + 16, 4)};
  } else if constexpr (Q == Q4_K || Q == Q5_K) {
    const F16 d = F16::half(src), dmin = F16::half(src + 32);
    return {d * F16::u8(src + 64 + b * 16), dmin * F16::u8(src + 192 + b * 16) * F16::set1(-1.f),
            F16::zero(), F16::zero()};
  } else {
    static_assert(kSplit<Q>, "unknown type");
    const F16 d = F16::half(src), c = F16::set1(-static_cast<float>(Q == Q3_K ? 4 : 32));
    const F16 s0 = d * F16::i8(reinterpret_cast<const int8_t*>(src + 32 + 2 * b * 16));
    const F16 s1 = d * F16::i8(reinterpret_cast<const int8_t*>(src + 32 + (2 * b + 1) * 16));
    return {s0, s0 * c, s1, s1 * c};
  }
}

// Unpacks block b of unit `src` into `out`.
template <int64_t Q>
inline void unpack_block(const uint8_t* src, int b, Block& out) {
  const Scales sc = block_scales<Q>(src, b);
  sc.s0.store(out.s0);
  sc.o0.store(out.o0);
  if constexpr (kSplit<Q>) {
    sc.s1.store(out.s1);
    sc.o1.store(out.o1);
  }
  if constexpr (Q == Q8_0) {
    if constexpr (kSignedU<Q>) {
      std::memcpy(out.u, src + 32, 512);
    } else {
      const V64 flip = V64::set1(0x80);
      for (int t = 0; t < 8; ++t) (V64::load(src + 32 + t * 64) ^ flip).store(out.u[t]);
    }
    return;
  }
  if constexpr (Q == Q2_K || Q == Q3_K || lattice3(Q)) {
    const V64 lo2 = V64::set1(0x03);
    [[maybe_unused]] const V64 table = V64::table16(kCodebookBytes<Q>.v);  // lattice types
    const uint8_t* P = pair_base<Q>(src, b);
    for (int h = 0; h < 2; ++h) {
      const V64 p = V64::load(P + h * 64);
      for (int i = 0; i < 4; ++i) {
        V64 u = (i ? p.srl16(2 * i) : p) & lo2;
        if constexpr (Q != Q2_K) {
          uint64_t m;
          std::memcpy(&m, high_bit_base<Q>(src, b) + (4 * h + i) * 8, 8);
          u = u | V64::from_bits(m, 0x04);
        }
        if constexpr (kCodebookType<Q>) u = u.lookup(table);
        u.store(out.u[4 * h + i]);
      }
    }
    return;
  }
  const V64 lo4 = V64::set1(0x0F);
  const uint8_t* L = nibble_base<Q>(src, b);
  if constexpr (kCodebookType<Q>) {
    const V64 table = V64::table16(kCodebookBytes<Q>.v);
    for (int c = 0; c < 4; ++c) {
      const V64 p = V64::load(L + c * 64);
      (p & lo4).lookup(table).store(out.u[c]);
      (p.srl16(4) & lo4).lookup(table).store(out.u[c + 4]);
    }
    return;
  }
  for (int c = 0; c < 4; ++c) {
    const V64 p = V64::load(L + c * 64);
    (p & lo4).store(out.u[c]);
    (p.srl16(4) & lo4).store(out.u[c + 4]);
  }
  if constexpr (Q == Q5_0 || Q == Q5_1 || Q == Q5_K) {
    const uint8_t* H = high_bit_base<Q>(src, b);
    for (int t = 0; t < 8; ++t) {
      uint64_t m;
      std::memcpy(&m, H + t * 8, 8);
      (V64::load(out.u[t]) | V64::from_bits(m, 0x10)).store(out.u[t]);
    }
  } else if constexpr (Q == Q6_K) {
    const V64 two = V64::set1(0x30);
    for (int h = 0; h < 2; ++h) {
      const V64 hb = V64::load(pair_base<Q>(src, b) + h * 64);
      for (int i = 0; i < 4; ++i) {
        const V64 hi = (i < 2 ? hb.sll16(4 - 2 * i) : hb.srl16(2 * i - 4)) & two;
        (V64::load(out.u[h * 4 + i]) | hi).store(out.u[h * 4 + i]);
      }
    }
  }
}

#ifndef TM_AVX512
// A codebook type's weight bytes for 32 indices (0..15).
template <int64_t Q>
inline __m256i codebook_lookup(__m256i idx) {
  const __m128i table = _mm_load_si128(reinterpret_cast<const __m128i*>(kCodebookBytes<Q>.v));
  return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(table), idx);
}

// Rows 8h..8h+7 of U[t] of block b of unit `src` (what unpack_block stores to u[t] + 32 h),
// computed in registers: the streaming path's weights never round-trip through memory.
template <int64_t Q>
inline __m256i u_half(const uint8_t* src, int b, int t, int h) {
  if constexpr (Q == Q8_0) {
    const __m256i w =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 + t * 64 + h * 32));
    return kSignedU<Q> ? w : _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80)));
  } else if constexpr (Q == Q2_K || Q == Q3_K || lattice3(Q)) {
    const __m256i p = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(pair_base<Q>(src, b) + (t / 4) * 64 + h * 32));
    const __m256i u = _mm256_and_si256(_mm256_srli_epi16(p, 2 * (t & 3)), _mm256_set1_epi8(3));
    if constexpr (Q == Q2_K) return u;
    uint32_t m;
    std::memcpy(&m, high_bit_base<Q>(src, b) + t * 8 + h * 4, 4);
    const __m256i u3 = _mm256_or_si256(u, V64::bits32(m, 0x04));
    if constexpr (!kCodebookType<Q>) return u3;
    return codebook_lookup<Q>(u3);
  } else {
    const __m256i lo4 = _mm256_set1_epi8(0x0F);
    const __m256i p = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(nibble_base<Q>(src, b) + (t & 3) * 64 + h * 32));
    __m256i u = _mm256_and_si256(t < 4 ? p : _mm256_srli_epi16(p, 4), lo4);
    if constexpr (kCodebookType<Q>) {
      u = codebook_lookup<Q>(u);
    } else if constexpr (Q == Q5_0 || Q == Q5_1 || Q == Q5_K) {
      uint32_t m;
      std::memcpy(&m, high_bit_base<Q>(src, b) + t * 8 + h * 4, 4);
      u = _mm256_or_si256(u, V64::bits32(m, 0x10));
    } else if constexpr (Q == Q6_K) {
      const __m256i hb = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(pair_base<Q>(src, b) + (t / 4) * 64 + h * 32));
      const int i = t & 3;
      const __m256i hi =
          i < 2 ? _mm256_slli_epi16(hb, 4 - 2 * i) : _mm256_srli_epi16(hb, 2 * i - 4);
      u = _mm256_or_si256(u, _mm256_and_si256(hi, _mm256_set1_epi8(0x30)));
    }
    return u;
  }
}
#endif

// Integer dot of U[t0..t0+n) with 4-byte groups of token x (broadcast), plus `start`: one int32
// per row.
#ifdef TM_AVX512
struct I16 {
  __m512i v;
};
inline I16 dot_u(const Block& blk, const int8_t* x, int t0, int n, int32_t start) {
  // Two independent chains (n is even): with one, batches of 1-4 tokens wait on vpdpbusd's
  // latency (measured 1.05-1.19x on the default model's gate_up / down at M = 1..4).
  __m512i acc[2] = {_mm512_set1_epi32(start), _mm512_setzero_si512()};
  for (int t = t0; t < t0 + n; ++t) {
    acc[t & 1] = _mm512_dpbusd_epi32(acc[t & 1], _mm512_load_si512(blk.u[t]),
                                     _mm512_set1_epi32(group4(x + 4 * t)));
  }
  return {_mm512_add_epi32(acc[0], acc[1])};
}
inline F16 to_float(I16 v) { return {_mm512_cvtepi32_ps(v.v)}; }

// Quantized activations as the kernels read them: token m's 32 inputs of block b, their
// metadata and their chain starts (the symmetric types' integer offsets, see kStartSpec), in
// either layout: row-major as quantize_activations writes them ([M, K]), or block-major
// ([K / 32, M, 32], BatchActs) for the AMX path, where a block's tokens then sit on consecutive
// cache lines instead of K bytes apart (which aliases to a few L1 sets).
struct Acts {
  const int8_t* x;
  const ActMeta* meta;
  int64_t xs, xb, ms, mb;  // token and block strides of x (bytes) and meta (entries)
  const int32_t* start;    // two per entry of meta (nullptr: the type takes none)
  static Acts row_major(const int8_t* x, const ActMeta* meta, int64_t K, const int32_t* start) {
    return {x, meta, K, 32, K / 32, 1, start};
  }
  const int8_t* at(int64_t m, int64_t b) const { return x + m * xs + b * xb; }
  const ActMeta& meta_at(int64_t m, int64_t b) const { return meta[m * ms + b * mb]; }
  const int32_t* start_at(int64_t m, int64_t b) const { return start + (m * ms + b * mb) * 2; }
  Acts from(int64_t m0) const {
    return {x + m0 * xs, meta + m0 * ms, xs, xb, ms, mb, start ? start + m0 * ms * 2 : nullptr};
  }
};

// acc[m] += block b's contribution for tokens 0..MT of `acts`, with the batched path's integer
// sums and float operations (accumulate_tokens below), so that a row's output does not depend
// on the path its batch takes.
template <int64_t Q, int MT>
inline void accumulate(const Block& blk, const Acts& acts, int64_t b, F16* acc) {
  constexpr bool starts = kIntOffset<Q> != 0;  // else float offsets
  const F16 s0 = F16::load(blk.s0), o0 = F16::load(blk.o0);
  for (int m = 0; m < MT; ++m) {
    const int8_t* x = acts.at(m, b);
    const ActMeta& a = acts.meta_at(m, b);
    const int32_t* st = starts ? acts.start_at(m, b) : nullptr;
    const F16 d = F16::set1(a.d);
    if constexpr (kSplit<Q>) {
      const F16 lo = to_float(dot_u(blk, x, 0, 4, starts ? st[0] : 0));
      const F16 hi = to_float(dot_u(blk, x, 4, 4, starts ? st[1] : 0));
      acc[m] = F16::fma(F16::fma(hi, F16::load(blk.s1), lo * s0), d, acc[m]);
      if constexpr (!starts) {
        acc[m] = F16::fma(o0, F16::set1(a.dlo), acc[m]);
        acc[m] = F16::fma(F16::load(blk.o1), F16::set1(a.dhi), acc[m]);
      }
    } else {
      const F16 dot = to_float(dot_u(blk, x, 0, 8, starts ? st[0] : 0));
      acc[m] = F16::fma(dot, s0 * d, acc[m]);
      if constexpr (!starts) acc[m] = F16::fma(o0, F16::set1(a.dsum), acc[m]);
    }
  }
}
#else
struct I16 {
  __m256i a, b;
};
inline F16 to_float(I16 v) { return {_mm256_cvtepi32_ps(v.a), _mm256_cvtepi32_ps(v.b)}; }
#endif

// What a tile's accumulators start from for tokens 0 .. count of `ep`'s view, into
// acc[m * stride ...] (16 floats each): the bias, then the exact channels' share (a partial last
// tile reads the next columns, or the table's padding, for the rows it does not store). Every
// path starts its sums here, so a row's float operations do not depend on the path. 8 tokens at
// a time: each weight column is loaded once per group and the tokens' FMA chains overlap (one
// token at a time after the sums, as before: batch-1 linears 0.93-0.96x of this; 32 tokens
// within noise).
inline void epilogue_fill(const Epilogue& ep, int64_t count, float* acc, int64_t stride) {
  constexpr int kGroup = 8;
  for (int64_t m0 = 0; m0 < count; m0 += kGroup) {
    const int n = static_cast<int>(std::min<int64_t>(kGroup, count - m0));
    F16 v[kGroup];
    for (int i = 0; i < n; ++i) v[i] = ep.bias ? F16::load(ep.bias) : F16::zero();
    for (int j = 0; j < ep.k; ++j) {
      const F16 w = F16::load(ep.w + j * ep.ldw);
      for (int i = 0; i < n; ++i) v[i] = F16::fma(F16::set1(ep.a[(m0 + i) * ep.k + j]), w, v[i]);
    }
    for (int i = 0; i < n; ++i) v[i].store(acc + (m0 + i) * stride);
  }
}

// The same for the MT tokens of a streaming pass, into registers.
template <int MT>
inline void epilogue_start(const Epilogue& ep, F16* acc) {
  alignas(64) float v[MT * 16];
  epilogue_fill(ep, MT, v, 16);
  for (int m = 0; m < MT; ++m) acc[m] = F16::load(v + m * 16);
}

#ifdef TM_AVX512
// 16 floats as bfloat16 bits, rounded to nearest even.
inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}
#endif

// Writes the first `rows` (<= 16) outputs of a tile: float32, or bfloat16 rounded to nearest
// even.
template <typename TY>
inline void store_row(F16 acc, TY* y, int rows) {
#ifdef TM_AVX512
  const __mmask16 keep = static_cast<__mmask16>((1u << rows) - 1);
  if constexpr (std::is_same_v<TY, float>) {
    _mm512_mask_storeu_ps(y, keep, acc.v);
  } else {
    _mm256_mask_storeu_epi16(y, keep, to_bf16(acc.v));
  }
#else
  if constexpr (std::is_same_v<TY, float>) {
    if (rows == 16) return acc.store(y);
    alignas(32) float v[16];
    acc.store(v);
    std::memcpy(y, v, rows * 4);
  } else {
    const auto round = [](__m256 f) {
      const __m256i bits = _mm256_castps_si256(f);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
      const __m256i r = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
      return _mm256_srli_epi32(r, 16);
    };
    // packus interleaves the halves' 128-bit lanes: restore their order
    const __m256i h =
        _mm256_permute4x64_epi64(_mm256_packus_epi32(round(acc.a), round(acc.b)), 0xD8);
    if (rows == 16) return _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), h);
    alignas(32) uint16_t v[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(v), h);
    std::memcpy(y, v, rows * 2);
  }
#endif
}

// How far ahead the weight streams are prefetched, in bytes: into L1 (_MM_HINT_T0) and into L2
// (_MM_HINT_T1); 0 turns a kind off. Set once per process from the CPU's vendor
// (set_weight_prefetch, from tokenmill/kernels/cpu_ops.py), before any GEMM runs.
int64_t g_prefetch_l1 = 8192;
int64_t g_prefetch_l2 = 32768;

// Streams a 16-row tile's blocks in order: fn(src, b, kb) for every 32-input block kb, block b
// of the unit at src. Batch 1 is bound by how many misses are in flight, and the tiles of a
// thread are contiguous, so every line of the unit is prefetched into L1 g_prefetch_l1 ahead and
// into L2 g_prefetch_l2 ahead. On Intel cores (8 KiB / 32 KiB) the L1 prefetches alone wait on
// the core's few line-fill buffers, the L2 ones keep more lines coming from DRAM behind them
// (Sapphire Rapids, weights cycled from DRAM, 2 threads: 1.08x Q4_K, 1.13x Q6_K and Q5_0, 21.5
// -> 24.2 GB/s; 0.95x where they come from L3; batch-1 decode 1.06x on the default model, about
// 1.04x on the 1B shape). AMD cores fill L1 for every hint, so 32 KiB ahead evicts the lines in
// use there: the L2 kind is off (cpu_ops.weight_prefetch).
template <int64_t Q, typename Fn>
inline void for_each_block(const uint8_t* w, int64_t K, Fn&& fn) {
  const int64_t uk = unit_k(Q), ub = unit_bytes(Q), bpu = uk / 32;
  const int64_t l1 = g_prefetch_l1, l2 = g_prefetch_l2;
  for (int64_t u = 0; u < K / uk; ++u) {
    const uint8_t* src = w + u * ub;
    for (int64_t line = 0; line < ub; line += 64) {
      if (l1) _mm_prefetch(reinterpret_cast<const char*>(src + l1 + line), _MM_HINT_T0);
      if (l2) _mm_prefetch(reinterpret_cast<const char*>(src + l2 + line), _MM_HINT_T1);
    }
    for (int b = 0; b < bpu; ++b) fn(src, b, u * bpu + b);
  }
}

#ifdef TM_AVX512
// One 16-row tile for tokens [0, MT), unpacking each block as it streams; `start`: the tokens'
// chain starts, [MT][K / 32][2] (gemm_typed).
template <int64_t Q, int MT, typename TY>
void tile_streaming(const uint8_t* w, const int8_t* xq, const ActMeta* meta, const int32_t* start,
                    int64_t K, const Epilogue& ep, TY* y, int64_t ldy, int rows) {
  const Acts acts = Acts::row_major(xq, meta, K, start);
  F16 acc[MT];
  epilogue_start<MT>(ep, acc);
  Block blk;
  for_each_block<Q>(w, K, [&](const uint8_t* src, int b, int64_t kb) {
    unpack_block<Q>(src, b, blk);
    accumulate<Q, MT>(blk, acts, kb, acc);
  });
  for (int m = 0; m < MT; ++m) store_row(acc[m], y + m * ldy, rows);
}
#endif

// ---- Batches of 5+ tokens (decode of many sequences, prefill) ----
// Each block of a tile (or of two tiles, AVX-512) is unpacked once and applied to every token of
// a pass of up to kBatchChunk tokens, several tokens together (kTokenGroup) so that each weight
// vector loaded serves all of them and their chains of dot steps overlap. Every path does the
// same integer sums and float operations per row as the streaming path, so a row's output does
// not depend on its batch (bitwise; the AMX tiles, from kAmxMinM tokens on, aside).

// An uninitialized array (a std::vector would first zero it: a pass of its own, per call).
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> p;
  void resize(int64_t n) { p.reset(n > 0 ? new T[n] : nullptr); }
  T* data() { return p.get(); }
  const T* data() const { return p.get(); }
};

// The sums of a block's 32 signed bytes over inputs 0..15 and 16..31 (sums of absolute
// differences from -128, four 8-byte groups at a time).
inline std::pair<int32_t, int32_t> half_sums(const int8_t* x) {
  const __m256i v = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)),
                                     _mm256_set1_epi8(static_cast<char>(0x80)));
  const __m256i s = _mm256_sad_epu8(v, _mm256_setzero_si256());  // each group: its sum + 1024
  const auto g = [&](int i) { return static_cast<int32_t>(_mm256_extract_epi64(s, i)); };
  return {g(0) + g(1) - 2048, g(2) + g(3) - 2048};
}

// Which chain starts a type's batched kernel begins its integer sums at: -c * sum(q) over each
// block (split = false) or over each half of it (split = true); c = 0: none.
struct StartSpec {
  int32_t c = 0;
  bool split = false;
  bool operator==(const StartSpec& o) const { return c == o.c && split == o.split; }
  // A block's two chain starts from the integer sums of its halves' activations.
  void fill(int32_t lo, int32_t hi, int32_t* st) const {
    st[0] = split ? -c * lo : -c * (lo + hi);
    st[1] = split ? -c * hi : 0;
  }
};
template <int64_t Q>
constexpr StartSpec kStartSpec = {kChainStarts ? kIntOffset<Q> : 0, kSplit<Q>};

// Quantized activations block-major, as the batched path reads them: for block kb and token m,
// x[(kb * M + m) * 32 ...] (32 bytes), meta[kb * M + m] and, for each StartSpec of `specs`
// (symmetric types on AVX-512), the chain starts starts<Q>()[(kb * M + m) * 2 + h] = -c * sum(q)
// over the block (h = 0), or over its halves (split types: h = 0 for inputs 0..15, 1 for
// 16..31). A block's tokens sit on consecutive cache lines, not K bytes apart (which aliases to
// a few L1 sets).
struct BatchActs {
  int64_t M = 0, KB = 0;
  Scratch<int8_t> x;
  Scratch<ActMeta> meta;
  Scratch<int32_t> start;  // one [KB][M][2] array per spec
  std::vector<StartSpec> specs;

  // Type Q's chain starts (nullptr where it takes none).
  template <int64_t Q>
  const int32_t* starts() const {
    constexpr StartSpec want = kStartSpec<Q>;
    if (want.c == 0) return nullptr;
    for (size_t i = 0; i < specs.size(); ++i)
      if (specs[i] == want) return start.data() + i * M * KB * 2;
    TORCH_CHECK(false, "activations prepared without the chain starts of GGUF type ", Q);
    return nullptr;
  }

  // Token m's block b: its bytes, metadata and the integer sums of its halves.
  void put(int64_t m, int64_t b, __m256i bytes, const ActMeta& mt, int32_t lo, int32_t hi) {
    const int64_t i = b * M + m;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x.data() + i * 32), bytes);
    meta.data()[i] = mt;
    for (size_t s = 0; s < specs.size(); ++s)
      specs[s].fill(lo, hi, start.data() + (s * M * KB + i) * 2);
  }

  BatchActs(int64_t m, int64_t k, std::vector<StartSpec> sp)
      : M(m), KB(k / 32), specs(std::move(sp)) {
    x.resize(M * k);
    meta.resize(M * KB);
    start.resize(static_cast<int64_t>(specs.size()) * M * KB * 2);
  }

  // From activations quantized row-major (quantize_activations) for type Q.
  template <int64_t Q>
  static BatchActs from_rows(const int8_t* xq, const ActMeta* meta, int64_t M, int64_t K) {
    std::vector<StartSpec> specs;
    if (kStartSpec<Q>.c != 0) specs.push_back(kStartSpec<Q>);
    BatchActs a(M, K, std::move(specs));
    const int64_t KB = K / 32;
    // Threads only from 1 MiB of activations on (prefill): a decode batch's copy is a few
    // microseconds, less than waking the pool.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / (M * 32));
    at::parallel_for(0, KB, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t m = 0; m < M; ++m) {
          const int8_t* src = xq + m * K + b * 32;
          const auto [lo, hi] = a.specs.empty() ? std::pair<int32_t, int32_t>{} : half_sums(src);
          a.put(m, b, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)), meta[m * KB + b],
                lo, hi);
        }
    });
    return a;
  }

  // Quantizes x [M, K] straight into this layout (the bytes and metadata of
  // quantize_activations), with input channels `zero` (sorted, distinct) read as 0, and the
  // chain starts of every spec: one pass, threads over tokens.
  template <typename T>
  static BatchActs quantize(const T* x, int64_t M, int64_t K, const std::vector<int64_t>& zero,
                            std::vector<StartSpec> specs) {
    BatchActs a(M, K, std::move(specs));
    quantize_tokens(x, M, K, zero, 8,
                    [&](int64_t m, int64_t b, __m256i bytes, const ActMeta& mt, int lo, int hi) {
                      a.put(m, b, bytes, mt, lo, hi);
                    });
    return a;
  }
};

#ifdef TM_AVX512
// On the cores measured (Sapphire Rapids), vpdpbusd zmm issues on the same two ports as every
// float op, so each conversion, multiply and FMA per block costs as much as one of its 8 dot
// steps. This path spends as few as it can: two tiles' weights stay in registers while the
// block is applied to every token, and each token's 4-byte broadcasts serve both tiles. A chain
// of dot steps waits 5 cycles per step, so several tokens go through a block together, each
// with its own chains.

inline __m512i zero_idiom() {
  __m512i z;
  // volatile: identical asm statements would otherwise merge into one zero register that every
  // chain then copies (a move per chain and token).
  __asm__ volatile("vpxord %0, %0, %0" : "=v"(z));  // renamed to zero, no execution port
  return z;
}

// One unpacked block of NT tiles, in registers: U, and the per-row scales and offsets.
template <int NT>
struct BlockRegs {
  __m512i U[NT][8];
  __m512 s0[NT], o0[NT], s1[NT], o1[NT];
};

// Block kb of the NT tiles applied to the G tokens whose quantized inputs start at x (32 bytes
// each), with their metadata and chain starts: acc[k * 32 + 16 * i ...] += tile i's contribution
// to token k. Each tile's dot steps for a token form one chain per half of the block where the
// type scales the halves apart (Q2_K, Q3_K, Q6_K), or where a single token would leave too few
// independent chains (then the halves are joined by one add); else one chain of 8.
template <int64_t Q, int NT, int G>
inline void accumulate_tokens(const BlockRegs<NT>& r, const int8_t* x, const ActMeta* meta,
                              const int32_t* start, float* acc) {
  constexpr int32_t c = kIntOffset<Q>;
  constexpr int H = kSplit<Q> || G == 1 ? 2 : 1;  // chains per token and tile
  __m512i a[G][NT][H];
  for (int k = 0; k < G; ++k)
    for (int i = 0; i < NT; ++i)
      for (int h = 0; h < H; ++h) {
        const bool starts = c != 0 && (h == 0 || kSplit<Q>);
        a[k][i][h] = starts ? _mm512_set1_epi32(start[2 * k + h]) : zero_idiom();
      }
  for (int t = 0; t < 8 / H; ++t)
    for (int k = 0; k < G; ++k)
      for (int h = 0; h < H; ++h) {
        const int u = t + h * 4;  // H == 2: inputs 0..15 in chain 0, 16..31 in chain 1
        const __m512i b = _mm512_set1_epi32(group4(x + 32 * k + 4 * u));
        for (int i = 0; i < NT; ++i) a[k][i][h] = _mm512_dpbusd_epi32(a[k][i][h], r.U[i][u], b);
      }
  for (int k = 0; k < G; ++k) {
    const __m512 d = _mm512_set1_ps(meta[k].d);
    for (int i = 0; i < NT; ++i) {
      float* out = acc + 32 * k + 16 * i;
      __m512 y = _mm512_loadu_ps(out);
      if constexpr (kSplit<Q>) {
        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(a[k][i][0]), r.s0[i]);
        v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[k][i][1]), r.s1[i], v);
        y = _mm512_fmadd_ps(v, d, y);
        if constexpr (c == 0) {  // float offsets (Q2_K)
          y = _mm512_fmadd_ps(r.o0[i], _mm512_set1_ps(meta[k].dlo), y);
          y = _mm512_fmadd_ps(r.o1[i], _mm512_set1_ps(meta[k].dhi), y);
        }
      } else {
        const __m512i e = H == 2 ? _mm512_add_epi32(a[k][i][0], a[k][i][H - 1]) : a[k][i][0];
        y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(e), _mm512_mul_ps(r.s0[i], d), y);
        if constexpr (c == 0) y = _mm512_fmadd_ps(r.o0[i], _mm512_set1_ps(meta[k].dsum), y);
      }
      _mm512_storeu_ps(out, y);
    }
  }
}

// Tokens applied together per pass over a block's registers: enough independent dot chains
// (G x NT x chains per token) to cover vpdpbusd's latency on both ports. 4 tokens (8 chains of
// 8) ran 1.10-1.15x faster than 1 token (4 chains of 4 and an add per tile) on Q4_K and Q4_0 at
// 8-64 tokens; Q6_K, with two chains per token already, gains 1.06-1.12x from 2 (harness A/B,
// 1 thread). Q6_K at 4 tokens would hold 16 chains and 16 weight vectors, more than the 32
// registers.
template <int64_t Q>
constexpr int kTokenGroup = kSplit<Q> ? 2 : 4;

// Block kb of NT (1 or 2) tiles applied to tokens m0 .. m0 + MC:
// acc[(m - m0) * 32 + 16 * i ...] += tile i's contribution (16 floats per tile and token).
// Always inlined into tiles_batched: left to GCC, types whose code is identical (Q4_1 and Q4_K)
// shared one out-of-line copy once more types were built (1B-shape Q4_K_M linears at 32 tokens:
// 0.92-0.95x), and Q4_0 / Q4_1 / Q8_0 had never been inlined (inlined: 1.03-1.04x on the
// default model's and its Q8_0 file's linears at 32 tokens, `kernel_ab.py`).
template <int64_t Q, int NT>
__attribute__((always_inline)) inline void accumulate_batch(const Block* blk, const BatchActs& acts,
                                                            const int32_t* starts, int64_t m0,
                                                            int64_t MC, int64_t kb, float* acc) {
  constexpr int G = kTokenGroup<Q>;
  BlockRegs<NT> r;
  for (int i = 0; i < NT; ++i) {
    for (int t = 0; t < 8; ++t) r.U[i][t] = _mm512_load_si512(blk[i].u[t]);
    r.s0[i] = _mm512_load_ps(blk[i].s0);
    r.o0[i] = _mm512_load_ps(blk[i].o0);
    r.s1[i] = _mm512_load_ps(blk[i].s1);
    if constexpr (kSplit<Q> && kIntOffset<Q> == 0) r.o1[i] = _mm512_load_ps(blk[i].o1);
  }
  const int64_t first = kb * acts.M + m0;  // (block, token) index of the first token
  const int8_t* x = acts.x.data() + first * 32;
  const ActMeta* meta = acts.meta.data() + first;
  const int32_t* start = starts ? starts + first * 2 : nullptr;
  int64_t m = 0;
  for (; m + G <= MC; m += G)
    accumulate_tokens<Q, NT, G>(r, x + 32 * m, meta + m, start ? start + 2 * m : nullptr,
                                acc + 32 * m);
  for (; m < MC; ++m)
    accumulate_tokens<Q, NT, 1>(r, x + 32 * m, meta + m, start ? start + 2 * m : nullptr,
                                acc + 32 * m);
}

#else
// The largest |value| of a codebook type's weights.
template <int64_t Q>
constexpr int codebook_max() {
  int m = 0;
  for (int8_t v : kCodebook<Q>.v) m = std::max(m, v < 0 ? -v : static_cast<int>(v));
  return m;
}
// Steps per run of a signed type: products of |w| and at most 127, two per maddubs, so
// kRun * max|w| < 128 (Q8_0 and IQ4: 1; IQ2_*, IQ3_XXS: 2; IQ1_S, IQ3_S: 8; IQ1_M: its parts' 4).
template <int64_t Q>
constexpr int signed_run() {
  if constexpr (!kCodebookType<Q>) {
    return 1;
  } else {
    int r = kSplit<Q> ? 4 : 8;  // a run never crosses a part
    while (r > 1 && r * codebook_max<Q>() >= 128) r /= 2;
    return r;
  }
}

// AVX2 has 16 vector registers, a quarter of a block's bytes per zmm-less tile: the block stays
// in L1 (Block) and each of its 16 weight vectors is loaded once per group of tokens and applied
// to all of them. `maddubs` products of pairs add up in int16 for kRun<Q> steps before one
// widening `madd`: exact while kRun * 2 * max(u) * 127 < 2^15 (4-bit weights: all 8 steps, 5-bit:
// 4, 6-bit: 2, 2- and 3-bit Q2_K / Q3_K: the 4 of each half; AVX2's signed Q8_0 and IQ4 widen
// every product, up to 2 * 128 * 127; the lattice types' smaller values run 2 or 8 steps).
template <int64_t Q>
constexpr int kRun = kSignedU<Q>                                        ? signed_run<Q>()
                     : Q == Q6_K                                        ? 2
                     : kSplit<Q> || Q == Q5_0 || Q == Q5_1 || Q == Q5_K ? 4
                                                                        : 8;

#ifdef TM_AVXVNNI
constexpr bool kVnni = true;
#else
constexpr bool kVnni = false;
#endif

// Tokens per pass over a block: as many as the registers hold (kRun < 8 keeps int32 sums beside
// the int16 runs, so fewer tokens; AVX-VNNI adds each step into its int32 sums: no runs).
template <int64_t Q>
constexpr int kTokenGroup = kVnni || kRun<Q> == 8 ? 4 : 2;

// Pins v to a register at this point of the program: the integer adds then stay in program
// order. Reassociated, the products would all be computed first and spilled (16 registers).
inline void pin(__m256i& v) { __asm__("" : "+x"(v)); }
// For floats: an opaque value, never reassociated with its neighbours under -ffast-math, so
// the streaming and batched paths round identically (batch-invariant rows).
inline void pin(F16& v) { __asm__("" : "+x"(v.a), "+x"(v.b)); }

// Token accumulators (16 floats each) in L1, 32 floats apart (the batched path), or in registers
// (the streaming path): acc[k] += v.
struct AccMem {
  float* p;
  void add(int k, F16 v) const {
    pin(v);  // never contracted into an FMA with the accumulator in one path only
    (F16::load(p + 32 * k) + v).store(p + 32 * k);
  }
};
struct AccRegs {
  F16* r;
  void add(int k, F16 v) const {
    pin(v);
    r[k] = r[k] + v;
    pin(r[k]);  // each sum as written: -ffast-math would add a split type's two parts first
  }
};

// The int32 sums of part `part` of a block for G tokens, per token and 8-row half, into sum:
// `maddubs` products of pairs in int16 runs of kRun<Q> steps, each widened by one `madd`.
template <int64_t Q, int G, typename WV>
__attribute__((always_inline)) inline void part_sums_maddubs(WV&& wv, const int8_t* x, int64_t xs,
                                                             int part, __m256i (&sum)[G][2]) {
  constexpr int TP = kSplit<Q> ? 4 : 8, R = kRun<Q>;
  static_assert(TP % R == 0, "a run never crosses a part");
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i run[G][2];
#pragma GCC unroll 8
  for (int j = 0; j < TP; ++j) {
    const int t = part * TP + j;
    __m256i w[2], wa[2];
    for (int h = 0; h < 2; ++h) {
      w[h] = wv(t, h);
      if constexpr (kSignedU<Q>) wa[h] = _mm256_sign_epi8(w[h], w[h]);
    }
#pragma GCC unroll 4
    for (int k = 0; k < G; ++k) {
      const __m256i xb = _mm256_set1_epi32(group4(x + k * xs + 4 * t));
      for (int h = 0; h < 2; ++h) {
        const __m256i p = kSignedU<Q> ? _mm256_maddubs_epi16(wa[h], _mm256_sign_epi8(xb, w[h]))
                                      : _mm256_maddubs_epi16(w[h], xb);
        __m256i r = j % R == 0 ? p : _mm256_add_epi16(run[k][h], p);
        pin(r);
        run[k][h] = r;
        if (j % R == R - 1) {
          const __m256i e = _mm256_madd_epi16(r, ones);
          sum[k][h] = j == R - 1 ? e : _mm256_add_epi32(sum[k][h], e);
        }
      }
    }
  }
}

#ifdef TM_AVXVNNI
// The same sums with `vpdpbusd` (AVX-VNNI): each step adds its 4-byte products straight into an
// int32 sum, exactly what the int16 runs add up to (no run ever saturates), so the types whose
// weights are unsigned on both levels give the avx2 level's bits; Q8_0 and the codebook types
// are unsigned here (U + 128, an offset of 128 in the float tail, as for Q4_0's 8) where AVX2
// keeps them signed. A step waits on the previous one in its chain (5 cycles), so with fewer than
// 4 tokens each token's half splits into 4 / G chains (8 or more in flight), added at the end.
template <int64_t Q, int G, typename WV>
__attribute__((always_inline)) inline void part_sums_vnni(WV&& wv, const int8_t* x, int64_t xs,
                                                          int part, __m256i (&sum)[G][2]) {
  static_assert(!kSignedU<Q>, "vpdpbusd multiplies unsigned weights");
  constexpr int TP = kSplit<Q> ? 4 : 8, C = G >= 4 ? 1 : 4 / G;
  __m256i chain[G][2][C];
#pragma GCC unroll 8
  for (int j = 0; j < TP; ++j) {
    const int t = part * TP + j;
    const __m256i w[2] = {wv(t, 0), wv(t, 1)};
#pragma GCC unroll 4
    for (int k = 0; k < G; ++k) {
      const __m256i xb = _mm256_set1_epi32(group4(x + k * xs + 4 * t));
      for (int h = 0; h < 2; ++h) {
        __m256i& c = chain[k][h][j % C];
        c = _mm256_dpbusd_avx_epi32(j < C ? _mm256_setzero_si256() : c, w[h], xb);
      }
    }
  }
  for (int k = 0; k < G; ++k)
    for (int h = 0; h < 2; ++h) {
      __m256i e = chain[k][h][0];
      for (int c = 1; c < C; ++c) e = _mm256_add_epi32(e, chain[k][h][c]);
      sum[k][h] = e;
    }
}
#endif

// A block applied to G tokens: acc[k] += its contribution to token k, whose 32 quantized inputs
// are at x + k * xs and metadata at meta[k * ms]. wv(t, h) gives rows 8h..8h+7 of U[t] (from an
// unpacked Block, or computed from the packed bytes). Split types (Q2_K, Q3_K, Q6_K) sum and scale
// inputs 0..15 and 16..31 as two parts. Every path (streaming or batched) does the same float
// operations in the same order, so a row's output does not depend on its batch.
template <int64_t Q, int G, typename WV, typename Sc, typename Acc>
__attribute__((always_inline)) inline void accumulate_tokens(WV&& wv, const Sc& sc, const int8_t* x,
                                                             int64_t xs, const ActMeta* meta,
                                                             int64_t ms, Acc acc) {
  constexpr int P = kSplit<Q> ? 2 : 1;
#pragma GCC unroll 2
  for (int part = 0; part < P; ++part) {
    __m256i sum[G][2];  // per token and 8-row half
#ifdef TM_AVXVNNI
    part_sums_vnni<Q, G>(wv, x, xs, part, sum);
#else
    part_sums_maddubs<Q, G>(wv, x, xs, part, sum);
#endif
    F16 s = sc.s(part), o = sc.o(part);
    pin(s);
    pin(o);
    for (int k = 0; k < G; ++k) {
      const ActMeta& a = meta[k * ms];
      const F16 dot = to_float({sum[k][0], sum[k][1]});
      const float ad = kSplit<Q> ? (part ? a.dhi : a.dlo) : a.dsum;  // dx * sum(q)
      F16 sd = s * F16::set1(a.d);
      pin(sd);
      if constexpr (kSignedU<Q>)
        acc.add(k, dot * sd);
      else if constexpr (kIntOffset<Q> != 0)
        // a symmetric type's offset (o = -c * s) as a term of the activations,
        // s * (dot * dx - c * dx * sum(q)): half the multiplies (Q6_K at batch 1: 1.12x)
        acc.add(k, s * F16::fma(dot, F16::set1(a.d),
                                F16::set1(-static_cast<float>(kIntOffset<Q>) * ad)));
      else
        acc.add(k, F16::fma(dot, sd, o * F16::set1(ad)));
    }
  }
}

// An unpacked block's scales and offsets, read where they are used (registers are scarce).
struct BlockScales {
  const Block& b;
  F16 s(int part) const { return F16::load(part ? b.s1 : b.s0); }
  F16 o(int part) const { return F16::load(part ? b.o1 : b.o0); }
};

// Rows 8h..8h+7 of U[t] of an unpacked block.
struct BlockVectors {
  const Block& b;
  __m256i operator()(int t, int h) const {
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(b.u[t] + 32 * h));
  }
};

// G tokens of a batch through an unpacked block, accumulators in L1 (see accumulate_tokens).
// Not inlined: inlined into the token loop, the compiler hoists the 16 weight loads out of it,
// and they do not fit the registers (copied to the stack instead, 0.8-0.9x on Q4_1 / Q5_0 at 32
// tokens).
template <int64_t Q, int G>
__attribute__((noinline)) void accumulate_group(const Block& b, const int8_t* x,
                                                const ActMeta* meta, float* acc) {
  accumulate_tokens<Q, G>(BlockVectors{b}, BlockScales{b}, x, 32, meta, 1, AccMem{acc});
}

// Block kb of NT (1 or 2) tiles applied to tokens m0 .. m0 + MC:
// acc[(m - m0) * 32 + 16 * i ...] += tile i's contribution (16 floats per tile and token).
template <int64_t Q, int NT>
inline void accumulate_batch(const Block* blk, const BatchActs& acts, const int32_t* /*starts*/,
                             int64_t m0, int64_t MC, int64_t kb, float* acc) {
  constexpr int G = kTokenGroup<Q>;
  const int64_t first = kb * acts.M + m0;  // (block, token) index of the first token
  const int8_t* x = acts.x.data() + first * 32;
  const ActMeta* meta = acts.meta.data() + first;
  for (int i = 0; i < NT; ++i) {
    int64_t m = 0;
    for (; m + G <= MC; m += G)
      accumulate_group<Q, G>(blk[i], x + 32 * m, meta + m, acc + 32 * m + 16 * i);
    for (; m < MC; ++m) accumulate_group<Q, 1>(blk[i], x + 32 * m, meta + m, acc + 32 * m + 16 * i);
  }
}

// A packed block's scales and offsets, computed where they are used (passed as a struct of
// vectors, they would travel through the stack).
template <int64_t Q>
struct PackedScales {
  const uint8_t* src;
  int b;
  F16 s(int part) const { return block_scales<Q>(src, b).s(part); }
  F16 o(int part) const { return block_scales<Q>(src, b).o(part); }
};

// One 16-row tile for tokens [0, MT) (batches of 1-4): each block's weight vectors are computed
// in registers from the packed bytes as they stream and applied to every token. (Unpacking to
// memory first costs 16 stores per block, one per cycle: more than the block's arithmetic at
// batch 1.)
template <int64_t Q, int MT, typename TY>
void tile_streaming(const uint8_t* w, const int8_t* xq, const ActMeta* meta,
                    const int32_t* /*start*/, int64_t K, const Epilogue& ep, TY* y, int64_t ldy,
                    int rows) {
  F16 acc[MT];
  epilogue_start<MT>(ep, acc);
  for_each_block<Q>(w, K, [&](const uint8_t* src, int b, int64_t kb) {
    accumulate_tokens<Q, MT>([&](int t, int h) { return u_half<Q>(src, b, t, h); },
                             PackedScales<Q>{src, b}, xq + kb * 32, K, meta + kb, K / 32,
                             AccRegs{acc});
  });
  for (int m = 0; m < MT; ++m) store_row(acc[m], y + m * ldy, rows);
}
#endif  // TM_AVX512

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

#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
#define TM_AMX 1
using amx::TileConfig;
inline bool amx_permitted() { return amx::permitted(); }

// Tiles: 0, 3, 4, 5 = C (16 tokens x 16 rows, int32; one per group of 16 tokens, so the groups'
// products overlap), 1 = A (16 tokens x 32 inputs, int8), 2 = B (one block: U[0..7], 8 x 64
// bytes).
void configure_amx() {
  TileConfig cfg;
  for (int c : {0, 3, 4, 5}) {
    cfg.rows[c] = 16;
    cfg.colsb[c] = 64;
  }
  cfg.rows[1] = 16;
  cfg.colsb[1] = 32;
  cfg.rows[2] = 8;
  cfg.colsb[2] = 64;
  // The intrinsic tells the compiler it reads one byte: without this, the stores above are
  // dead and the tiles end up unconfigured.
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// Group g's block sums: C tile 0, 3, 4 or 5 (tile numbers are immediates).
inline void amx_group(int g, const int8_t* x, int64_t stride, int32_t* out) {
  _tile_loadd(1, x, stride);
  switch (g) {
    case 0:
      _tile_zero(0);
      _tile_dpbsud(0, 1, 2);
      _tile_stored(0, out, 64);
      break;
    case 1:
      _tile_zero(3);
      _tile_dpbsud(3, 1, 2);
      _tile_stored(3, out, 64);
      break;
    case 2:
      _tile_zero(4);
      _tile_dpbsud(4, 1, 2);
      _tile_stored(4, out, 64);
      break;
    default:
      _tile_zero(5);
      _tile_dpbsud(5, 1, 2);
      _tile_stored(5, out, 64);
      break;
  }
}

// Block kb's contribution for tokens [m_begin, M) into their L1 accumulators (16 floats each).
template <int64_t Q>
inline void accumulate_rows(const Block& blk, const Acts& acts, int64_t m_begin, int64_t M,
                            int64_t kb, float* accbuf) {
  int64_t m0 = m_begin;
  for (; m0 + 4 <= M; m0 += 4) {
    F16 acc[4];
    for (int m = 0; m < 4; ++m) acc[m] = F16::load(accbuf + (m0 + m) * 16);
    accumulate<Q, 4>(blk, acts.from(m0), kb, acc);
    for (int m = 0; m < 4; ++m) acc[m].store(accbuf + (m0 + m) * 16);
  }
  for (; m0 < M; ++m0) {
    F16 acc[1] = {F16::load(accbuf + m0 * 16)};
    accumulate<Q, 1>(blk, acts.from(m0), kb, acc);
    acc[0].store(accbuf + m0 * 16);
  }
}

// A 16-row tile for a batch of 16 to 64 tokens on the tile unit: per block, 16 tokens at a
// time, one `tdpbsud` (int8 activations x the unpacked unsigned weights, exactly the U layout)
// gives the int32 block sums, which are then scaled into float accumulators in L1 like the VNNI
// path. The scaling runs one block behind the tile products, so it reads sums whose stores
// have long completed instead of waiting on them. Tokens past the last multiple of 16 take the
// VNNI path on the same unpacked block.
template <int64_t Q, typename TY>
void tile_amx(const uint8_t* w, const Acts& acts, int64_t M, int64_t K, const Epilogue& ep, TY* y,
              int64_t ldy, int rows, float* accbuf) {
  static_assert(!kSplit<Q>, "blocks with two scales take the VNNI path");
  epilogue_fill(ep, M, accbuf, 16);
  alignas(64) int32_t sums[2][4][16 * 16];  // [block parity][token group]
  const int64_t groups = M / 16;
  F16 s_prev = F16::zero(), o_prev = F16::zero();
  int64_t kb_prev = -1;
  auto rescale = [&](int64_t kb, F16 s0, F16 o0) {
    for (int64_t g = 0; g < groups; ++g)
      for (int i = 0; i < 16; ++i) {
        const int64_t m = g * 16 + i;
        const ActMeta& a = acts.meta_at(m, kb);
        float* acc_p = accbuf + m * 16;
        F16 acc = F16::load(acc_p);
        const F16 v = {_mm512_cvtepi32_ps(_mm512_load_si512(sums[kb & 1][g] + i * 16))};
        acc = F16::fma(v, s0 * F16::set1(a.d), acc);
        acc = F16::fma(o0, F16::set1(a.dsum), acc);
        acc.store(acc_p);
      }
  };
  Block blk;
  for_each_block<Q>(w, K, [&](const uint8_t* src, int b, int64_t kb) {
    unpack_block<Q>(src, b, blk);
    _tile_loadd(2, blk.u[0], 64);
    for (int64_t g = 0; g < groups; ++g)
      amx_group(static_cast<int>(g), acts.at(g * 16, kb), acts.xs, sums[kb & 1][g]);
    if (kb_prev >= 0) rescale(kb_prev, s_prev, o_prev);
    s_prev = F16::load(blk.s0);
    o_prev = F16::load(blk.o0);
    kb_prev = kb;
    accumulate_rows<Q>(blk, acts, groups * 16, M, kb, accbuf);
  });
  rescale(kb_prev, s_prev, o_prev);
  for (int64_t m = 0; m < M; ++m) store_row(F16::load(accbuf + m * 16), y + m * ldy, rows);
}
#endif  // AMX

#ifdef TM_AMX
// From this many tokens on (prefill chunks, decode batches of 64+), a QuantLinear on the AMX
// level runs bfloat16 tiles (gemm_amx_bf16) instead of the 8-bit activation path.
constexpr int64_t kAmxBf16MinM = 64;

// Tiles of the bfloat16 path: 0..3 = C (token group g, weight tile n at g * 2 + n: 16 tokens x
// 16 rows, float32), 4, 5 = A (token group 0 / 1: 16 tokens x 32 inputs, bfloat16), 6, 7 = B
// (weight tile 0 / 1: 16 input pairs x 16 rows, bfloat16 pairs).
void configure_amx_bf16() {
  TileConfig cfg;
  for (int c = 0; c < 8; ++c) {
    cfg.rows[c] = 16;
    cfg.colsb[c] = 64;
  }
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// Shuffles of block_to_bf16: pick[h][j] moves byte 2h + j of every 32-bit lane to its low byte
// (the rest zero); perm takes words 0..15 (one input of each row) and 16..31 (the next input)
// to (word r, word 16 + r) in lane r.
struct Bf16Masks {
  alignas(64) uint8_t pick[2][2][64];
  alignas(64) uint16_t perm[32];
  constexpr Bf16Masks() : pick(), perm() {
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 2; ++j)
        for (int i = 0; i < 64; ++i)
          pick[h][j][i] = i % 4 == 0 ? static_cast<uint8_t>(i % 16 + 2 * h + j) : 0x80;
    for (int r = 0; r < 16; ++r) {
      perm[2 * r] = static_cast<uint16_t>(r);
      perm[2 * r + 1] = static_cast<uint16_t>(16 + r);
    }
  }
};
alignas(64) constexpr Bf16Masks kBf16Masks;

// An unpacked block as a B tile of bfloat16 weights: out[kp * 32 + 2 r + j] = bf16(s * u + o)
// of input 2 kp + j of row r (s, o: the scale and offset of the input's half for split types).
template <int64_t Q>
inline void block_to_bf16(const Block& blk, uint16_t* out) {
  __m512i pick[2][2];
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 2; ++j) pick[h][j] = _mm512_load_si512(kBf16Masks.pick[h][j]);
  const __m512i perm = _mm512_load_si512(kBf16Masks.perm);
  for (int kp = 0; kp < 16; ++kp) {
    const int t = kp / 2, h = kp % 2;
    const bool second = kSplit<Q> && kp >= 8;
    const __m512 sc = _mm512_load_ps(second ? blk.s1 : blk.s0);
    const __m512 of = _mm512_load_ps(second ? blk.o1 : blk.o0);
    const __m512i x = _mm512_load_si512(blk.u[t]);
    const __m512 wa =
        _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_shuffle_epi8(x, pick[h][0])), sc, of);
    const __m512 wb =
        _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_shuffle_epi8(x, pick[h][1])), sc, of);
    const __m512i pk = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(wb, wa));
    _mm512_storeu_si512(out + kp * 32, _mm512_permutexvar_epi16(perm, pk));
  }
}

// Blocks per chunk of gemm_amx_bf16: a pair of tiles' chunk of bfloat16 weights is 16 KiB, and
// stays in L1 while every token group multiplies it.
constexpr int64_t kBf16ChunkBlocks = 8;

// y = x W^T (+ bias) with bfloat16 weights and activations on the tile unit, for x block-major
// ([K / 32][Mp][32] bfloat16, Mp = M rounded up to 16, padding rows zero: block_major_bf16).
// Pairs of weight tiles are split over the threads. Each pair's row is taken in chunks of
// kBf16ChunkBlocks blocks: the chunk is dequantized (1 KiB per block and tile) and every 32
// tokens add its products to four C tiles (2 token groups x 2 weight tiles), kept in the tiles
// from chunk to chunk when one pass of 32 covers the batch, else saved to float32 sums in
// between (the weights in L1, the activations read from L2 once per chunk).
template <int64_t Q, typename TY>
void gemm_amx_bf16(const uint8_t* w, const uint16_t* xb, int64_t M, int64_t Mp, int64_t N,
                   int64_t K, const float* bias, TY* y, int64_t ldy) {
  const int64_t n_tiles = (N + 15) / 16, tile_bytes = K / unit_k(Q) * unit_bytes(Q), KB = K / 32;
  const int64_t uk = unit_k(Q), ub = unit_bytes(Q), bpu = uk / 32;
  const int64_t passes = (Mp + 31) / 32;
  at::parallel_for(0, (n_tiles + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    configure_amx_bf16();
    alignas(64) uint16_t wb[2][kBf16ChunkBlocks][512] = {};  // a lone last tile: zeros beside it
    std::vector<float> sums(passes * 4 * 256);               // per pass: C tiles 0..3
    for (int64_t p = begin; p < end; ++p) {
      const int nt = static_cast<int>(std::min<int64_t>(2, n_tiles - 2 * p));
      for (int64_t k0 = 0; k0 < KB; k0 += kBf16ChunkBlocks) {
        const int64_t k1 = std::min(KB, k0 + kBf16ChunkBlocks);
        for (int i = 0; i < nt; ++i) {
          const uint8_t* wt = w + (2 * p + i) * tile_bytes;
          Block blk;
          for (int64_t kb = k0; kb < k1; ++kb) {
            const uint8_t* src = wt + kb / bpu * ub;
            if (kb % bpu == 0)
              for (int64_t line = 0; line < ub; line += 64)
                _mm_prefetch(reinterpret_cast<const char*>(src + ub + line), _MM_HINT_T0);
            unpack_block<Q>(src, static_cast<int>(kb % bpu), blk);
            block_to_bf16<Q>(blk, wb[i][kb - k0]);
          }
        }
        for (int64_t pass = 0; pass < passes; ++pass) {
          const int64_t m0 = pass * 32;
          const bool two = m0 + 16 < Mp;
          float* sp = sums.data() + pass * 4 * 256;
          if (k0 == 0) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
          } else if (passes > 1) {
            _tile_loadd(0, sp, 64);
            _tile_loadd(1, sp + 256, 64);
            _tile_loadd(2, sp + 512, 64);
            _tile_loadd(3, sp + 768, 64);
          }
          for (int64_t kb = k0; kb < k1; ++kb) {
            const uint16_t* xk = xb + (kb * Mp + m0) * 32;
            _tile_loadd(6, wb[0][kb - k0], 64);
            _tile_loadd(7, wb[1][kb - k0], 64);
            _tile_loadd(4, xk, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            if (two) {
              _tile_loadd(5, xk + 16 * 32, 64);
              _tile_dpbf16ps(2, 5, 6);
              _tile_dpbf16ps(3, 5, 7);
            }
          }
          if (passes > 1 || k1 == KB) {
            _tile_stored(0, sp, 64);
            _tile_stored(1, sp + 256, 64);
            _tile_stored(2, sp + 512, 64);
            _tile_stored(3, sp + 768, 64);
          }
        }
      }
      for (int64_t pass = 0; pass < passes; ++pass) {
        const int64_t m0 = pass * 32;
        const float* sp = sums.data() + pass * 4 * 256;
        for (int g = 0; g < 2 && m0 + g * 16 < M; ++g)
          for (int n = 0; n < nt; ++n) {
            const int64_t col = (2 * p + n) * 16;
            const int rows = static_cast<int>(std::min<int64_t>(16, N - col));
            const F16 bv = bias ? F16::load(bias + col) : F16::zero();
            for (int i = 0; i < 16 && m0 + g * 16 + i < M; ++i)
              store_row(F16::load(sp + (g * 2 + n) * 256 + i * 16) + bv,
                        y + (m0 + g * 16 + i) * ldy + col, rows);
          }
      }
    }
    _tile_release();
  });
}

// x [M, K] (float32 / bfloat16) as bfloat16, block-major with zero padding rows (gemm_amx_bf16).
template <typename T>
std::vector<uint16_t> block_major_bf16(const T* x, int64_t M, int64_t Mp, int64_t K) {
  const int64_t KB = K / 32;
  std::vector<uint16_t> xb(KB * Mp * 32, 0);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t kb = 0; kb < KB; ++kb) {
        uint16_t* dst = xb.data() + (kb * Mp + m) * 32;
        if constexpr (std::is_same_v<T, float>) {
          const __m512i pk = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(
              _mm512_loadu_ps(x + m * K + kb * 32 + 16), _mm512_loadu_ps(x + m * K + kb * 32)));
          _mm512_storeu_si512(dst, pk);
        } else {
          std::memcpy(dst, x + m * K + kb * 32, 64);
        }
      }
  });
  return xb;
}
#endif

#ifdef TM_AMX
// Decode batches of this many tokens up to kAmxMaxM take the AMX tiles (see gemm_typed).
constexpr int64_t kAmxMinM = 48, kAmxMaxM = kAmxBf16MinM - 1;

// y = the quantized GEMM on the tile unit, one 16-row tile at a time (tile_amx).
template <int64_t Q, typename TY>
void gemm_amx(const uint8_t* w, const BatchActs& batch, int64_t N, int64_t K, const Epilogue& ep,
              TY* y, int64_t ldy) {
  const int64_t M = batch.M, n_tiles = (N + 15) / 16, tile_bytes = K / unit_k(Q) * unit_bytes(Q);
  // every weight tile reads the activations block by block: block-major
  const Acts acts = {batch.x.data(), batch.meta.data(), 32, M * 32, 1, M, batch.starts<Q>()};
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    configure_amx();
    std::vector<float> accbuf(M * 16);
    for (int64_t nt = begin; nt < end; ++nt)
      tile_amx<Q>(w + nt * tile_bytes, acts, M, K, ep.at(nt * 16, 0), y + nt * 16, ldy,
                  static_cast<int>(std::min<int64_t>(16, N - nt * 16)), accbuf.data());
    _tile_release();
  });
}
#endif

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

#include "quant_gemm.h"

// The integer-dot ISA this build was compiled for: "amx" (int8 tiles for batches of 48-63,
// bfloat16 tiles from 64 on, VNNI below), "avx512" (VNNI), "avxvnni" (256-bit VNNI), "avx2" or
// "" (none).
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
