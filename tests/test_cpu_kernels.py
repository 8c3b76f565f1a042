"""The fused C++ CPU kernels against the PyTorch reference formulas they replace."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import include_paths

from tokenmill.kernels import cpu_dense, cpu_isa, cpu_ops
from tokenmill.kernels.cpu_ops import get_ops
from tokenmill.layers.rotary import RotaryEmbedding, apply_rotary

ops = get_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="no C++ compiler to build the kernels")
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
DTYPES = [torch.float32, torch.bfloat16]
# (query and output dtype, KV cache dtype): the model's dtype, or a float16 cache beside it
# (--kv-cache-dtype float16: the kernels widen its rows as they load them; the query and the
# output keep their dtype)
KV_DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.float16),
]
KV_IDS = ["float32", "bfloat16", "float32-f16cache", "bfloat16-f16cache"]


LAYOUTS = ["token-major", "head-major"]  # the KV cache layouts the kernels read (attention.py)


def in_layout(cache: torch.Tensor, bs: int, layout: str) -> torch.Tensor:
    """A token-major cache [slots, kv_heads, head_dim] laid out as `layout` (head-major:
    [blocks, kv_heads, bs, head_dim], each head's rows of a block side by side)."""
    if layout == "token-major":
        return cache
    return cache.view(-1, bs, *cache.shape[1:]).transpose(1, 2).contiguous()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,cache_dtype", KV_DTYPES, ids=KV_IDS)
@pytest.mark.parametrize("hq,hkv", [(9, 3), (4, 4), (8, 1)])
def test_paged_decode_attention_matches_sdpa(dtype, cache_dtype, hq, hkv, layout):
    """Against SDPA in float32 over the cached rows (a float16 cache's rows as they are, the
    query unrounded: the output's own dtype's tolerance)."""
    g = torch.Generator().manual_seed(0)
    d, bs, num_blocks = 64, 4, 80
    seq_lens = [1, 7, 16, 33, 50]
    k_cache = torch.randn(num_blocks * bs, hkv, d, generator=g).to(cache_dtype)
    v_cache = torch.randn(num_blocks * bs, hkv, d, generator=g).to(cache_dtype)
    perm = torch.randperm(num_blocks, generator=g)  # blocks scattered through the pool
    max_blocks = -(-max(seq_lens) // bs)
    tables = perm[: len(seq_lens) * max_blocks].view(len(seq_lens), max_blocks)
    q = torch.randn(len(seq_lens), hq, d, generator=g).to(dtype)
    out = ops.paged_decode_attention(
        q,
        in_layout(k_cache, bs, layout),
        in_layout(v_cache, bs, layout),
        tables.int(),
        torch.tensor(seq_lens, dtype=torch.int32),
        bs,
        d**-0.5,
    )
    assert out.dtype == dtype
    for b, n in enumerate(seq_lens):
        slots = (tables[b][:, None] * bs + torch.arange(bs)).flatten()[:n]
        k = k_cache[slots].float().transpose(0, 1)  # [hkv, n, d]
        v = v_cache[slots].float().transpose(0, 1)
        ref = F.scaled_dot_product_attention(
            q[b].float()[:, None],
            k.repeat_interleave(hq // hkv, 0),
            v.repeat_interleave(hq // hkv, 0),
            scale=d**-0.5,
        )[:, 0]
        torch.testing.assert_close(out[b].float(), ref, **TOL[dtype])


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dense_gemm_matches_float64(wdtype, isa):
    """x W^T + b for 16-bit and float32 weights (widened as they load) against a float64
    product of the same values, on the 8-lane (AVX2) and the 16-lane (AVX-512) build: every row
    count up to 20 (the streaming path's groups of 8, 4, 3 or 2 weight rows and passes of up to
    4 tokens; from 9 on, 16-bit weights take the widened path: blocks of rows, 1,821 rows of
    108 inputs being 3 blocks of 606 and one of 3), 33 and 70, widths with and without a
    remainder of the vector steps (1,000: prefetches past each row's end and W's), a number of
    rows that no group size divides, with and without bias; the sums in float32."""
    if isa not in cpu_isa.supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    level = cpu_ops.load_ops(isa)
    g = torch.Generator().manual_seed(4)
    for n, k in [(13, 37), (67, 45), (5, 576), (1, 8), (1821, 108), (37, 1000)]:
        w = torch.randn(n, k, generator=g).to(wdtype)
        bias = torch.randn(n, generator=g)
        for m in [*range(1, 21), 33, 70]:
            x = torch.randn(m, k, generator=g)
            for b in (None, bias):
                ref = F.linear(x.double(), w.double(), None if b is None else b.double())
                got = level.dense_gemm(x, w, b)
                assert got.dtype == torch.float32 and got.shape == (m, n)
                torch.testing.assert_close(got.double(), ref, atol=1e-5 * ref.abs().max(), rtol=0)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        level.dense_gemm(torch.randn(1, 8), torch.ones(2, 8, dtype=torch.int8))


def test_dense_small_batch_entry_points():
    """`CpuDenseLinear`'s GLU and add + RMSNorm entry points against the ops they fuse."""
    small = cpu_dense.CpuDenseLinear(ops)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(24, 40, generator=g).to(torch.float16)
    gate_up = torch.randn(3, 80, generator=g)
    gate, up = gate_up.chunk(2, dim=-1)
    ref = F.linear((F.silu(gate) * up).double(), w.double())
    torch.testing.assert_close(small.glu(gate_up, w, None).double(), ref, atol=1e-5, rtol=1e-5)
    res, delta, nw = (torch.randn(3, 40, generator=g) for _ in range(3))
    summed = res + delta
    normed = F.rms_norm(summed, (40,), nw[0], 1e-6)
    r, y = small.add_norm(res.clone(), delta, nw[0], 1e-6, w, None)
    torch.testing.assert_close(r, summed)
    torch.testing.assert_close(y, F.linear(normed, w.float()), atol=1e-4, rtol=1e-4)
    assert small.applies(w) and not small.applies(w.t())  # a strided weight goes to torch
    # 16-bit weights beside float32 compute take every row count (a float32 copy per call ran
    # slower), float32 up to 8; bfloat16 in bfloat16 compute every row count where the kernel
    # multiplies them as they lie (else oneDNN's packed layout takes them), float16 compute none
    f32, bf16 = torch.float32, torch.bfloat16
    assert small.max_rows_for(w, f32) == sys.maxsize and small.max_rows_for(w.float(), f32) == 8
    every = sys.maxsize if ops.dense_bf16_path() else 0
    assert small.max_rows_for(w.bfloat16(), bf16) == every
    assert small.max_rows_for(w, torch.float16) == 0


@pytest.mark.parametrize("isa", ["avx2", "avx512", "amx"])
def test_dense_gemm_bfloat16_activations(isa):
    """bfloat16 x and W give bfloat16: the float32 sums (+ bias) rounded once, against a float64
    product of the same values (at most half a bfloat16 unit off, plus float32's sums). On the
    amx level, up to 4 rows AVX512-BF16 dot products, 5-128 rows on the AMX tiles
    (token groups of 16 in passes of 2: 5, 16, 17, 33, 64 and 128 rows; pairs of 16-row weight
    tiles, an odd number of tiles, K one or several 32-input blocks); on the avx512 level of a
    CPU with AVX512-BF16, 1-64 rows by its dot products (groups of 8 weight rows at 1 row of x,
    else 4 in passes of up to 6 tokens: rows left over, K past a multiple of 32), where a
    token's output does not depend on its batch; elsewhere the float32 streaming on x widened up
    to 4 rows; the library's GEMM beyond, and wherever the tiles do not take N or K."""
    if isa not in cpu_isa.supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    level = cpu_ops.load_ops(isa)
    path = level.dense_bf16_path()
    dot = isa == "avx512" and "avx512_bf16" in cpu_isa.cpu_flags()
    assert path == ("tiles" if isa == "amx" else "dot" if dot else "")
    g = torch.Generator().manual_seed(7)
    shapes = [(48, 32), (64, 96), (32, 576), (40, 64), (48, 40), (37, 33), (1100, 2048)]
    for n, k in shapes:
        w = torch.randn(n, k, generator=g).bfloat16()
        bias = torch.randn(n, generator=g).bfloat16()
        for m in (1, 2, 3, 4, 5, 7, 8, 13, 16, 17, 33, 64, 128, 129):
            x = torch.randn(m, k, generator=g).bfloat16()
            for b in (None, bias):
                ref = F.linear(x.double(), w.double(), None if b is None else b.double())
                got = level.dense_gemm(x, w, b)
                assert got.dtype == torch.bfloat16 and got.shape == (m, n)
                err = (got.double() - ref).abs()
                assert (err <= 2**-8 * ref.abs() + 1e-5 * ref.abs().max()).all(), (n, k, m)
                if b is not None:  # the decode loop's bias, widened: the same bits
                    assert torch.equal(level.dense_gemm(x, w, b.float()), got)
                if path == "dot" and m <= 64:  # batch-invariant
                    assert torch.equal(level.dense_gemm(x[-1:], w, b), got[-1:]), (n, k, m)
    with pytest.raises(RuntimeError, match="bfloat16 weights"):
        level.dense_gemm(torch.randn(9, 32).bfloat16(), torch.randn(16, 32))


def test_dense_linear_kernel_object():
    """`DenseLinear`, the C++ decode loop's dense projection: x W^T + b against float64 for
    float32 weights (streamed up to 8 rows, the library's GEMM beyond: its own rounding, same
    tolerance) and 16-bit ones, with and without bias; bfloat16 x on bfloat16 weights gives
    dense_gemm's bits."""
    g = torch.Generator().manual_seed(6)
    for wdtype in (torch.float32, torch.bfloat16, torch.float16):
        w = torch.randn(70, 96, generator=g).to(wdtype)
        b = torch.randn(70, generator=g)
        for bias in (None, b):
            layer = ops.DenseLinear(w, bias)
            for m in (1, 8, 11):
                x = torch.randn(m, 96, generator=g)
                ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
                got = layer(x).double()
                torch.testing.assert_close(got, ref, atol=1e-5 * ref.abs().max(), rtol=0)
    w = torch.randn(64, 96, generator=g).bfloat16()
    for m in (1, 11):
        x = torch.randn(m, 96, generator=g).bfloat16()
        assert torch.equal(ops.DenseLinear(w, None)(x), ops.dense_gemm(x, w, None))
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.DenseLinear(torch.randn(8, 4).t(), None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 96, generator=g).to(dtype)
    delta = torch.randn(5, 96, generator=g).to(dtype)
    w = torch.randn(96, generator=g).to(dtype)
    summed = x + delta
    xf = summed.float()
    ref = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    res = x.clone()
    out = ops.add_rms_norm(res, delta, w, 1e-6)
    torch.testing.assert_close(res, summed, atol=0, rtol=0)  # residual updated in place
    torch.testing.assert_close(out, ref, **TOL[dtype])
    out2 = ops.add_rms_norm(summed.clone(), None, w, 1e-6)
    torch.testing.assert_close(out2, ref, **TOL[dtype])


@pytest.mark.parametrize("level", list(cpu_isa.ISA_FLAGS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [40, 43])  # whole vectors (8 or 16 lanes), and a partial one
def test_silu_mul(level, dtype, width):
    """On every kernel level the machine has (8-lane AVX2 and 16-lane AVX-512 code), with gates
    far below -88 (where exp(-x) overflows float32: the old loop gave NaN there) and above."""
    if level not in cpu_isa.supported_isas():
        pytest.skip(f"this CPU cannot run the {level} kernels")
    kernels = cpu_ops.load_ops(level)
    gu = torch.randn(7, 2 * width, generator=torch.Generator().manual_seed(2)) * 4
    gu[0, :width] = torch.linspace(-120, 120, width)
    gu = gu.to(dtype)
    gate, up = gu.chunk(2, dim=-1)
    ref = F.silu(gate.double()) * up.double()
    torch.testing.assert_close(kernels.silu_mul(gu).double(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_inplace_on_strided_view(dtype):
    rot = RotaryEmbedding(32, 100, 10000.0)
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(6, 3 * 4 * 32, generator=g).to(dtype)
    qk = qkv[:, : 2 * 4 * 32].view(6, 8, 32)  # row stride wider than the view, as in the model
    positions = torch.tensor([0, 1, 5, 17, 63, 99])
    ref = apply_rotary(qk.clone(), *rot.cos_sin(positions, dtype))
    v_before = qkv[:, 2 * 4 * 32 :].clone()
    ops.rotary_inplace(qk, positions, rot.cos_cached, rot.sin_cached)
    torch.testing.assert_close(qk, ref, **TOL[dtype])
    torch.testing.assert_close(qkv[:, 2 * 4 * 32 :], v_before, atol=0, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,cache_dtype", KV_DTYPES, ids=KV_IDS)
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize(
    "hq,hkv,d", [(32, 8, 128), (12, 2, 64), (16, 2, 64), (5, 5, 128), (6, 2, 32)]
)
def test_paged_decode_attention_vectorized_matches_portable(
    dtype, cache_dtype, hq, hkv, d, bs, layout
):
    """The vectorized kernel of the build (AVX-512 or AVX2; head_dim 64/128; 1 to 8 query heads
    per KV head) against the portable one, with q a strided view of a fused qkv row as in the
    model, context lengths around the 8- and 16-token groups and the blocks, and one context
    whose V rows the AVX2 kernel fetches during the output pass instead of during the scores
    (over 128 KiB per head)."""
    g = torch.Generator().manual_seed(5)
    num_blocks = 200
    seq_lens = torch.tensor([1, 15, 16, 17, 31, 33, 100, 300], dtype=torch.int32)  # <= 19 blocks
    n = len(seq_lens)
    k_cache = in_layout(
        torch.randn(num_blocks * bs, hkv, d, generator=g).to(cache_dtype), bs, layout
    )
    v_cache = in_layout(
        torch.randn(num_blocks * bs, hkv, d, generator=g).to(cache_dtype), bs, layout
    )
    tables = torch.randperm(num_blocks, generator=g)[: n * 19].view(n, 19).int()
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g).to(dtype)
    q = qkv[:, : hq * d].view(n, hq, d)
    out = ops.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, bs, d**-0.5)
    ref = ops.paged_decode_attention_reference(
        q.contiguous(), k_cache, v_cache, tables, seq_lens, bs, d**-0.5
    )
    # float32 sums in another order; bf16 outputs may then round one ulp apart
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("level", list(cpu_isa.ISA_FLAGS))
@pytest.mark.parametrize("dtype,cache_dtype", KV_DTYPES, ids=KV_IDS)
@pytest.mark.parametrize(
    "hq,hkv,d,bs,layout",
    [(9, 3, 64, 16, "head-major"), (32, 8, 128, 5, "token-major"), (12, 2, 64, 32, "head-major")],
)
def test_split_kv_decode_matches_portable_and_its_batch(
    level, dtype, cache_dtype, hq, hkv, d, bs, layout
):
    """Contexts over 256 tokens run in chunks (split-KV, merged by log-sum-exp) on every kernel
    level the machine has: against the portable kernel (one pass over the whole context), at
    lengths around the chunk cuts (255-257, 513, 770, 1000: chunks that start inside a block
    of 5 and of 32), among short requests; and each request alone gives the bits it gets in
    the batch (the cuts depend on its length only, the merge order on nothing else)."""
    if level not in cpu_isa.supported_isas():
        pytest.skip(f"this CPU cannot run the {level} kernels")
    kernels = cpu_ops.load_ops(level)
    g = torch.Generator().manual_seed(7)
    seq_lens = torch.tensor([255, 1, 256, 257, 17, 513, 1000, 300, 770], dtype=torch.int32)
    n, per_seq = len(seq_lens), -(-1000 // bs)
    num_blocks = n * per_seq + 3
    k_cache = in_layout(
        torch.randn(num_blocks * bs, hkv, d, generator=g).to(cache_dtype), bs, layout
    )
    v_cache = in_layout(
        torch.randn(num_blocks * bs, hkv, d, generator=g).to(cache_dtype), bs, layout
    )
    tables = torch.randperm(num_blocks, generator=g)[: n * per_seq].view(n, per_seq).int()
    # queries scaled up so that the softmax is peaked and the chunks' maxima differ widely
    q = (torch.randn(n, hq, d, generator=g) * 4).to(dtype)
    out = kernels.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, bs, d**-0.5)
    ref = kernels.paged_decode_attention_reference(
        q, k_cache, v_cache, tables, seq_lens, bs, d**-0.5
    )
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    for i in range(n):
        alone = kernels.paged_decode_attention(
            q[i : i + 1], k_cache, v_cache, tables[i : i + 1], seq_lens[i : i + 1], bs, d**-0.5
        )
        assert torch.equal(alone, out[i : i + 1]), int(seq_lens[i])


@pytest.mark.parametrize("bad_len", [0, 33])
def test_decode_rejects_contexts_its_block_table_does_not_hold(bad_len):
    """A context of 0 tokens, or longer than the request's blocks, is an error, not a read
    outside the scores or the pool."""
    q = torch.randn(2, 4, 64)
    cache = torch.randn(8, 4, 4, 64)  # 8 head-major blocks of 4 slots
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)  # 8 slots per request
    lens = torch.tensor([5, bad_len], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="attends to 1 to"):
        ops.paged_decode_attention(q, cache, cache, tables, lens, 4, 0.125)


@pytest.mark.parametrize("dtype,cache_dtype", KV_DTYPES, ids=KV_IDS)
@pytest.mark.parametrize(
    "hq,hkv,d,bs",
    [(9, 3, 64, 16), (4, 4, 64, 16), (32, 8, 128, 32), (16, 2, 64, 4), (48, 1, 16, 16)],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_prefill_attention_matches_causal_softmax(dtype, cache_dtype, hq, hkv, d, bs, layout):
    """Chunks after cached context (starting mid-block), whole prompts, one-token chunks and a
    2-token one, lengths around the 64-key blocks and the 16-key score columns, GQA from 1 to 48
    query heads per KV head (a task's 48 rows then hold one token), head_dim 16 to 128, q a
    strided view of a fused qkv row as in the model: against softmax(q k^T) v in float64 with
    each query masked to its position (over a float16 cache's rows as they are)."""
    if not ops.paged_prefill_attention_supported(hq, hkv, d):
        pytest.skip("this build has no prefill kernel")  # never on x86: AVX2 is every level's
    g = torch.Generator().manual_seed(7)
    q_lens = [5, 1, 64, 2, 129, 17, 65, 40]
    seq_lens = [45, 30, 64, 2, 129, 300, 65, 103]
    n_blocks = [-(-s // bs) for s in seq_lens]
    pool = sum(n_blocks) + 5
    k_cache = torch.randn(pool * bs, hkv, d, generator=g).to(cache_dtype)
    v_cache = torch.randn(pool * bs, hkv, d, generator=g).to(cache_dtype)
    perm = torch.randperm(pool, generator=g)  # blocks scattered through the pool
    tables = torch.zeros(len(seq_lens), max(n_blocks), dtype=torch.int32)
    used = 0
    for b, n in enumerate(n_blocks):
        tables[b, :n] = perm[used : used + n].int()
        used += n
    qkv = torch.randn(sum(q_lens), (hq + 2 * hkv) * d, generator=g).to(dtype)
    q = qkv[:, : hq * d].view(-1, hq, d)
    starts = torch.tensor([0, *q_lens]).cumsum(0).int()
    scale = d**-0.5
    out = ops.paged_prefill_attention(
        q,
        in_layout(k_cache, bs, layout),
        in_layout(v_cache, bs, layout),
        tables,
        torch.tensor(seq_lens, dtype=torch.int32),
        starts,
        bs,
        scale,
    )
    assert out.dtype == dtype
    for b, (n_q, n) in enumerate(zip(q_lens, seq_lens)):
        pos = torch.arange(n)
        slots = tables[b].long()[pos // bs] * bs + pos % bs
        k = k_cache[slots].double().transpose(0, 1).repeat_interleave(hq // hkv, 0)
        v = v_cache[slots].double().transpose(0, 1).repeat_interleave(hq // hkv, 0)
        qb = q[starts[b] : starts[b + 1]].double().transpose(0, 1)  # [hq, n_q, d]
        scores = qb @ k.transpose(1, 2) * scale
        q_pos = n - n_q + torch.arange(n_q)
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        ref = (scores.softmax(-1) @ v).transpose(0, 1)
        torch.testing.assert_close(out[starts[b] : starts[b + 1]].double(), ref, **TOL[dtype])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,cache_dtype", KV_DTYPES, ids=KV_IDS)
def test_write_kv_from_strided_views(dtype, cache_dtype, layout):
    """Rows land in their slots, converted to the cache's dtype with torch's rounding (values
    past float16's range included: they become inf, as torch's conversion makes them)."""
    g = torch.Generator().manual_seed(6)
    qkv = torch.randn(9, (4 + 2 * 2) * 16, generator=g).to(dtype)
    qkv[0, 4 * 16] = 1e5  # past float16's largest value
    k = qkv[:, 4 * 16 : 6 * 16].view(9, 2, 16)
    v = qkv[:, 6 * 16 :].view(9, 2, 16)
    slots = torch.tensor([3, 0, 17, 5, 30, 31, 8, 2, 11])
    ref_k = torch.zeros(32, 2, 16, dtype=cache_dtype)
    ref_v = torch.zeros(32, 2, 16, dtype=cache_dtype)
    k_cache, v_cache = in_layout(ref_k, 8, layout), in_layout(ref_v, 8, layout)
    ref_k.index_copy_(0, slots, k.to(cache_dtype))
    ref_v.index_copy_(0, slots, v.to(cache_dtype))
    ops.write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, in_layout(ref_k, 8, layout))
    assert torch.equal(v_cache, in_layout(ref_v, 8, layout))


def test_kv_layout_errors_are_clear():
    q = torch.randn(1, 4, 16)
    tables, lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    head_major = torch.zeros(4, 2, 8, 16)  # blocks of 8 slots
    with pytest.raises(RuntimeError, match="blocks of 8 slots read with block size 16"):
        ops.paged_decode_attention(q, head_major, head_major, tables, lens, 16, 0.25)
    with pytest.raises(RuntimeError, match="must be .slots, kv_heads, head_dim. or"):
        five_d = torch.zeros(2, 2, 2, 2, 16)
        ops.write_kv(q[:, :2], q[:, :2], five_d, five_d, lens)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 16, 33, 1000])
def test_argmax_rows_matches_torch_including_ties(dtype, vocab):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=g).to(dtype)
    x[1] = 0.0  # all tied: the first index wins
    x[2, vocab // 2 :] = 50.0  # a tie between two lanes far apart
    x[3] = float("-inf")
    torch.testing.assert_close(ops.argmax_rows(x), x.argmax(dim=-1), atol=0, rtol=0)


@pytest.mark.parametrize("level", list(cpu_isa.ISA_FLAGS))
@pytest.mark.parametrize("vocab", [1, 7, 255, 256, 257, 1000, 4099])
def test_sample_rows_is_the_float64_inverse_cdf(level, vocab):
    """sample_rows against the textbook definition in float64: a greedy row (temperature 0)
    takes torch's argmax; any other row the first token whose cumulative probability under
    softmax(row / T) exceeds u x total, up to float32's rounding of the probabilities (a
    1e-5-of-the-total band around the target), and never a masked (-inf) token; with masked
    stretches longer than a block of 256, wide logits, and u at 0 and just below 1."""
    if level not in cpu_isa.supported_isas():
        pytest.skip(f"this CPU cannot run the {level} kernels")
    kernels = cpu_ops.load_ops(level)
    g = torch.Generator().manual_seed(vocab)
    rows = 96
    x = torch.randn(rows, vocab, generator=g) * 4
    x[torch.rand(rows, vocab, generator=g) < 0.3] = float("-inf")  # scattered masked tokens
    x[:12, : vocab * 2 // 3] = float("-inf")  # whole masked blocks
    x[:, vocab // 2] = torch.randn(rows, generator=g)  # a finite token in every row
    x[12:16] *= 10  # logits spread over +-100: most terms underflow
    t = torch.rand(rows, generator=g) * 2 + 0.05
    t[16:24] = 0.0
    t[24:28] = 1.0
    u = torch.rand(rows, dtype=torch.float64, generator=g)
    u[28:32] = torch.tensor([0.0, 0.5, 1 - 2**-53, 1 - 2**-30], dtype=torch.float64)
    got = kernels.sample_rows(x, t, u)

    greedy = t == 0
    assert torch.equal(got[greedy], x[greedy].argmax(dim=1))
    xd = x.double() / torch.where(greedy, 1.0, t.double()).unsqueeze(1)
    p = torch.exp(xd - xd.amax(dim=1, keepdim=True))
    cdf = p.cumsum(dim=1)
    total = cdf[:, -1]
    target = u * total
    picked = got.unsqueeze(1)
    before = cdf.gather(1, picked).squeeze(1) - p.gather(1, picked).squeeze(1)
    after = cdf.gather(1, picked).squeeze(1)
    band = 1e-5 * total
    random = ~greedy
    assert (p.gather(1, picked).squeeze(1)[random] > 0).all()  # never a masked token
    assert (before[random] <= target[random] + band[random]).all()
    assert (target[random] < after[random] + band[random]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [70, 96, 130])  # a partial last word; exact; past the mask
def test_apply_token_bitmask_matches_bit_by_bit_reference(dtype, vocab):
    g = torch.Generator().manual_seed(vocab)
    words = min(-(-vocab // 32), 3)  # 130 tokens, 3 words: ids 96.. are outside the mask
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), generator=g, dtype=torch.int32)
    bitmask[0] = -1  # everything allowed
    bitmask[1] = 0  # nothing allowed
    logits = torch.randn(5, vocab, generator=g).to(dtype)
    rows = torch.tensor([4, 0, 2])

    def reference(x, masks, which):
        x = x.clone()
        for mask, r in zip(masks.tolist(), which):
            for t in range(vocab):
                if t >= 32 * len(mask) or not (mask[t // 32] >> (t % 32)) & 1:
                    x[r, t] = float("-inf")
        return x

    got = logits.clone()
    ops.apply_token_bitmask(got, bitmask, rows)
    torch.testing.assert_close(got, reference(logits, bitmask, rows.tolist()), atol=0, rtol=0)
    every = logits[:3].clone()
    ops.apply_token_bitmask(every, bitmask, torch.empty(0, dtype=torch.int64))
    torch.testing.assert_close(every, reference(logits[:3], bitmask, [0, 1, 2]), atol=0, rtol=0)
    # the PyTorch path computes the same thing
    from tokenmill.sample.sampler import apply_token_bitmask_

    same = logits.clone()
    apply_token_bitmask_(same, bitmask, rows)
    torch.testing.assert_close(same, got, atol=0, rtol=0)


def test_kernel_build_cache_clears_only_stale_locks(tmp_path, monkeypatch):
    """A build killed half-way leaves torch's lock behind; later processes must not hang on it
    (an old lock is removed), while a fresh one (a build in progress) is left alone."""
    import os
    import time

    from tokenmill.kernels import cpu_ops

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    build_dir = cpu_ops.build_directory("avx2")
    assert build_dir.is_relative_to(tmp_path)
    lock = build_dir / "lock"
    build_dir.mkdir(parents=True)
    lock.touch()
    sources = cpu_ops._prepare(build_dir, "avx2")
    assert lock.exists()  # fresh: another process may be compiling
    assert all(os.path.isfile(s) and s.startswith(str(build_dir)) for s in sources)
    old = time.time() - cpu_ops.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    cpu_ops._prepare(build_dir, "avx2")
    assert not lock.exists()


def test_levels_this_cpu_lacks_still_compile():
    """Each kernel level this CPU cannot run passes the compiler's front end (every template
    instantiated) with that level's flags, as the build would compile it: AVX-512 and AMX code
    is then checked on an AVX2-only machine, where nothing else compiles it. (Levels the CPU
    has are built for real by the other tests.)"""
    csrc = Path(cpu_ops.__file__).parent / "csrc"
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    # the sources with code per level (bindings.cpp and decode_stack.cpp have none)
    sources = [
        "cpu_ops.cpp",
        "quant_gemm.cpp",
        "gguf_repack.cpp",
        "prefill_attention.cpp",
        "dense_gemm.cpp",
    ]
    lacking = [isa for isa in cpu_isa.ISA_FLAGS if isa not in cpu_isa.supported_isas()]
    for isa in lacking:
        cmd = [os.environ.get("CXX", "c++"), "-std=c++20", "-fsyntax-only", "-w"]
        cmd += [*cpu_ops.compile_flags(isa), *includes]
        runs = {
            src: subprocess.Popen([*cmd, str(csrc / src)], stderr=subprocess.PIPE, text=True)
            for src in sources
        }
        for src, proc in runs.items():
            err = proc.communicate()[1]
            assert proc.returncode == 0, f"{isa} {src}:\n{err[-3000:]}"
