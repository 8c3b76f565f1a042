"""Linear layers that keep GGUF's quantized blocks and multiply with them directly.

A decode step of a small model on CPU is bound by the bytes of weights it reads. Q4_1 weights
are 0.625 bytes per parameter against bfloat16's 2, so multiplying straight from the blocks
(dequantized tile by tile in registers, tokenmill/kernels/csrc/gguf_gemm.cpp) reads a third of
the bytes. The tiles are dequantized to exactly the bfloat16 values that loading the file as
bfloat16 gives (w = d * q + m in float32, rounded to nearest even), so the model's numbers do
not change: only the order of float32 additions inside the GEMM does.

The blocks are repacked once, at load time, into tiles of 16 output rows x 32 inputs (the
layout the kernel documents); `dequantize_packed` undoes the packing in PyTorch for tests.
"""

from __future__ import annotations

import numpy as np
import torch

from tokenmill.kernels.cpu_ops import get_ops

# GGMLQuantizationType values with a native kernel, and their block layout.
Q4_1, Q8_0 = 3, 8
NATIVE_TYPES = {Q4_1: "Q4_1", Q8_0: "Q8_0"}
_BLOCK_BYTES = {Q4_1: 20, Q8_0: 34}


def native_gguf_available(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether GGUF blocks can be run natively for activations of `dtype` on `device`."""
    if torch.device(device).type != "cpu" or dtype != torch.bfloat16:
        return False
    ops = get_ops()
    return ops is not None and bool(ops.gguf_gemm_available())


def can_pack(qtype: int, n: int, k: int) -> bool:
    return qtype in NATIVE_TYPES and n % 16 == 0 and k % 32 == 0


def pack_gguf_blocks(raw: np.ndarray | torch.Tensor, qtype: int, n: int, k: int) -> torch.Tensor:
    """GGUF rows [n, k / 32 * block bytes] (uint8) -> the kernel's tiled layout (uint8, flat)."""
    if not can_pack(qtype, n, k):
        raise ValueError(f"cannot pack GGUF type {qtype} with shape [{n}, {k}]")
    if not isinstance(raw, torch.Tensor):
        raw = torch.from_numpy(np.array(raw))  # a copy: memory-mapped arrays are read-only
    blocks = raw.view(torch.uint8)
    kb, nt = k // 32, n // 16
    blocks = blocks.reshape(n, kb, _BLOCK_BYTES[qtype])

    def per_tile_half(col: int) -> torch.Tensor:  # fp16 scale per (row, block) -> [nt, kb, 32 B]
        h = blocks[:, :, col: col + 2].contiguous().view(torch.float16).reshape(nt, 16, kb)
        return h.permute(0, 2, 1).contiguous().view(torch.uint8).reshape(nt, kb, 32)

    if qtype == Q4_1:
        qs = blocks[:, :, 4:20]
        q = torch.cat([qs & 0xF, qs >> 4], dim=-1)  # [n, kb, 32]: element j of the block
        # [nt, col half, 8 cols, kb, r, pair] -> [nt, kb, r, col half, 8 cols, pair]
        q = q.reshape(nt, 2, 8, kb, 16, 2).permute(0, 3, 4, 1, 2, 5)
        qbytes = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(nt, kb, 256)
        tiles = torch.cat([per_tile_half(0), per_tile_half(2), qbytes], dim=-1)
    else:  # Q8_0
        q = blocks[:, :, 2:34].reshape(nt, 16, kb, 16, 2).permute(0, 2, 3, 1, 4)
        tiles = torch.cat([per_tile_half(0), q.reshape(nt, kb, 512)], dim=-1)
    return tiles.contiguous().flatten()


def dequantize_packed(packed: torch.Tensor, qtype: int, n: int, k: int) -> torch.Tensor:
    """The float32 [n, k] weight a packed tensor holds (PyTorch; tests check the packing)."""
    kb, nt = k // 32, n // 16
    if qtype == Q4_1:
        t = packed.view(nt, kb, 320)
        d = t[..., 0:32].contiguous().view(torch.float16).float()  # [nt, kb, 16]
        m = t[..., 32:64].contiguous().view(torch.float16).float()
        qb = t[..., 64:].reshape(nt, kb, 16, 8, 2)  # [nt, kb, r, col (low half), pair]
        q = torch.stack([qb & 0xF, qb >> 4], dim=3).reshape(nt, kb, 16, 16, 2).float()
        w = d[:, :, None, :, None] * q + m[:, :, None, :, None]
    elif qtype == Q8_0:
        t = packed.view(nt, kb, 544)
        d = t[..., 0:32].contiguous().view(torch.float16).float()
        q = t[..., 32:].contiguous().view(torch.int8).reshape(nt, kb, 16, 16, 2).float()
        w = d[:, :, None, :, None] * q
    else:
        raise ValueError(f"unsupported GGUF type {qtype}")
    # [nt, kb, r, col, pair] -> [nt, col, kb, r, pair] -> [n, k]
    return w.permute(0, 3, 1, 2, 4).reshape(n, k)


class GGUFLinearMethod:
    """Weights as packed GGUF blocks; `apply` runs the AMX kernel (bfloat16 activations)."""

    def __init__(self, qtype: int) -> None:
        self.qtype = qtype
        self.name = NATIVE_TYPES[qtype]

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Nothing to do: the blocks were packed for the kernel when they were attached."""

    def set_packed(self, layer: torch.nn.Module, packed: torch.Tensor) -> None:
        layer.qweight = packed
        layer.weight = None
        layer.packed_weight = None

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        y = get_ops().gguf_linear(x.reshape(-1, shape[-1]), layer.qweight, self.qtype,
                                  layer.out_features, bias)
        return y.view(*shape[:-1], layer.out_features)
