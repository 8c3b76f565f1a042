// A batch's quantized activations block-major (BatchActs), as the batched kernels read them.
// Part of quant_gemm.cpp's translation unit: included there only, in order.
#pragma once

#include "quant_streaming.h"

namespace {

#if defined(TM_AVX512) || defined(TM_AVX2)

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

#endif  // TM_AVX512 || TM_AVX2

}  // namespace
