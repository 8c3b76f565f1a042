"""Triton kernels under TRITON_INTERPRET=1 (set in conftest.py without CUDA) against torch
references, in float32 and float16 (the interpreter mishandles bfloat16; bf16 is checked on the
device by benchmarks/gpu_bench.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tokenmill.kernels import triton_attention as ta
from tokenmill.kernels import triton_ops as tk
from tokenmill.kernels import triton_skinny as ts
from tokenmill.layers.rotary import RotaryEmbedding, apply_rotary

DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


def _paged_batch(
    query_lens, seq_lens, num_kv_heads, head_dim, block_size, dtype, seed=0, pad_reqs=0
):
    """Random q, a paged cache holding every request's context (blocks shuffled), and the flat
    metadata; `pad_reqs` extra requests with no queries and seq_len 0 (graph padding rows)."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    k_cache = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    max_blocks = max(-(-s // block_size) for s in seq_lens)
    tables, used = [], 0
    for s in seq_lens:
        n = -(-s // block_size)
        tables.append(perm[used : used + n] + [0] * (max_blocks - n))
        used += n
    tables += [[0] * max_blocks] * pad_reqs
    qsl = [0]
    for q in list(query_lens) + [0] * pad_reqs:
        qsl.append(qsl[-1] + q)
    meta = dict(
        block_tables=torch.tensor(tables, dtype=torch.int32),
        seq_lens=torch.tensor(list(seq_lens) + [0] * pad_reqs, dtype=torch.int32),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        max_query_len=max(query_lens),
        block_size=block_size,
    )
    return k_cache, v_cache, tables, meta


def _reference_attention(q, k_cache, v_cache, tables, query_lens, seq_lens, block_size, scale):
    """Per request: gather its context by the block table, causal SDPA in float64, GQA by
    repeating KV heads."""
    outs, start = [], 0
    rep = q.shape[1] // k_cache.shape[1]
    for r, (ql, sl) in enumerate(zip(query_lens, seq_lens)):
        pos = torch.arange(sl)
        slots = torch.tensor(tables[r])[pos // block_size] * block_size + pos % block_size
        k = k_cache[slots].double().repeat_interleave(rep, dim=1).transpose(0, 1)
        v = v_cache[slots].double().repeat_interleave(rep, dim=1).transpose(0, 1)
        qr = q[start : start + ql].double().transpose(0, 1)
        mask = pos[None, :] <= (sl - ql + torch.arange(ql))[:, None]
        outs.append(
            F.scaled_dot_product_attention(qr, k, v, attn_mask=mask, scale=scale).transpose(0, 1)
        )
        start += ql
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_paged_attention_mixed_batch(dtype, gqa, head_dim):
    """Decodes and prefill chunks (with and without cached context) in one launch; contexts
    end on, before and after block boundaries; split-KV gives the unsplit result."""
    block_size, num_kv_heads = 16, 2
    query_lens = [1, 1, 1, 5, 16, 21]
    seq_lens = [1, 16, 37, 5, 48, 50]  # 5: a whole prompt; 48: 32 cached + 16 new
    k_cache, v_cache, tables, meta = _paged_batch(
        query_lens, seq_lens, num_kv_heads, head_dim, block_size, dtype, seed=gqa + head_dim
    )
    q = torch.randn(sum(query_lens), num_kv_heads * gqa, head_dim).to(dtype)
    scale = head_dim**-0.5
    ref = _reference_attention(q, k_cache, v_cache, tables, query_lens, seq_lens, block_size, scale)
    out = ta.paged_attention(q, k_cache, v_cache, scale=scale, **meta)
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    split = ta.paged_attention(q, k_cache, v_cache, scale=scale, num_splits=4, **meta)
    torch.testing.assert_close(split.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_attention_decode_with_padding_rows_and_splits(dtype):
    """A padded decode batch (as CUDA graphs run it): rows past the real requests have no
    queries, touch nothing and come back as zeros; every split count agrees."""
    block_size, head_dim, num_kv_heads, gqa = 16, 64, 2, 4
    seq_lens = [3, 17, 64, 100]
    k_cache, v_cache, tables, meta = _paged_batch(
        [1] * 4, seq_lens, num_kv_heads, head_dim, block_size, dtype, pad_reqs=4
    )
    q = torch.randn(8, num_kv_heads * gqa, head_dim).to(dtype)
    meta["query_start_loc"] = torch.tensor([0, 1, 2, 3, 4, 4, 4, 4, 4], dtype=torch.int32)
    ref = _reference_attention(q, k_cache, v_cache, tables, [1] * 4, seq_lens, block_size, 0.125)
    for splits in (1, 2, 8):
        out = ta.paged_attention(q, k_cache, v_cache, scale=0.125, num_splits=splits, **meta)
        torch.testing.assert_close(out[:4].double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
        assert torch.all(out[4:] == 0.0), "padding rows must be zeros"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_kv_skips_padding_slots(dtype):
    k = torch.randn(5, 2, 64).to(dtype)
    v = torch.randn(5, 2, 64).to(dtype)
    k_cache = torch.zeros(32, 2, 64, dtype=dtype)
    v_cache = torch.zeros(32, 2, 64, dtype=dtype)
    slots = torch.tensor([3, 17, -1, 0, 31], dtype=torch.int64)
    tk.write_kv(k, v, k_cache, v_cache, slots)
    ref_k, ref_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    keep = slots >= 0
    ref_k[slots[keep]] = k[keep]
    ref_v[slots[keep]] = v[keep]
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_kv_cache_of_another_dtype_is_converted_on_write_and_read():
    """A float16 KV cache beside float32 activations (--kv-cache-dtype float16): write_kv and
    rope_write_kv store rows rounded as torch rounds them (padding slots write nowhere), and
    attention reads the float16 rows into float32 math: the float64 reference over the same
    rows, with the query as the kernel multiplies it (in the cache's dtype), mixed batch and
    split-KV."""
    from tokenmill.layers.ops import Rope, TorchOps

    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(5, 2, 64, generator=g), torch.randn(5, 2, 64, generator=g)
    k_cache, v_cache = (torch.zeros(32, 2, 64, dtype=torch.float16) for _ in range(2))
    slots = torch.tensor([3, 17, -1, 0, 31])
    tk.write_kv(k, v, k_cache, v_cache, slots)
    keep = slots >= 0
    ref_k, ref_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    ref_k[slots[keep]], ref_v[slots[keep]] = k[keep].half(), v[keep].half()
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)

    rot = RotaryEmbedding(32, 512, 10000.0)  # partial rotary: channels 32..63 copied
    q = torch.randn(5, 8, 64, generator=g)
    pos = torch.tensor([0, 3, 17, 200, 9])
    ref_k, ref_v = (torch.zeros(33, 2, 64, dtype=torch.float16) for _ in range(2))
    q_ref = TorchOps().rope_write_kv(
        q.clone(), k.clone(), v.clone(), Rope(pos, rot, None), ref_k, ref_v, slots.where(keep, 32)
    )
    caches = [torch.zeros(32, 2, 64, dtype=torch.float16) for _ in range(2)]
    got = tk.rope_write_kv(q, k, v, *caches, pos, slots, rot.cos_cached, rot.sin_cached)
    torch.testing.assert_close(got, q_ref, atol=TOL[torch.float32], rtol=TOL[torch.float32])
    # rotated in float32 in both, then rounded to float16: at most one float16 ulp apart
    torch.testing.assert_close(caches[0], ref_k[:32], atol=1e-3, rtol=1e-3)
    assert torch.equal(caches[1], ref_v[:32])

    block_size, query_lens, seq_lens = 16, [1, 1, 5, 21], [16, 37, 5, 50]
    k_cache, v_cache, tables, meta = _paged_batch(
        query_lens, seq_lens, 2, 64, block_size, torch.float16, seed=4
    )
    q = torch.randn(sum(query_lens), 8, 64, generator=g)
    ref = _reference_attention(
        q.half(), k_cache, v_cache, tables, query_lens, seq_lens, block_size, 0.125
    )
    for splits in (1, 4):
        out = ta.paged_attention(q, k_cache, v_cache, scale=0.125, num_splits=splits, **meta)
        assert out.dtype == torch.float32
        tol = TOL[torch.float16]  # the probabilities multiply V in float16
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm(dtype, with_delta):
    res = torch.randn(7, 96).to(dtype)
    delta = torch.randn(7, 96).to(dtype) if with_delta else None
    w = torch.randn(96).to(dtype)
    expected_res = res + delta if with_delta else res.clone()
    expected = F.rms_norm(expected_res.float(), (96,), w.float(), 1e-6).to(dtype)
    out_res, out = tk.add_rms_norm(res.clone(), delta, w, 1e-6)
    assert torch.equal(out_res, expected_res)
    torch.testing.assert_close(out, expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_rotary_inplace_matches_reference(dtype, rotary_dim):
    rot = RotaryEmbedding(rotary_dim, 256, 10000.0)
    x = torch.randn(6, 5, 64).to(dtype)  # heads of a fused qkv row: a strided view
    pos = torch.tensor([0, 1, 7, 100, 255, 3])
    expected = apply_rotary(x.float(), *rot.cos_sin(pos, torch.float32)).to(dtype)
    fused = torch.cat([x.reshape(6, -1), torch.zeros(6, 8, dtype=dtype)], dim=1)
    view = fused[:, :320].view(6, 5, 64)
    tk.rotary_inplace(view, pos, rot.cos_cached, rot.sin_cached)
    torch.testing.assert_close(view, expected, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.all(fused[:, 320:] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,rotary_dim",
    [(4, 4, 64, 64), (8, 2, 128, 128), (8, 1, 64, 32)],
    ids=["mha", "gqa4", "gqa8-partial-rotary"],
)
def test_rope_write_kv_matches_rotary_then_write_kv(dtype, heads, kv_heads, head_dim, rotary_dim):
    """The fused launch against the reference's two steps (apply_rotary on q and k, then the
    cache rows by index): q, k, v are views of one fused qkv row, a padding row (slot -1)
    writes nowhere, channels past a partial rotary_dim are copied as they are."""
    from tokenmill.layers.ops import Rope, TorchOps

    n, width = 6, (heads + 2 * kv_heads) * head_dim
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    qkv = torch.randn(n, width + 16, generator=g).to(dtype)[:, :width]  # rows width + 16 apart
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    q, k, v = (t.view(n, -1, head_dim) for t in (q, k, v))
    rot = RotaryEmbedding(rotary_dim, 512, 10000.0)
    pos = torch.tensor([0, 3, 17, 200, 511, 9])
    slots = torch.tensor([5, 0, 31, -1, 12, 20])
    rope = Rope(pos, rot, None)
    # the reference has one more slot, where the padding row goes
    ref_k, ref_v = (torch.zeros(33, kv_heads, head_dim, dtype=dtype) for _ in range(2))
    q_ref = TorchOps().rope_write_kv(
        q.clone(), k.clone(), v.clone(), rope, ref_k, ref_v, slots.where(slots >= 0, 32)
    )
    caches = [torch.zeros(32, kv_heads, head_dim, dtype=dtype) for _ in range(2)]
    k_before = k.clone()
    got = tk.rope_write_kv(q, k, v, *caches, pos, slots, rot.cos_cached, rot.sin_cached)
    assert got.data_ptr() == q.data_ptr(), "q is rotated in place"
    torch.testing.assert_close(got, q_ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(caches[0], ref_k[:32], atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(caches[1], ref_v[:32])
    assert torch.equal(k, k_before), "k itself is left as it was"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul(dtype):
    x = torch.randn(3, 2 * 1100).to(dtype)  # 1100: two column blocks, the second partial
    gate, up = x.float().chunk(2, dim=-1)
    expected = (F.silu(gate) * up).to(dtype)
    torch.testing.assert_close(tk.silu_and_mul(x), expected, atol=TOL[dtype], rtol=TOL[dtype])


def test_reference_attention_is_a_real_reference():
    """The test's reference itself against a dense causal computation (one request, no
    paging), so a shared mistake cannot pass both."""
    q = torch.randn(4, 2, 8, dtype=torch.float64)
    k = torch.randn(4, 1, 8, dtype=torch.float64)
    v = torch.randn(4, 1, 8, dtype=torch.float64)
    out = _reference_attention(q, k, v, [[0]], [4], [4], 16, 0.5)
    s = torch.einsum("qhd,kd->hqk", q, k[:, 0]) * 0.5
    s = s.masked_fill(torch.triu(torch.ones(4, 4, dtype=torch.bool), 1), -math.inf)
    dense = torch.einsum("hqk,kd->qhd", s.softmax(-1), v[:, 0])
    torch.testing.assert_close(out, dense)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_argmax_rows_picks_the_first_maximum_across_chunks(dtype):
    """Against torch.argmax (the first index on ties): rows whose maximum sits in the last,
    partial chunk, is tied within a chunk, or is tied across chunks; a vocabulary that is not
    a multiple of the chunk."""
    g = torch.Generator().manual_seed(3)
    vocab, block = 1000, 128
    x = torch.randn(6, vocab, generator=g).to(dtype)
    x[1, 997] = 50.0  # the last, partial chunk
    x[2, [300, 310]] = 40.0  # a tie within a chunk
    x[3, [900, 5, 600]] = 40.0  # a tie across chunks: index 5 wins
    x[4] = 1.0  # all equal: index 0
    x[5, 0] = 30.0
    got = tk.argmax_rows(x, block=block)
    assert got.dtype == torch.int64
    assert got.tolist() == x.argmax(dim=-1).tolist()
    assert got.tolist()[1:5] == [997, 300, 5, 0]
    # one chunk, and a strided row view (a slice of a wider logits buffer)
    assert tk.argmax_rows(x[:, :100], block=block).tolist() == x[:, :100].argmax(-1).tolist()


# small-tile launch configurations of the two kinds of skinny GEMM (tl.dot, and the one-row GEMV)
DOT = ts.SkinnyConfig(16, 128, 4, 2)
GEMV = ts.SkinnyConfig(8, 128, 4, 2, dot=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "m,n,k,config",
    [
        (1, 48, 512, DOT),
        (1, 48, 512, GEMV),
        (1, 41, 300, GEMV),
        (5, 40, 300, DOT),
        (16, 33, 64, DOT),
        (3, 16, 8, DOT),
        (1, 16, 8, GEMV),
    ],
    ids=[
        "batch1",
        "batch1-gemv",
        "ragged-n-k-gemv",
        "ragged-n-k",
        "full-tile",
        "k-below-16",
        "k-below-16-gemv",
    ],
)
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_skinny_linear(dtype, m, n, k, config, bias):
    """Against a float64 matmul: row counts up to the tile's 16 (one for the GEMV), N not a
    multiple of BLOCK_N, K not a multiple of BLOCK_K (the masked loop) and below tl.dot's 16, x
    a strided view."""
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, k + 7, generator=g).to(dtype)[:, 3 : 3 + k]  # rows k + 7 apart
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    y = ts.skinny_linear(x, w, b, config=config)
    ref = x.double() @ w.double().T + (b.double() if bias else 0.0)
    assert y.dtype == dtype and y.shape == (m, n)
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref, atol=TOL[dtype] * scale, rtol=TOL[dtype])


def test_skinny_gemv_takes_one_row_and_is_the_one_row_default():
    """A GEMV configuration refuses two rows; without a configuration one row runs the GEMV
    (SKINNY_GEMV_CONFIG: the same values as passing it) and more rows the tl.dot kernel."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 96, generator=g)
    with pytest.raises(AssertionError, match="one row"):
        ts.skinny_linear(torch.randn(2, 96, generator=g), w, None, config=GEMV)
    x = torch.randn(1, 96, generator=g)
    assert not ts.SKINNY_GEMV_CONFIG.dot and ts.SKINNY_CONFIG.dot
    assert torch.equal(ts.skinny_linear(x, w), ts.skinny_linear(x, w, config=ts.SKINNY_GEMV_CONFIG))
    x3 = torch.randn(3, 96, generator=g)
    assert torch.equal(ts.skinny_linear(x3, w), ts.skinny_linear(x3, w, config=ts.SKINNY_CONFIG))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "m,n,k,config",
    [(1, 48, 512, DOT), (1, 48, 512, GEMV), (6, 40, 300, DOT)],
    ids=["batch1", "batch1-gemv", "ragged"],
)
def test_skinny_glu_linear_is_silu_and_mul_then_the_gemm(dtype, m, n, k, config):
    """One launch against the two it replaces (the same rounding of silu(gate) * up), and the
    pair against float64."""
    g = torch.Generator().manual_seed(m)
    gate_up = (torch.randn(m, 2 * k, generator=g) * 3).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    y = ts.skinny_glu_linear(gate_up, w, b, config=config)
    two = ts.skinny_linear(tk.silu_and_mul(gate_up), w, b, config=config)
    torch.testing.assert_close(y, two, atol=0, rtol=0)
    gate, up = gate_up.double().chunk(2, dim=-1)
    ref = (F.silu(gate) * up) @ w.double().T + b.double()
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref, atol=4 * TOL[dtype] * scale, rtol=4 * TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "m,n,k,config",
    [(1, 48, 512, DOT), (1, 48, 512, GEMV), (7, 40, 300, DOT)],
    ids=["batch1", "batch1-gemv", "ragged"],
)
@pytest.mark.parametrize("with_delta", [True, False], ids=["add", "norm-only"])
def test_skinny_add_norm_linear_is_add_rms_norm_then_the_gemm(dtype, m, n, k, config, with_delta):
    """Against float64 add + RMSNorm + matmul: the new residual stream (exactly residual +
    delta, rounded to the dtype, as add_rms_norm writes it; the input itself when there is no
    delta) and the product, with the tolerance of the dtype's rounding of the normed row."""
    g = torch.Generator().manual_seed(m * 10 + with_delta)
    residual = (torch.randn(m, k, generator=g) * 4).to(dtype)
    delta = torch.randn(m, k, generator=g).to(dtype) if with_delta else None
    norm_w = (1 + 0.1 * torch.randn(k, generator=g)).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    before = residual.clone()
    r, y = ts.skinny_add_norm_linear(residual, delta, norm_w, 1e-5, w, b, config=config)
    expected_r = (residual.float() + delta.float()).to(dtype) if with_delta else residual
    assert torch.equal(r, expected_r)
    assert torch.equal(residual, before), "the input residual is left as it was"
    rd = r.double()
    h = rd * torch.rsqrt(rd.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w.double()
    ref = h @ w.double().T + b.double()
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref, atol=4 * TOL[dtype] * scale, rtol=4 * TOL[dtype])


def test_dense_linear_takes_the_small_batch_kernel_up_to_its_rows():
    """The dense method runs `SkinnyLinear` for inputs of up to 16 rows and the library GEMM
    above (the same values either way), and never for a weight the kernel does not take."""
    from tokenmill.layers.linear import Linear
    from tokenmill.quant.dense import DenseConfig

    calls = []

    class Counting(ts.SkinnyLinear):
        max_weight_bytes = 64 * 96 * 4  # a bigger weight goes to F.linear

        def __call__(self, x, w, bias):
            calls.append(x.shape[0])
            return super().__call__(x, w, bias)

    quant = DenseConfig(Counting())
    small = Linear(96, {"a": 40, "b": 24}, bias=True, quant_method=quant.linear_method({}, 96, {}))
    big = Linear(96, 65, quant_method=quant.linear_method({}, 96, {}))
    g = torch.Generator().manual_seed(0)
    for layer in (small, big):
        layer.weight.data.copy_(torch.randn(layer.weight.shape, generator=g))
        layer.quant_method.process_weights_after_loading(layer)
    small.bias.data.copy_(torch.randn(64, generator=g))
    for m in (1, 7, 16, 17):
        x = torch.randn(m, 96, generator=g)
        torch.testing.assert_close(small(x), F.linear(x, small.weight, small.bias))
        torch.testing.assert_close(big(x), F.linear(x, big.weight))
    assert calls == [1, 7, 16]


def test_linear_fused_entry_points_take_the_small_batch_kernel_or_the_unfused_ops():
    """`Linear.forward_glu` / `forward_add_norm` give the unfused ops' values through the
    skinny kernels (up to 16 rows) and through the ops (17 rows, a weight over the kernel's
    size, a method without fused kernels)."""
    from tokenmill.layers.linear import Linear
    from tokenmill.layers.norm import RMSNorm
    from tokenmill.layers.ops import TorchOps
    from tokenmill.quant.dense import DenseConfig

    fused = DenseConfig(ts.SkinnyLinear())
    g = torch.Generator().manual_seed(0)
    down = Linear(64, 24, bias=True, quant_method=fused.linear_method({}, 64, {}))
    qkv = Linear(96, 40, quant_method=fused.linear_method({}, 96, {}))
    plain = Linear(96, 40)  # no small-batch kernel: the unfused path
    for layer in (down, qkv, plain):
        layer.weight.data.copy_(torch.randn(layer.weight.shape, generator=g))
        layer.quant_method.process_weights_after_loading(layer)
    down.bias.data.copy_(torch.randn(24, generator=g))
    plain.weight.data.copy_(qkv.weight)
    norm = RMSNorm(96, 1e-5)
    norm.weight.data.copy_(1 + 0.1 * torch.randn(96, generator=g))
    ops = TorchOps()
    for m in (1, 16, 17):
        gu = torch.randn(m, 128, generator=g)
        expected = F.linear(ops.silu_and_mul(gu), down.weight, down.bias)
        torch.testing.assert_close(down.forward_glu(gu, ops.silu_and_mul), expected)
        res, delta = torch.randn(m, 96, generator=g), torch.randn(m, 96, generator=g)
        exp_r, h = ops.add_rms_norm(res, delta, norm.weight, 1e-5)
        for layer in (qkv, plain):
            r, y = layer.forward_add_norm(res.clone(), delta, norm)
            torch.testing.assert_close(r, exp_r)
            torch.testing.assert_close(y, F.linear(h, qkv.weight), atol=1e-4, rtol=1e-4)
