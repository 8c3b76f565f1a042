// Peak integer multiply-add rate of the instruction each tokenmill kernel level is built on, for
// the compute roofline of benchmarks/bench_llamacpp.py: independent chains of `vpdpbusd` on zmm
// (avx512: 64 MACs each) and on ymm (avxvnni: 32), `vpmaddubsw` on ymm (avx2: 32 MACs each,
// before the widening adds the kernels also pay) and `tdpbusd` (amx: a 16 x 64 by 64 x 16 tile
// product, 16,384 MACs), one thread per core, and AMX's bfloat16 tile product (amx_bf16:
// `tdpbf16ps`, 8,192 MACs), which the amx level multiplies with from 64 tokens on. Prints
// "level GMAC/s" lines for the levels this CPU has.
//   cc -O3 -march=native -fopenmp int8_peak.c -o int8_peak && ./int8_peak THREADS
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

static double now(void) { return omp_get_wtime(); }

#define ITERS 20000000L

#if defined(__AVX512VNNI__)
static double avx512(void) {  // MACs per second on this thread
  __m512i a[12];
  for (int i = 0; i < 12; i++) a[i] = _mm512_set1_epi32(i);
  __m512i w = _mm512_set1_epi8(3), x = _mm512_set1_epi8(1);
  double t = now();
  for (long n = 0; n < ITERS; n++) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++) a[i] = _mm512_dpbusd_epi32(a[i], w, x);
    __asm__ volatile("" : "+v"(w));
  }
  t = now() - t;
  int s = 0;
  for (int i = 0; i < 12; i++) s += _mm512_reduce_add_epi32(a[i]);
  if (s == 42) puts("");
  return ITERS * 12.0 * 64 / t;
}
#endif

#if defined(__AVXVNNI__)
static double avxvnni(void) {  // the VEX-encoded vpdpbusd on ymm: 32 MACs each
  __m256i a[12];
  for (int i = 0; i < 12; i++) a[i] = _mm256_set1_epi32(i);
  __m256i w = _mm256_set1_epi8(3), x = _mm256_set1_epi8(1);
  double t = now();
  for (long n = 0; n < ITERS; n++) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++) a[i] = _mm256_dpbusd_avx_epi32(a[i], w, x);
    __asm__ volatile("" : "+v"(w));
  }
  t = now() - t;
  int s = 0;
  for (int i = 0; i < 12; i++) s += _mm256_extract_epi32(a[i], 0);
  if (s == 42) puts("");
  return ITERS * 12.0 * 32 / t;
}
#endif

#if defined(__AVX2__)
static double avx2(void) {
  __m256i a[12];
  for (int i = 0; i < 12; i++) a[i] = _mm256_set1_epi16(i);
  __m256i w = _mm256_set1_epi8(3), x = _mm256_set1_epi8(1);
  double t = now();
  for (long n = 0; n < ITERS; n++) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++) a[i] = _mm256_maddubs_epi16(w, _mm256_xor_si256(x, a[i]));
    __asm__ volatile("" : "+v"(w));
  }
  t = now() - t;
  int s = 0;
  for (int i = 0; i < 12; i++) s += _mm256_extract_epi32(a[i], 0);
  if (s == 42) puts("");
  return ITERS * 12.0 * 32 / t;
}
#endif

#if defined(__AMX_INT8__) && defined(__AMX_BF16__) && defined(__AMX_TILE__)
struct cfg {
  uint8_t palette, start;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} __attribute__((aligned(64)));
static int8_t A[16 * 64] __attribute__((aligned(64))), B[16 * 64] __attribute__((aligned(64)));
// Four independent C tiles, products of zero tiles: `tdpbf16ps` (bf16 != 0) or `tdpbusd`.
static double tile_rate(int bf16) {
  struct cfg c = {1, 0, {0}, {0}, {0}};
  for (int i = 0; i < 8; i++) c.colsb[i] = 64, c.rows[i] = 16;
  _tile_loadconfig(&c);
  _tile_loadd(4, A, 64);
  _tile_loadd(5, B, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const long n_iter = ITERS / 8;
  double t = now();
  for (long n = 0; n < n_iter; n++) {
    if (bf16) {
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 5);
      _tile_dpbf16ps(2, 4, 5);
      _tile_dpbf16ps(3, 4, 5);
    } else {
      _tile_dpbusd(0, 4, 5);
      _tile_dpbusd(1, 4, 5);
      _tile_dpbusd(2, 4, 5);
      _tile_dpbusd(3, 4, 5);
    }
  }
  t = now() - t;
  _tile_release();
  return n_iter * 4.0 * (bf16 ? 8192 : 16384) / t;
}
static double amx(void) { return tile_rate(0); }
static double amx_bf16(void) { return tile_rate(1); }
#endif
#if defined(__AMX_INT8__) && defined(__AMX_BF16__) && defined(__AMX_TILE__)
static int amx_ok(void) { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }
#endif

static void report(const char* level, double (*fn)(void), int threads) {
  double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  total += fn();
  printf("%s %.1f\n", level, total / 1e9);
}

int main(int argc, char** argv) {
  const int threads = argc > 1 ? atoi(argv[1]) : 1;
#if defined(__AMX_INT8__) && defined(__AMX_BF16__) && defined(__AMX_TILE__)
  if (amx_ok()) {
    report("amx", amx, threads);
    report("amx_bf16", amx_bf16, threads);
  }
#endif
#if defined(__AVX512VNNI__)
  report("avx512", avx512, threads);
#endif
#if defined(__AVXVNNI__)
  report("avxvnni", avxvnni, threads);
#endif
#if defined(__AVX2__)
  report("avx2", avx2, threads);
#endif
  return 0;
}
