// Register blocks of the paged prefill attention (prefill_attention.cpp): the 8 x 8 transpose of
// keys, the score and P V products of a group of rows (8-float vectors, and 16-float ones on
// AVX-512 builds), and the loop over row groups.
// Part of prefill_attention.cpp's translation unit: included there only.
#pragma once

#include <cstdint>

#include "vec_math.h"

#if defined(__AVX2__) && defined(__FMA__)
namespace {

using vec_math::exp256;
using vec_math::hmax8;
using vec_math::hsum8;
using vec_math::load8;
using vec_math::store8;

constexpr int kRowTile = 48;   // query rows per task (token x query head of one KV head)
constexpr int kKeyBlock = 64;  // keys per softmax step
constexpr int kRowGroup = 6;   // rows per register block (6 x 2 accumulators)
// Stands for -infinity (-ffast-math assumes finite values): the running max before any key,
// and the score of a masked key, whose probability is then cleared.
constexpr float kNoScore = -1e30f;

// 8 x 8 transpose in place: r[i] holds row i on entry, column i on return.
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// S[r][c0 .. c0 + 16) = Q[r] . Kt[:, c0 .. c0 + 16) for RG rows (Q rows D floats apart, S rows
// kKeyBlock apart, Kt rows kKeyBlock apart).
template <int RG>
inline void scores_block(const float* q, int64_t D, const float* kt, int c0, float* s) {
  __m256 acc[RG][2];
#pragma GCC unroll 8
  for (int r = 0; r < RG; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 k0 = _mm256_load_ps(kt + d * kKeyBlock + c0);
    const __m256 k1 = _mm256_load_ps(kt + d * kKeyBlock + c0 + 8);
#pragma GCC unroll 8
    for (int r = 0; r < RG; ++r) {
      const __m256 b = _mm256_broadcast_ss(q + r * D + d);
      acc[r][0] = _mm256_fmadd_ps(b, k0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(b, k1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RG; ++r) {
    _mm256_store_ps(s + r * kKeyBlock + c0, acc[r][0]);
    _mm256_store_ps(s + r * kKeyBlock + c0 + 8, acc[r][1]);
  }
}

// O[r][d0 .. d0 + 16) += sum over keys t < n of P[r][t] V[t][d0 .. d0 + 16) for RG rows.
template <int RG, typename T>
inline void pv_block(const float* p, T* const* vrows, int n, int64_t d0, float* o, int64_t D) {
  __m256 acc[RG][2];
#pragma GCC unroll 8
  for (int r = 0; r < RG; ++r) {
    acc[r][0] = _mm256_load_ps(o + r * D + d0);
    acc[r][1] = _mm256_load_ps(o + r * D + d0 + 8);
  }
  for (int t = 0; t < n; ++t) {
    const __m256 v0 = load8(vrows[t] + d0), v1 = load8(vrows[t] + d0 + 8);
#pragma GCC unroll 8
    for (int r = 0; r < RG; ++r) {
      const __m256 b = _mm256_broadcast_ss(p + r * kKeyBlock + t);
      acc[r][0] = _mm256_fmadd_ps(b, v0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(b, v1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RG; ++r) {
    _mm256_store_ps(o + r * D + d0, acc[r][0]);
    _mm256_store_ps(o + r * D + d0 + 8, acc[r][1]);
  }
}

#if defined(__AVX512F__)
// AVX-512 builds: the same two products with NV 16-float vectors per row (32 or 16 columns per
// call), each lane's sum the same FMAs in the same order as the 8-float versions above. Half the
// instructions, and with 32 columns 8 loads per 12 FMAs: the FMAs, not the loads, bound it
// (1B-shape heads, 32 / 8 x 64, 512-token prompt, 2 threads: 2.2-2.3x the 8-float kernel, 6.4-6.9
// against 14.5-15.6 ms per layer).
template <int RG, int NV>
inline void scores_block16(const float* q, int64_t D, const float* kt, int c0, float* s) {
  __m512 acc[RG][NV];
#pragma GCC unroll 8
  for (int r = 0; r < RG; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 k[NV];
    for (int v = 0; v < NV; ++v) k[v] = _mm512_load_ps(kt + d * kKeyBlock + c0 + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < RG; ++r) {
      const __m512 b = _mm512_set1_ps(q[r * D + d]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(b, k[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RG; ++r)
    for (int v = 0; v < NV; ++v) _mm512_store_ps(s + r * kKeyBlock + c0 + 16 * v, acc[r][v]);
}

template <int RG, int NV, typename T>
inline void pv_block16(const float* p, T* const* vrows, int n, int64_t d0, float* o, int64_t D) {
  __m512 acc[RG][NV];
#pragma GCC unroll 8
  for (int r = 0; r < RG; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_load_ps(o + r * D + d0 + 16 * v);
  for (int t = 0; t < n; ++t) {
    __m512 x[NV];
    for (int v = 0; v < NV; ++v) x[v] = vec_math::load16(vrows[t] + d0 + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < RG; ++r) {
      const __m512 b = _mm512_set1_ps(p[r * kKeyBlock + t]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(b, x[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RG; ++r)
    for (int v = 0; v < NV; ++v) _mm512_store_ps(o + r * D + d0 + 16 * v, acc[r][v]);
}
#endif

// Runs fn.template run<RG>(r0) over rows [0, R) in groups of kRowGroup and one smaller group.
template <typename Fn>
inline void for_row_groups(int R, const Fn& fn) {
  int r = 0;
  for (; r + kRowGroup <= R; r += kRowGroup) fn.template run<kRowGroup>(r);
  switch (R - r) {
    case 5:
      fn.template run<5>(r);
      break;
    case 4:
      fn.template run<4>(r);
      break;
    case 3:
      fn.template run<3>(r);
      break;
    case 2:
      fn.template run<2>(r);
      break;
    case 1:
      fn.template run<1>(r);
      break;
    default:
      break;
  }
}

struct ScoreRows {  // S = Q Kt for nc keys
  const float* q;
  int64_t D;
  const float* kt;
  int nc;
  float* s;
  template <int RG>
  void run(int r0) const {
#if defined(__AVX512F__)
    int c0 = 0;
    for (; c0 + 32 <= nc; c0 += 32)
      scores_block16<RG, 2>(q + r0 * D, D, kt, c0, s + r0 * kKeyBlock);
    if (c0 < nc) scores_block16<RG, 1>(q + r0 * D, D, kt, c0, s + r0 * kKeyBlock);
#else
    for (int c0 = 0; c0 < nc; c0 += 16) scores_block<RG>(q + r0 * D, D, kt, c0, s + r0 * kKeyBlock);
#endif
  }
};

template <typename T>
struct AddPV {  // O += P V over the first n keys
  const float* p;
  T* const* vrows;
  int n;
  float* o;
  int64_t D;
  template <int RG>
  void run(int r0) const {
#if defined(__AVX512F__)
    int64_t d0 = 0;
    for (; d0 + 32 <= D; d0 += 32)
      pv_block16<RG, 2>(p + r0 * kKeyBlock, vrows, n, d0, o + r0 * D, D);
    if (d0 < D) pv_block16<RG, 1>(p + r0 * kKeyBlock, vrows, n, d0, o + r0 * D, D);
#else
    for (int64_t d0 = 0; d0 < D; d0 += 16)
      pv_block<RG>(p + r0 * kKeyBlock, vrows, n, d0, o + r0 * D, D);
#endif
  }
};

}  // namespace
#endif
