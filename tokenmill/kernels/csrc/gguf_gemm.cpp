// y = x W^T with W kept in GGUF's quantized blocks (Q4_1, Q8_0), on Intel AMX.
//
// Weights are repacked once at load time (tokenmill/layers/gguf_quant.py) into tiles of
// 16 output rows ("columns" n of y) x 32 inputs k (one GGUF block per row). Row r of a tile
// holds the input pair (2r, 2r+1) of every column, which is the layout AMX reads:
//   Q4_1: d[16] fp16 | m[16] fp16 | 16 rows x 16 bytes; byte 2j+p of row r holds
//         q[n=j][2r+p] in its low nibble and q[n=8+j][2r+p] in its high nibble
//   Q8_0: d[16] fp16 | 16 rows x 32 bytes; byte 2n+p of row r = q[n][2r+p]
// stored tile by tile along k, then along n.
// A task owns 32 output columns. For each 32-input step it dequantizes their two tiles to
// bfloat16 (w = d * q + m in float32, rounded to nearest even: exactly the values that loading
// the file as bfloat16 gives) and feeds them to the tile unit right away, so the vector
// dequantization overlaps the matrix multiply. Accumulation is float32; the output is rounded
// to bfloat16 once.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define TOKENMILL_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t kQ41 = 3;   // GGMLQuantizationType.Q4_1
constexpr int64_t kQ80 = 8;   // GGMLQuantizationType.Q8_0

int64_t tile_bytes(int64_t qtype) {
  if (qtype == kQ41) return 64 + 256;
  if (qtype == kQ80) return 32 + 512;
  return 0;
}

#ifdef TOKENMILL_AMX
bool amx_permitted() {
  // Linux hands out the AMX tile state only on request (once per process).
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: 0-3 accumulators C[mi][ni] (tile 2 * mi + ni), 4-5 x rows, 6-7 weight columns.
void configure_tiles(int r0, int r1) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64;
  cfg.rows[0] = cfg.rows[1] = cfg.rows[4] = r0;
  cfg.rows[2] = cfg.rows[3] = cfg.rows[5] = r1 > 0 ? r1 : 1;
  cfg.rows[6] = cfg.rows[7] = 16;
  _tile_loadconfig(&cfg);
}

// 16 fp16 -> 16 fp32
inline __m512 load_half16(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// One 16 x 32 weight tile -> 16 rows of 32 bf16 (pairs (2r, 2r+1) per output column).
void dequant_tile(const uint8_t* src, int64_t qtype, uint16_t* dst) {
  // lane 2j+p of a 16-lane vector belongs to column j (low) or 8+j (high)
  const __m512i dup_lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i dup_hi = _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9,
                                          8, 8);
  const __m512 d = load_half16(src);
  const __m512 d_lo = _mm512_permutexvar_ps(dup_lo, d), d_hi = _mm512_permutexvar_ps(dup_hi, d);
  if (qtype == kQ41) {
    const __m512 m = load_half16(src + 32);
    const __m512 m_lo = _mm512_permutexvar_ps(dup_lo, m), m_hi = _mm512_permutexvar_ps(dup_hi, m);
    const __m512i low4 = _mm512_set1_epi32(0xF);
    const uint8_t* q = src + 64;
    for (int r = 0; r < 16; ++r) {
      const __m512i b = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * 16)));
      const __m512 lo = _mm512_fmadd_ps(d_lo, _mm512_cvtepi32_ps(_mm512_and_si512(b, low4)), m_lo);
      const __m512 hi = _mm512_fmadd_ps(d_hi, _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), m_hi);
      _mm512_storeu_si512(dst + r * 32, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  } else {  // Q8_0
    const int8_t* q = reinterpret_cast<const int8_t*>(src + 32);
    for (int r = 0; r < 16; ++r) {
      const __m512 lo = _mm512_mul_ps(d_lo, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * 32)))));
      const __m512 hi = _mm512_mul_ps(d_hi, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * 32 + 16)))));
      _mm512_storeu_si512(dst + r * 32, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
}

void gemm_amx(const uint16_t* x, const uint8_t* w, const float* bias, uint16_t* y,
              int64_t M, int64_t N, int64_t K, int64_t qtype) {
  const int64_t kb_count = K / 32, tb = tile_bytes(qtype);
  const int64_t n_blocks = (N + 31) / 32;
  const bool one_chunk = M <= 32;
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    // Dequantized weights of 32 columns, [kb][2 column tiles][16 rows][32 bf16]: all of K when
    // several row chunks reuse them, else a ring of two steps that stays in L1.
    std::vector<uint16_t> wbuf((one_chunk ? 2 : kb_count) * 1024);
    alignas(64) float cbuf[4][16 * 16];
    int cur_r0 = -1, cur_r1 = -1;
    for (int64_t nb = begin; nb < end; ++nb) {
      const int64_t n0 = nb * 32, n_tiles = std::min<int64_t>(2, (N - n0) / 16);
      const uint8_t* src0 = w + (n0 / 16) * kb_count * tb;
      const uint8_t* src1 = src0 + kb_count * tb;
      for (int64_t m0 = 0; m0 < M; m0 += 32) {
        const int r0 = (int)std::min<int64_t>(16, M - m0);
        const int r1 = (int)std::max<int64_t>(0, std::min<int64_t>(16, M - m0 - 16));
        if (r0 != cur_r0 || r1 != cur_r1) {
          configure_tiles(r0, r1);
          cur_r0 = r0;
          cur_r1 = r1;
        }
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        const uint16_t* x0 = x + m0 * K;
        const uint16_t* x1 = x0 + 16 * K;
        for (int64_t kb = 0; kb < kb_count; ++kb) {
          uint16_t* wb = wbuf.data() + (one_chunk ? kb % 2 : kb) * 1024;
          if (m0 == 0) {
            dequant_tile(src0 + kb * tb, qtype, wb);
            if (n_tiles > 1) dequant_tile(src1 + kb * tb, qtype, wb + 512);
          }
          _tile_loadd(4, x0 + kb * 32, K * 2);
          _tile_loadd(6, wb, 64);
          _tile_dpbf16ps(0, 4, 6);
          if (n_tiles > 1) {
            _tile_loadd(7, wb + 512, 64);
            _tile_dpbf16ps(1, 4, 7);
          }
          if (r1 > 0) {
            _tile_loadd(5, x1 + kb * 32, K * 2);
            _tile_dpbf16ps(2, 5, 6);
            if (n_tiles > 1) _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, cbuf[0], 64);
        if (n_tiles > 1) _tile_stored(1, cbuf[1], 64);
        if (r1 > 0) {
          _tile_stored(2, cbuf[2], 64);
          if (n_tiles > 1) _tile_stored(3, cbuf[3], 64);
        }
        for (int mi = 0; mi < (r1 > 0 ? 2 : 1); ++mi) {
          const int rows = mi == 0 ? r0 : r1;
          for (int64_t ni = 0; ni < n_tiles; ++ni) {
            const __m512 bv = bias ? _mm512_loadu_ps(bias + n0 + ni * 16) : _mm512_setzero_ps();
            const float* c = cbuf[mi * 2 + ni];
            for (int i = 0; i < rows; ++i) {
              uint16_t* yr = y + (m0 + mi * 16 + i) * N + n0 + ni * 16;
              const __m256bh v = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(c + i * 16), bv));
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(yr), (__m256i)v);
            }
          }
        }
      }
    }
    _tile_release();
  });
}
#endif  // TOKENMILL_AMX

}  // namespace

bool gguf_gemm_available() {
#ifdef TOKENMILL_AMX
  return amx_permitted();
#else
  return false;
#endif
}

// x [M, K] bf16 (contiguous), packed uint8 (see above), bias [N] bf16 or None -> [M, N] bf16.
torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor packed, int64_t qtype, int64_t N,
                          c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(gguf_gemm_available(), "gguf_linear needs Intel AMX (bf16)");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be [M, K] bfloat16");
  TORCH_CHECK(qtype == kQ41 || qtype == kQ80, "unsupported GGUF type ", qtype);
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 32 == 0 && N % 16 == 0, "K must be a multiple of 32 and N of 16");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.numel() == (N / 16) * (K / 32) * tile_bytes(qtype),
              "packed weights do not match N, K and the type");
  torch::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "bias must have N elements");
    b = bias->to(at::kFloat).contiguous();
  }
  auto y = torch::empty({M, N}, x.options());
#ifdef TOKENMILL_AMX
  if (M > 0)
    gemm_amx(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
             packed.data_ptr<uint8_t>(),
             b.defined() ? b.data_ptr<float>() : nullptr,
             reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), M, N, K, qtype);
#endif
  return y;
}
