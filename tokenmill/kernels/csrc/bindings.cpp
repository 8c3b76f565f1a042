// The Python module: every kernel entry point of the other translation units, bound once. The
// only file that includes pybind11 and torch's Python bindings: their Tensor casters alone
// (<torch/csrc/utils/pybind.h>, 15 s to compile, where <torch/python.h> took 32 s); the kernel
// files build on ATen's core headers, in parallel with this one.
#include <torch/csrc/utils/pybind.h>

#include "cpu_ops.h"
#include "decode_stack.h"
#include "dense_gemm.h"
#include "gguf_repack.h"
#include "prefill_attention.h"
#include "quant_gemm.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_isa", &quant_isa);
  m.def("set_weight_prefetch", &set_weight_prefetch);
  m.def("weight_prefetch", &weight_prefetch);
  m.def("bf16_tiles_min_tokens", &bf16_tiles_min_tokens);
  m.def("quantize_activations", &quantize_activations);
  m.def("quant_gemm", &quant_gemm);
  m.def("quant_rows", &quant_rows);
  m.def("dense_gemm", &dense_gemm, py::arg("x"), py::arg("w"), py::arg("bias") = py::none());
  m.def("dense_bf16_path", &dense_bf16_path);
  m.def("quant_cols", &quant_cols);
  m.def("gguf_repack", &gguf_repack, py::arg("raw"), py::arg("qtype"), py::arg("n"), py::arg("k"),
        py::arg("grid") = py::none());
  // module_local: every kernel level is its own module, and several may be loaded at once
  py::class_<LinearKernel, std::shared_ptr<LinearKernel>>(m, "LinearKernel", py::module_local());
  py::class_<DenseLinear, LinearKernel, std::shared_ptr<DenseLinear>>(m, "DenseLinear",
                                                                      py::module_local())
      .def(py::init<at::Tensor, c10::optional<at::Tensor>>())
      .def("__call__", &DenseLinear::forward);
  py::class_<QuantLinear, LinearKernel, std::shared_ptr<QuantLinear>>(m, "QuantLinear",
                                                                      py::module_local())
      .def(py::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<int64_t>,
                    std::vector<c10::optional<at::Tensor>>, int64_t>())
      .def("__call__", &QuantLinear::forward)
      .def("observe_inputs", &QuantLinear::observe_inputs)
      .def("observed_absmax", &QuantLinear::observed_absmax)
      .def("set_exact_channels", &QuantLinear::set_exact_channels)
      .def("exact_channels", &QuantLinear::exact_channels)
      .def("exact_bytes", &QuantLinear::exact_bytes);
  py::class_<LlamaDecodeStack>(m, "LlamaDecodeStack", py::module_local())
      .def(py::init<
           std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor,
           std::vector<std::shared_ptr<LinearKernel>>, std::vector<std::shared_ptr<LinearKernel>>,
           std::vector<std::shared_ptr<LinearKernel>>, std::vector<std::shared_ptr<LinearKernel>>,
           int64_t, int64_t, int64_t, double, double>())
      .def("__call__", &LlamaDecodeStack::forward);
  m.def("paged_decode_attention", &paged_decode_attention);
  m.def("paged_decode_attention_reference", &paged_decode_attention_reference);
  m.def("paged_prefill_attention", &paged_prefill_attention);
  m.def("paged_prefill_attention_supported", &paged_prefill_attention_supported);
  m.def("write_kv", &write_kv);
  m.def("argmax_rows", &argmax_rows);
  m.def("sample_rows", &sample_rows);
  m.def("apply_token_bitmask", &apply_token_bitmask);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("silu_mul", &silu_mul);
  m.def("rotary_inplace", &rotary_inplace);
}
