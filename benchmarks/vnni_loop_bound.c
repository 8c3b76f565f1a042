// The ceiling of the batched AVX-512 VNNI loop by its instruction mix, one thread: what a block
// of 32 inputs costs per token and 16-row tile in tokenmill/kernels/csrc/quant_gemm.cpp
// (accumulate_tokens, AVX-512): 8 `vpdpbusd` (4 tokens x 2 tiles = 8 dot chains, activations
// broadcast from memory, weights in registers), then a float tail that scales the int32 sums into
// the token's float32 accumulator in L1. Each variant below repeats that loop body with another
// tail (inline asm, so the mix is exactly the one named) and prints "name GMAC/s". The weights
// here stay in registers and nothing is unpacked: real kernels run below these ceilings.
//
//   chains           the dot chains alone, activations in registers (the vpdpbusd peak)
//   broadcasts       + the activation broadcasts from memory (load ports only)
//   tail_add         + 1 op per token and tile: the int32 sums added to the accumulator
//   tail_cvt_fma     + 2 ops: cvt, FMA by a per-row scale (what a per-256 activation scale
//                      leaves of the tail of a type without offsets)
//   tail_q4k         + 4 ops: cvt, scale x activation scale, FMA, offset FMA (Q4_K / Q4_1 today)
//   int_tail_q4k     the K-quant integer alternative (activations x + 128 against weights
//                    u - 8, whose 32-input sums fit int16): per block one `vpdpwssd` by the
//                    sub-block scale into an int32 accumulator; per 256 inputs the offsets (the
//                    centring's 8 * scale * sum(x) and the mins, 8 `vpdpwssd` of int16 pairs), 2
//                    cvt, a multiply and 2 FMAs
//
//   cc -O2 -mavx512f -mavx512bw -mavx512vnni vnni_loop_bound.c -o vnni_loop_bound
//   (benchmarks/vnni_loop_bound.py compiles, runs and tabulates it)
#include <stdint.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

// %0: activations (4 tokens x 32 bytes), per-token float scalars at +512, int16 pairs at +600,
// per-row scales at +768 and +832, weights at +1024 (16 x 64 bytes); %1: accumulators (8 x 16
// floats or int32, and a second set at +1024).
static union {
  int8_t b[4096];
  float f[1024];
  int16_t h[2048];
} X __attribute__((aligned(64)));
static float ACC[4096] __attribute__((aligned(64)));

#define Z(r) "vpxord %%zmm" #r ",%%zmm" #r ",%%zmm" #r "\n"
#define D(b, u, a) "vpdpbusd %%zmm" #b ",%%zmm" #u ",%%zmm" #a "\n"
#define BC(off, r) "vpbroadcastd " #off "(%0),%%zmm" #r "\n"
#define ZERO Z(0) Z(1) Z(2) Z(3) Z(4) Z(5) Z(6) Z(7)
// Step t of a block: 4 tokens x 2 tiles (weights U in zmm16..31, tokens' bytes in zmm8..15).
#define STEP_REG(u0, u1) \
  D(12, u0, 0)           \
  D(12, u1, 1) D(13, u0, 2) D(13, u1, 3) D(14, u0, 4) D(14, u1, 5) D(15, u0, 6) D(15, u1, 7)
#define STEP_MEM(t, u0, u1)                                                                   \
  BC(4 * t, 8)                                                                                \
  BC(32 + 4 * t, 9) BC(64 + 4 * t, 10) BC(96 + 4 * t, 11) D(8, u0, 0) D(8, u1, 1) D(9, u0, 2) \
      D(9, u1, 3) D(10, u0, 4) D(10, u1, 5) D(11, u0, 6) D(11, u1, 7)
#define BLOCK_REG                                                                           \
  ZERO STEP_REG(16, 17) STEP_REG(18, 19) STEP_REG(20, 21) STEP_REG(22, 23) STEP_REG(24, 25) \
      STEP_REG(26, 27) STEP_REG(28, 29) STEP_REG(30, 31)
#define BLOCK_MEM                                                                      \
  ZERO STEP_MEM(0, 16, 17) STEP_MEM(1, 18, 19) STEP_MEM(2, 20, 21) STEP_MEM(3, 22, 23) \
      STEP_MEM(4, 24, 25) STEP_MEM(5, 26, 27) STEP_MEM(6, 28, 29) STEP_MEM(7, 30, 31)
#define CV(r) "vcvtdq2ps %%zmm" #r ",%%zmm" #r "\n"
#define ST(r, off) "vmovaps %%zmm" #r "," #off "(%1)\n"
// the tails, per token and tile (accumulator r at byte offset off)
#define T1(r, off) "vpaddd " #off "(%1),%%zmm" #r ",%%zmm" #r "\n" ST(r, off)
#define T2(r, off) CV(r) "vfmadd213ps " #off "(%1),%%zmm13,%%zmm" #r "\n" ST(r, off)
#define T4(r, off)                                                  \
  CV(r)                                                             \
  "vbroadcastss 512(%0),%%zmm12\n vmulps %%zmm12,%%zmm13,%%zmm14\n" \
  "vfmadd213ps " #off "(%1),%%zmm14,%%zmm" #r                       \
  "\n"                                                              \
  "vfmadd231ps 516(%0)%{1to16%},%%zmm15,%%zmm" #r "\n" ST(r, off)
#define TI(r, off)                                     \
  "vmovdqa32 " #off "(%1),%%zmm14\n vpdpwssd %%zmm" #r \
  ",%%zmm13,%%zmm14\n"                                 \
  "vmovdqa32 %%zmm14," #off "(%1)\n"
#define EACH(T) T(0, 0) T(1, 64) T(2, 128) T(3, 192) T(4, 256) T(5, 320) T(6, 384) T(7, 448)
// per 256 inputs, per token and tile: the offsets of the integer variant and the float result
#define SB(r, off) \
  "vmovdqa32 " #off "(%1),%%zmm" #r "\n"                                                      \
  "vpdpwssd 600(%0)%{1to16%},%%zmm13,%%zmm" #r "\n vpdpwssd 604(%0)%{1to16%},%%zmm13,%%zmm" #r \
  "\n vpdpwssd 608(%0)%{1to16%},%%zmm13,%%zmm" #r                                              \
  "\n vpdpwssd 612(%0)%{1to16%},%%zmm13,%%zmm" #r                                              \
  "\n vpdpwssd 616(%0)%{1to16%},%%zmm15,%%zmm12\n vpdpwssd 620(%0)%{1to16%},%%zmm15,%%zmm12\n" \
  "vpdpwssd 624(%0)%{1to16%},%%zmm15,%%zmm12\n vpdpwssd 628(%0)%{1to16%},%%zmm15,%%zmm12\n" CV(r) \
  "vcvtdq2ps %%zmm12,%%zmm12\n vmulps 640(%0)%{1to16%},%%zmm13,%%zmm14\n"                     \
  "vfmadd213ps 1024(%1),%%zmm14,%%zmm" #r "\n vfmadd231ps %%zmm12,%%zmm15,%%zmm" #r "\n"      \
  "vmovaps %%zmm" #r ",1024(%1)\n"
#define X8(x) x x x x x x x x
// weights and per-row scales into their registers (each repetition: the C code between the
// repetitions owns the registers)
#define SETUP                                                                              \
  "vmovdqa64 1024(%0),%%zmm16\n vmovdqa64 1088(%0),%%zmm17\n vmovdqa64 1152(%0),%%zmm18\n" \
  "vmovdqa64 1216(%0),%%zmm19\n vmovdqa64 1280(%0),%%zmm20\n vmovdqa64 1344(%0),%%zmm21\n" \
  "vmovdqa64 1408(%0),%%zmm22\n vmovdqa64 1472(%0),%%zmm23\n vmovdqa64 1536(%0),%%zmm24\n" \
  "vmovdqa64 1600(%0),%%zmm25\n vmovdqa64 1664(%0),%%zmm26\n vmovdqa64 1728(%0),%%zmm27\n" \
  "vmovdqa64 1792(%0),%%zmm28\n vmovdqa64 1856(%0),%%zmm29\n vmovdqa64 1920(%0),%%zmm30\n" \
  "vmovdqa64 1984(%0),%%zmm31\n vmovaps 768(%0),%%zmm13\n vmovaps 832(%0),%%zmm15\n"

// body: 8 blocks (256 inputs), 4 tokens x 2 tiles x 16 rows x 32 inputs each
#define RUN(name, body)                                                                         \
  {                                                                                             \
    const long n = 1000000;                                                                     \
    double best = 1e30;                                                                         \
    for (int r = 0; r < 5; ++r) {                                                               \
      double t = now();                                                                         \
      for (long i = 0; i < n; ++i) __asm__ volatile(SETUP body::"r"(X.b), "r"(ACC) : "memory"); \
      t = now() - t;                                                                            \
      if (t < best) best = t;                                                                   \
    }                                                                                           \
    printf("%s %.1f\n", name, n * 8.0 * 4 * 2 * 16 * 32 / best / 1e9);                          \
    fflush(stdout);                                                                             \
  }

int main(void) {
  for (int i = 0; i < 512; ++i) X.b[i] = (int8_t)(i % 7 - 3);   // activations
  for (int i = 128; i < 150; ++i) X.f[i] = 1e-3f;               // d, sums as floats
  for (int i = 300; i < 320; ++i) X.h[i] = (int16_t)(i % 5);    // int16 pairs
  for (int i = 160; i < 176; ++i) X.f[i] = 0.5f;                // a scale to broadcast
  for (int i = 192; i < 224; ++i) X.f[i] = 0.5f;                // per-row scales
  for (int i = 1024; i < 2048; ++i) X.b[i] = (int8_t)(i % 16);  // 4-bit weights
  RUN("chains", X8(BLOCK_REG))
  RUN("broadcasts", X8(BLOCK_MEM))
  RUN("tail_add", X8(BLOCK_MEM EACH(T1)))
  RUN("tail_cvt_fma", X8(BLOCK_MEM EACH(T2)))
  RUN("tail_q4k", X8(BLOCK_MEM EACH(T4)))
  RUN("int_tail_q4k", X8(BLOCK_MEM EACH(TI)) EACH(SB))
  return 0;
}
