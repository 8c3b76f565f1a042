"""FP8 weights (`quantization="fp8"`): float8 e4m3 with a scale per output channel, quantized
once at load from the checkpoint's weights; activations quantized per token at run time; the
product through `torch._scaled_mm` (cuBLASLt's fp8 GEMM on Hopper and Ada GPUs, torch's own
kernel on the CPU, where it is only a reference).

A weight row w becomes q = round_e4m3(w / s) with s = max|w| / 448 (448: e4m3's largest
finite value), so the largest entry of each row lands on 448 and every entry keeps 3 mantissa
bits: a relative rounding error of at most 2^-4 per entry. An activation row x gets the same
treatment with its own scale. The output head and the embedding stay in the compute dtype (as
in vLLM): the head's errors go straight into the logits, and its GEMM is one of ~200 per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenmill.quant.dense import DenseEmbeddingMethod, UnquantizedLinearMethod

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MIN_SCALE = 1e-12  # an all-zero row keeps a finite scale
HEAD = "lm_head.weight"

QuantizeRows = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, k] -> (float8 e4m3 [rows, k], float32 scales [rows, 1]) with x ~= q * scale,
    each row scaled so that its largest magnitude becomes 448 (torch ops; the reference)."""
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return (x / scale).to(FP8), scale


def fp8_unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `quantization="fp8"` cannot run on `device` in `dtype`, or None when it can."""
    if device.type != "cuda":
        return None
    if torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"fp8 GEMMs need compute capability 8.9 or later (Ada, Hopper); {name} has less"
    if dtype != torch.bfloat16:
        return f"fp8 GEMMs with a scale per row write bfloat16 on CUDA, not {dtype}"
    return None


class Fp8LinearMethod(UnquantizedLinearMethod):
    """float8 e4m3 weights [out, in] with float32 scales per output row; y = _scaled_mm of the
    per-token-quantized input and the weights, in x's dtype. The checkpoint loads into the dense
    weight (as `UnquantizedLinearMethod` does), which process_weights_after_loading quantizes and
    drops: no dense copy stays resident."""

    name = "fp8"

    def __init__(self, quantize_activations: QuantizeRows) -> None:
        super().__init__()  # the dense weight it loads into: the compute dtype
        self.quantize_activations = quantize_activations

    def create_weights(
        self,
        layer: torch.nn.Module,
        in_features: int,
        output_sizes: dict[str, int],
        dtype: torch.dtype,
    ) -> None:
        super().create_weights(layer, in_features, output_sizes, dtype)
        layer.register_buffer("weight_fp8", None, persistent=False)
        layer.register_buffer("weight_scale", None, persistent=False)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        q, scale = quantize_rows(layer.weight.detach())
        layer.weight_fp8 = q
        layer.weight_scale = scale.view(1, -1).contiguous()  # [1, out]: _scaled_mm's layout
        layer.weight = None

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        shape = x.shape
        if x.numel() == 0:
            return x.new_empty(*shape[:-1], layer.out_features)
        xq, x_scale = self.quantize_activations(x.reshape(-1, shape[-1]))
        y = torch._scaled_mm(
            xq,
            layer.weight_fp8.t(),  # column-major [in, out], as the fp8 GEMM needs
            scale_a=x_scale,
            scale_b=layer.weight_scale,
            out_dtype=x.dtype,
        )
        if bias is not None:
            y = y + bias
        return y.view(*shape[:-1], y.shape[-1])

    def bytes_per_call(self, layer: torch.nn.Module) -> int:
        return layer.weight_fp8.numel() + 4 * layer.weight_scale.numel()


class Fp8Config:
    """Every decoder linear layer in fp8; the output head and the embedding dense.

    A layer whose dimensions are not multiples of 16 (what the fp8 GEMMs take) stays dense.
    `quantize_activations` quantizes each linear input (the loader passes the one-launch
    Triton kernel on CUDA; `quantize_rows`, torch ops, elsewhere)."""

    def __init__(self, quantize_activations: QuantizeRows = quantize_rows) -> None:
        self.quantize_activations = quantize_activations

    def linear_method(
        self, names: dict[str, str], in_features: int, output_sizes: dict[str, int]
    ) -> Fp8LinearMethod | UnquantizedLinearMethod:
        out = sum(output_sizes.values())
        if HEAD in names.values() or in_features % 16 or out % 16:
            return UnquantizedLinearMethod()
        return Fp8LinearMethod(self.quantize_activations)

    def embedding_method(self, name: str) -> DenseEmbeddingMethod:
        return DenseEmbeddingMethod()

    def tied_head_method(self, embedding: torch.nn.Module, in_features: int, vocab: int) -> None:
        return None
