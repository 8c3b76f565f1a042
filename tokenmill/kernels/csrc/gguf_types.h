// The GGML block types the kernels run and their sizes (shared by quant_gemm.cpp and
// gguf_repack.cpp; the packed layout is documented in tokenmill/quant/gguf_pack.py).
#pragma once
#include <cstdint>
#include <type_traits>

namespace gguf_types {

enum : int64_t {
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  IQ2_XXS = 16,
  IQ2_XS = 17,
  IQ3_XXS = 18,
  IQ1_S = 19,
  IQ4_NL = 20,
  IQ3_S = 21,
  IQ2_S = 22,
  IQ4_XS = 23,
  IQ1_M = 29
};

// ggml's i-quants with a grid, repacked into a 4-bit codebook layout (gguf_pack.py).
constexpr bool lattice(int64_t q) {
  return q == IQ1_S || q == IQ1_M || q == IQ2_XXS || q == IQ2_XS || q == IQ2_S || q == IQ3_XXS ||
         q == IQ3_S;
}
// The lattice types with a scale per 16 inputs.
constexpr bool lattice_split(int64_t q) { return q == IQ1_M || q == IQ2_XS || q == IQ2_S; }
// The lattice types of 6 values (3 magnitudes and their negatives): 3-bit indices, laid out as
// Q3_K's bits; the IQ3 types' 16 values take 4 bits, laid out as IQ4_XS's.
constexpr bool lattice3(int64_t q) { return lattice(q) && q != IQ3_XXS && q != IQ3_S; }

// Types whose unit is a 256-input super-block (the K-quants, IQ4_XS and the lattice types).
constexpr bool k_type(int64_t q) {
  return q == Q2_K || q == Q3_K || q == Q4_K || q == Q5_K || q == Q6_K || q == IQ4_XS || lattice(q);
}

// Inputs per packed unit (a block of 32, or a super-block of 256).
inline int64_t unit_k(int64_t q) { return k_type(q) ? 256 : 32; }

// Bytes of one packed unit of 16 rows (0: no kernel for this type).
inline int64_t unit_bytes(int64_t q) {
  switch (q) {
    case Q4_0:
      return 288;
    case Q4_1:
      return 320;
    case Q5_0:
      return 352;
    case Q5_1:
      return 384;
    case Q8_0:
      return 544;
    case Q2_K:
      return 1344;
    case Q3_K:
      return 1824;
    case Q4_K:
      return 2368;
    case Q5_K:
      return 2880;
    case Q6_K:
      return 3360;
    case IQ4_NL:
      return 288;
    case IQ4_XS:
    case IQ3_XXS:
    case IQ3_S:
      return 2208;
    case IQ1_S:
    case IQ2_XXS:
      return 1696;
    case IQ1_M:
    case IQ2_XS:
    case IQ2_S:
      return 1824;
    default:
      return 0;
  }
}

// Bytes of one GGUF block as stored in the file (0: no kernel for this type).
inline int64_t block_bytes(int64_t q) {
  switch (q) {
    case Q4_0:
      return 18;
    case Q4_1:
      return 20;
    case Q5_0:
      return 22;
    case Q5_1:
      return 24;
    case Q8_0:
      return 34;
    case Q2_K:
      return 84;
    case Q3_K:
      return 110;
    case Q4_K:
      return 144;
    case Q5_K:
      return 176;
    case Q6_K:
      return 210;
    case IQ4_NL:
      return 18;
    case IQ4_XS:
      return 136;
    case IQ1_S:
      return 50;
    case IQ1_M:
      return 56;
    case IQ2_XXS:
      return 66;
    case IQ2_XS:
      return 74;
    case IQ2_S:
      return 82;
    case IQ3_XXS:
      return 98;
    case IQ3_S:
      return 110;
    default:
      return 0;
  }
}

// Calls f(std::integral_constant<int64_t, Q>{}) for kernel type q: the one switch from a run-time
// type to the templates of an entry point. Returns false (f not called) for any other type.
template <typename F>
bool with_type(int64_t q, F&& f) {
  switch (q) {
    case Q4_0:
      return f(std::integral_constant<int64_t, Q4_0>{}), true;
    case Q4_1:
      return f(std::integral_constant<int64_t, Q4_1>{}), true;
    case Q5_0:
      return f(std::integral_constant<int64_t, Q5_0>{}), true;
    case Q5_1:
      return f(std::integral_constant<int64_t, Q5_1>{}), true;
    case Q8_0:
      return f(std::integral_constant<int64_t, Q8_0>{}), true;
    case Q2_K:
      return f(std::integral_constant<int64_t, Q2_K>{}), true;
    case Q3_K:
      return f(std::integral_constant<int64_t, Q3_K>{}), true;
    case Q4_K:
      return f(std::integral_constant<int64_t, Q4_K>{}), true;
    case Q5_K:
      return f(std::integral_constant<int64_t, Q5_K>{}), true;
    case Q6_K:
      return f(std::integral_constant<int64_t, Q6_K>{}), true;
    case IQ4_NL:
      return f(std::integral_constant<int64_t, IQ4_NL>{}), true;
    case IQ4_XS:
      return f(std::integral_constant<int64_t, IQ4_XS>{}), true;
    case IQ1_S:
      return f(std::integral_constant<int64_t, IQ1_S>{}), true;
    case IQ1_M:
      return f(std::integral_constant<int64_t, IQ1_M>{}), true;
    case IQ2_XXS:
      return f(std::integral_constant<int64_t, IQ2_XXS>{}), true;
    case IQ2_XS:
      return f(std::integral_constant<int64_t, IQ2_XS>{}), true;
    case IQ2_S:
      return f(std::integral_constant<int64_t, IQ2_S>{}), true;
    case IQ3_XXS:
      return f(std::integral_constant<int64_t, IQ3_XXS>{}), true;
    case IQ3_S:
      return f(std::integral_constant<int64_t, IQ3_S>{}), true;
    default:
      return false;
  }
}

}  // namespace gguf_types
