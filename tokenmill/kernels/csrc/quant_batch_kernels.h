// The batched micro-kernels: one block of one or two tiles applied to a group of tokens, per
// level (AVX-512 VNNI; AVX2 `maddubs` and AVX-VNNI).
// Part of quant_gemm.cpp's translation unit: included there only, in order.
#pragma once

#include "quant_batch_acts.h"

namespace {

#if defined(TM_AVX512) || defined(TM_AVX2)

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

#endif  // TM_AVX512 || TM_AVX2

}  // namespace
