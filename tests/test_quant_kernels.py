"""Native GGUF kernels, every type and every kernel level this CPU supports, against a float64
matmul over `gguf.quants.dequantize`d weights and the identically quantized activations.

A level the CPU has must build (TOKENMILL_REQUIRE_CPU_KERNELS=1 in CI turns a build failure
into an error, never a skip); levels the CPU lacks are reported as skipped.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from tests.gguf_builder import ALL_TYPES, K_TYPES, LATTICE_TYPES, random_blocks, set_block_d
from tokenmill.kernels import cpu_isa, cpu_ops
from tokenmill.quant import gguf_fields as gf
from tokenmill.quant import gguf_pack as gp

LEVELS = ("avx2", "avxvnni", "avx512", "amx")


@pytest.fixture(scope="module", params=LEVELS)
def ops(request):
    if request.param not in cpu_isa.supported_isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    module = cpu_ops.load_ops(request.param)
    assert module is not None, f"the {request.param} kernels did not build"
    assert module.quant_isa() == request.param  # (amx: where the kernel may use the tiles)
    return module


def _reference_activations(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest-even int8 blocks of 32, d = max|x| * float32(1 / 127) (numpy, float32)."""
    b = x.numpy().astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(b).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(b * inv).astype(np.int8)
    return q.reshape(x.shape), (amax * np.float32(1 / 127)).astype(np.float32)[..., 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_quantization_matches_reference(ops, dtype):
    x = (torch.randn(5, 256) * torch.logspace(-3, 2, 256)).to(dtype)
    x[1] = 0  # all-zero blocks: d = 0, q = 0
    q, meta = ops.quantize_activations(x)
    q_ref, d_ref = _reference_activations(x.float())
    assert np.array_equal(q.numpy(), q_ref)
    assert np.array_equal(meta[..., 0].numpy(), d_ref)
    sums = q.reshape(5, -1, 2, 16).sum(-1, dtype=torch.int32).float()  # per 16-half
    assert torch.equal(meta[..., 2], meta[..., 0] * sums[..., 0])
    assert torch.equal(meta[..., 3], meta[..., 0] * sums[..., 1])
    assert torch.equal(meta[..., 1], meta[..., 0] * sums.sum(-1))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("extreme", [False, True], ids=["random", "extreme"])
def test_packing_round_trips(qtype, extreme):
    n, k = 40, 512  # 40 rows: the last tile is padded
    raw = random_blocks(qtype, n, k, np.random.default_rng(int(qtype)), extreme=extreme)
    fields = gf.parse(raw, int(qtype), n, k)
    w = gf.dequantize_fields(fields, int(qtype), n, k).numpy()
    assert np.array_equal(w, dequantize(raw, qtype).reshape(n, k))  # parsing loses nothing
    packed = gp.pack(fields, int(qtype), n, k)
    assert packed.numel() == gp.packed_bytes(int(qtype), n, k)
    back = gp.unpack(packed, int(qtype), n, k)
    assert fields.keys() == back.keys()
    for key in fields:
        assert torch.equal(fields[key].reshape(back[key].shape), back[key]), key


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("extreme", [False, True], ids=["random", "extreme"])
def test_cpp_repack_equals_reference_packing(ops, qtype, extreme):
    """The load path's one-pass C++ repacking writes exactly what `gguf_pack.pack` (the
    documented layout, round-tripped above) writes, padding rows included."""
    for n, k in ((40, 512), (16, 256), (3, 768)):
        raw = random_blocks(qtype, n, k, np.random.default_rng(n + int(qtype)), extreme=extreme)
        expected = gp.pack(gf.parse(raw, int(qtype), n, k), int(qtype), n, k)
        flat = torch.from_numpy(np.ascontiguousarray(raw).reshape(-1).view(np.uint8))
        packed = ops.gguf_repack(flat, int(qtype), n, k, gf.grid_levels(int(qtype)))
        assert torch.equal(packed, expected), (n, k)


def test_cpp_repack_rejects_bad_shapes(ops):
    raw = torch.zeros(18 * 8, dtype=torch.uint8)  # 8 Q4_0 blocks
    with pytest.raises(RuntimeError, match="contiguous bytes"):
        ops.gguf_repack(raw, int(QT.Q4_0), 3, 64)  # 3 rows x 2 blocks = 6 blocks, not 8
    with pytest.raises(RuntimeError, match="not a multiple of 256"):
        ops.gguf_repack(raw, int(QT.Q4_K), 1, 320)
    with pytest.raises(RuntimeError, match="no kernel layout"):
        ops.gguf_repack(raw, int(QT.TQ1_0), 1, 256)
    lattice = torch.zeros(98, dtype=torch.uint8)  # one IQ3_XXS block
    with pytest.raises(RuntimeError, match="needs its grid"):
        ops.gguf_repack(lattice, int(QT.IQ3_XXS), 1, 256)
    with pytest.raises(RuntimeError, match="needs its grid"):  # another type's grid
        ops.gguf_repack(lattice, int(QT.IQ3_XXS), 1, 256, gf.grid_levels(int(QT.IQ3_S)))


def _run(ops, raw, qtype, n, k, x, bias=None, out_dtype=None):
    packed = gp.pack(gf.parse(raw, int(qtype), n, k), int(qtype), n, k)
    xq, meta = ops.quantize_activations(x)
    y = torch.full((x.shape[0], n + 8), 7.0, dtype=out_dtype or x.dtype)
    b = None
    if bias is not None:
        b = torch.cat([bias, bias.new_zeros(gp.padded_rows(n) - n)])
    ops.quant_gemm(xq, meta, packed, int(qtype), n, y, 3, b)
    assert torch.all(y[:, :3] == 7) and torch.all(y[:, 3 + n :] == 7)  # writes only its columns
    return y[:, 3 : 3 + n], xq, meta


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_gemm_matches_dequantized_matmul(ops, qtype):
    """M = 1..70 (register-streaming in one or several passes, streamed-batch, AMX where
    present, and buffered paths),
    an odd number of rows (73: the last of 5 tiles holds 9), with and without bias, random and
    extreme blocks."""
    rng = np.random.default_rng(100 + int(qtype))
    n, k = 73, 512
    for extreme in (False, True):
        raw = random_blocks(qtype, n, k, rng, extreme=extreme)
        w = torch.from_numpy(dequantize(raw, qtype).reshape(n, k)).double()
        for m in (1, 2, 3, 4, 5, 8, 12, 16, 17, 33, 64, 70):
            x = torch.randn(m, k)
            bias = torch.randn(n) if m % 2 else None
            y, xq, meta = _run(ops, raw, qtype, n, k, x, bias)
            xd = (xq.double().reshape(m, -1, 32) * meta[..., :1].double()).reshape(m, k)
            ref = xd @ w.T + (bias.double() if bias is not None else 0)
            scale = ref.abs().max().clamp_min(1e-30)
            err = ((y.double() - ref).abs().max() / scale).item()
            assert err < 1e-5, f"{qtype.name} M={m} extreme={extreme}: relative error {err:.2e}"


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_prefill_batches_write_whole_lines_alike(ops, qtype, out_dtype):
    """Batches of several passes (65+ tokens) write an output whose rows are whole aligned
    64-byte lines with streaming stores (AVX-512): the same bits as the ordinary stores, which
    an unaligned output (column 1) takes, and the dequantized matmul's values. At 130 tokens the
    2048 inputs' prepared activations (448 KiB) exceed the group applied to every tile at a time
    (256 KiB), so the tiles take the tokens in three groups of one pass each."""
    rng = np.random.default_rng(500 + int(qtype))
    n, k = 64, 2048
    raw = random_blocks(qtype, n, k, rng)
    packed = gp.pack(gf.parse(raw, int(qtype), n, k), int(qtype), n, k)
    w = torch.from_numpy(dequantize(raw, qtype).reshape(n, k)).double()
    for m in (65, 130):
        xq, meta = ops.quantize_activations(torch.randn(m, k))
        lines = torch.full((m, n), 7.0, dtype=out_dtype)
        shifted = torch.full((m, n + 1), 7.0, dtype=out_dtype)
        ops.quant_gemm(xq, meta, packed, int(qtype), n, lines, 0, None)
        ops.quant_gemm(xq, meta, packed, int(qtype), n, shifted, 1, None)
        assert torch.equal(lines, shifted[:, 1:]), f"{qtype.name} M={m}"
        xd = (xq.double().reshape(m, -1, 32) * meta[..., :1].double()).reshape(m, k)
        ref = (xd @ w.T).to(out_dtype).double()
        err = ((lines.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < (1e-5 if out_dtype == torch.float32 else 1e-2), f"{qtype.name} M={m}"


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_do_not_depend_on_the_batch(ops, qtype, dtype):
    """Every path (streaming up to 4 tokens on AVX-512, 8 or 16 on AVX2; batched beyond, in one
    or several passes) does the same integer sums and float operations per row: a row's output
    is bit-identical whatever batch it is in; on the amx level, below 48 tokens (from there on
    the tiles' arithmetic)."""
    level = ops.quant_isa()
    rng = np.random.default_rng(300 + int(qtype))
    n, k = 40, 512
    raw = random_blocks(qtype, n, k, rng)
    x = torch.randn(47 if level == "amx" else 70, k).to(dtype)
    full, _, _ = _run(ops, raw, qtype, n, k, x)
    for m in (1, 2, 3, 4, 5, 8, 9, 12, 16, 17, 33):
        part, _, _ = _run(ops, raw, qtype, n, k, x[:m].contiguous())
        assert torch.equal(part, full[:m]), f"{qtype.name} M={m}"


# Types whose weights both the avx2 and the avxvnni level keep unsigned (AVX2 multiplies Q8_0 and
# the codebook types' signed values with a sign trick; avxvnni adds 128 and subtracts it in float).
SIGNED_ON_AVX2 = (QT.Q8_0, QT.IQ4_NL, QT.IQ4_XS, *LATTICE_TYPES)
UNSIGNED_ON_AVX2 = [q for q in ALL_TYPES if q not in SIGNED_ON_AVX2]


@pytest.mark.parametrize("qtype", UNSIGNED_ON_AVX2, ids=lambda q: q.name)
def test_avxvnni_level_gives_the_avx2_bits(qtype):
    """The avxvnni level adds each 4-byte product group into int32 sums with `vpdpbusd` where
    the avx2 level adds `maddubs` pairs in int16 runs: both sums are exact, and the float
    operations after them are the same, so every output must be bit-identical, on every path
    (streaming, batched, several passes), float32 and bfloat16. (avxvnni batches the super-block
    types from 5 tokens on, where avx2 streams up to 8 or 16: the same bits, as every path gives,
    test_rows_do_not_depend_on_the_batch.)"""
    levels = cpu_isa.supported_isas()
    if "avxvnni" not in levels:
        pytest.skip("this CPU cannot run the avxvnni kernels")
    vnni, avx2 = cpu_ops.load_ops("avxvnni"), cpu_ops.load_ops("avx2")
    assert vnni.quant_isa() == "avxvnni" and avx2.quant_isa() == "avx2"
    rng = np.random.default_rng(900 + int(qtype))
    n, k = 40, 512
    for extreme in (False, True):
        raw = random_blocks(qtype, n, k, rng, extreme=extreme)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(70, k).to(dtype)
            for m in (1, 2, 3, 4, 5, 9, 17, 33, 70):
                a, _, _ = _run(vnni, raw, qtype, n, k, x[:m].contiguous())
                b, _, _ = _run(avx2, raw, qtype, n, k, x[:m].contiguous())
                assert torch.equal(a, b), f"{qtype.name} M={m} {dtype} extreme={extreme}"


# The bytes of a lattice block that hold its 4-bit (IQ1: 3-bit) scales, and the mask that
# clears them: IQ1_S bits 12-14 of each uint16 qh, IQ2_XXS / IQ3_XXS the top nibble of every
# scale word, IQ1_M / IQ2_XS / IQ2_S / IQ3_S their bytes of scales.
_LATTICE_SCALE_BITS = {
    QT.IQ1_S: (slice(35, 50, 2), 0x8F),
    QT.IQ1_M: (slice(48, 56), 0),  # d is set after
    QT.IQ2_XXS: (slice(9, 66, 8), 0x0F),
    QT.IQ3_XXS: (slice(69, 98, 4), 0x0F),
    QT.IQ2_XS: (slice(66, 74), 0),
    QT.IQ2_S: (slice(74, 82), 0),
    QT.IQ3_S: (slice(106, 110), 0),
}


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_integer_block_sums_are_exact(ops, qtype):
    """With scales of 1 and integer activations whose blocks span +-127 (so d = 1 and q = x),
    every float step is exact: the output must equal the integer matmul bit for bit, which
    holds only if each int32 block sum is exact."""
    rng = np.random.default_rng(7)
    n, k, m = 48, 512, 53  # 53: three 16-token groups on the AMX tiles + 5 on VNNI
    raw = random_blocks(qtype, n, k, rng).reshape(n, k // gf.unit_k(int(qtype)), -1)
    one = np.frombuffer(np.float16(1).tobytes(), np.uint8)
    if qtype == QT.Q6_K:
        raw[..., 208:210] = one
        raw[..., 192:208] = rng.integers(-4, 5, size=raw[..., 192:208].shape).astype(np.uint8)
    elif qtype == QT.Q3_K:
        raw[..., 108:110] = one  # its 6-bit scales less 32 are integers already
    elif qtype == QT.IQ4_XS:
        raw[..., 0:2] = one
        raw[..., 2:4] = 0xAA  # every scale's high 2 bits 2: 32 + its low nibble
        raw[..., 4:8] = rng.integers(0, 4, raw[..., 4:8].shape) * 17  # low nibbles 0..3: 0..3
    elif qtype in LATTICE_TYPES:  # d * FACTOR = 1 and every scale's factor 2 s + 1 = 1
        where, keep = _LATTICE_SCALE_BITS[qtype]
        raw[..., where] &= keep
        blocks = raw.reshape(-1, raw.shape[-1])
        set_block_d(blocks, qtype, np.full(len(blocks), 1 / gf.FACTOR[int(qtype)]))
    elif qtype == QT.Q2_K:
        raw[..., 80:82] = one
        raw[..., 82:84] = np.frombuffer(np.float16(-3).tobytes(), np.uint8)
    else:
        raw[..., 0:2] = one
        if qtype in (QT.Q4_1, QT.Q5_1, QT.Q4_K, QT.Q5_K):
            raw[..., 2:4] = np.frombuffer(np.float16(-3).tobytes(), np.uint8)
    raw = raw.reshape(n, -1)
    x = torch.from_numpy(rng.integers(-127, 128, size=(m, k)).astype(np.float32))
    x.view(m, -1, 32)[..., 0] = 127  # every block's max is 127: d = 1 exactly
    y, xq, _ = _run(ops, raw, qtype, n, k, x)
    assert torch.equal(xq.float(), x)
    w = torch.from_numpy(dequantize(raw, qtype).reshape(n, k)).double()
    assert torch.equal(w, w.round())  # integer weights
    assert torch.equal(y.double(), x.double() @ w.T)


@pytest.mark.parametrize("m", [3, 37])
def test_bfloat16_output_is_rounded_float32(ops, m):
    raw = random_blocks(QT.Q4_K, 32, 256, np.random.default_rng(3))
    x = torch.randn(m, 256)
    y32, _, _ = _run(ops, raw, QT.Q4_K, 32, 256, x)
    y16, _, _ = _run(ops, raw, QT.Q4_K, 32, 256, x, out_dtype=torch.bfloat16)
    assert torch.equal(y16, y32.bfloat16())


def test_shape_errors_are_clear(ops):
    raw = random_blocks(QT.Q4_K, 16, 256, np.random.default_rng(0))
    packed = gp.pack(gf.parse(raw, int(QT.Q4_K), 16, 256), int(QT.Q4_K), 16, 256)
    xq, meta = ops.quantize_activations(torch.randn(2, 256))
    with pytest.raises(RuntimeError, match="packed weights do not match"):
        ops.quant_gemm(xq, meta, packed, int(QT.Q4_K), 32, torch.empty(2, 32), 0, None)
    with pytest.raises(RuntimeError, match="unsupported GGUF type"):
        ops.quant_gemm(xq, meta, packed, int(QT.TQ1_0), 16, torch.empty(2, 16), 0, None)


def test_k_types_need_whole_super_blocks():
    assert all(not gp.can_pack(int(q), 16, 288) for q in (*K_TYPES, QT.IQ4_XS))
    assert gp.can_pack(int(QT.Q8_0), 17, 288) and gp.can_pack(int(QT.IQ4_NL), 17, 288)


def test_isa_selection_and_forcing(monkeypatch):
    flags = frozenset({"avx2", "fma", "f16c", "bmi2"})
    assert cpu_isa.select_isa(flags).build == "avx2"
    assert cpu_isa.select_isa(flags | {"avx_vnni"}).build == "avxvnni"  # Alder Lake and later
    assert cpu_isa.select_isa(frozenset()).build is None  # dense path, with a reason
    assert "dequantized" in cpu_isa.select_isa(frozenset()).reason
    monkeypatch.setenv("TOKENMILL_CPU_ISA", "avx512")
    with pytest.raises(ValueError, match="lacks avx512"):
        cpu_isa.select_isa(flags)
    monkeypatch.setenv("TOKENMILL_CPU_ISA", "reference")
    choice = cpu_isa.select_isa(flags)
    assert choice.name == "reference" and not choice.quant
    monkeypatch.setenv("TOKENMILL_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="expected one of"):
        cpu_isa.select_isa(flags)
    assert cpu_ops.build_directory("avx2") != cpu_ops.build_directory("avx512")
    assert cpu_ops.build_directory("avx2") != cpu_ops.build_directory("avxvnni")


def test_weight_prefetch_by_vendor_and_forcing(monkeypatch):
    monkeypatch.delenv("TOKENMILL_CPU_PREFETCH", raising=False)
    assert cpu_isa.weight_prefetch("AuthenticAMD")[:2] == (8192, 0)  # no L2 hint on AMD
    assert cpu_isa.weight_prefetch("GenuineIntel")[:2] == (8192, 32768)
    assert cpu_isa.weight_prefetch("")[:2] == cpu_isa.DEFAULT_WEIGHT_PREFETCH
    monkeypatch.setenv("TOKENMILL_CPU_PREFETCH", "0,4096")
    assert cpu_isa.weight_prefetch("AuthenticAMD") == (0, 4096, "forced by TOKENMILL_CPU_PREFETCH")
    for bad in ("8192", "a,b", "100,0", "-64,0"):
        monkeypatch.setenv("TOKENMILL_CPU_PREFETCH", bad)
        with pytest.raises(ValueError, match="TOKENMILL_CPU_PREFETCH"):
            cpu_isa.weight_prefetch()


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K, QT.Q8_0], ids=lambda q: q.name)
def test_weight_prefetch_changes_no_bit(ops, monkeypatch, qtype):
    """The loaded module runs this CPU's distances; any others (none, L1 only, both, far
    ahead) give the same bits on the streaming and the batched paths."""
    monkeypatch.delenv("TOKENMILL_CPU_PREFETCH", raising=False)
    assert tuple(ops.weight_prefetch()) == cpu_isa.weight_prefetch()[:2]
    rng = np.random.default_rng(7)
    n, k = 73, 1024
    raw = random_blocks(qtype, n, k, rng)
    xs = [torch.randn(m, k) for m in (1, 3, 12, 40)]
    try:
        outs = []
        for l1, l2 in ((0, 0), (8192, 0), (8192, 32768), (64, 1 << 20)):
            ops.set_weight_prefetch(l1, l2)
            outs.append([_run(ops, raw, qtype, n, k, x)[0] for x in xs])
        for other in outs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(outs[0], other, strict=True))
        with pytest.raises(RuntimeError, match="whole 64-byte lines"):
            ops.set_weight_prefetch(100, 0)
    finally:
        ops.set_weight_prefetch(*cpu_isa.weight_prefetch()[:2])


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_row_lookup_equals_gguf_dequantize(ops, qtype):
    """The embedding lookup from packed blocks gives gguf's float32 values exactly."""
    n, k = 40, 512
    raw = random_blocks(qtype, n, k, np.random.default_rng(int(qtype)), extreme=True)
    packed = gp.pack(gf.parse(raw, int(qtype), n, k), int(qtype), n, k)
    ids = torch.tensor([[0, 39, 17], [16, 15, 3]])
    rows = ops.quant_rows(packed, int(qtype), n, k, ids)
    ref = torch.from_numpy(dequantize(raw, qtype).reshape(n, k))[ids.flatten()]
    assert torch.equal(rows, ref)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.quant_rows(packed, int(qtype), n, k, torch.tensor([40]))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_column_lookup_equals_gguf_dequantize(ops, qtype):
    """The exact channels' weight columns from packed blocks are gguf's float32 values."""
    n, k = 40, 512
    raw = random_blocks(qtype, n, k, np.random.default_rng(int(qtype)), extreme=True)
    packed = gp.pack(gf.parse(raw, int(qtype), n, k), int(qtype), n, k)
    channels = [0, 31, 32, 255, 256, 300, 511]  # block and super-block edges
    cols = ops.quant_cols(packed, int(qtype), n, k, channels)
    ref = torch.from_numpy(dequantize(raw, qtype).reshape(n, k))[:, channels].T
    assert torch.equal(cols, ref)
    with pytest.raises(RuntimeError, match="not in"):
        ops.quant_cols(packed, int(qtype), n, k, [512])


def _int8_batches(ops, sizes):
    """The batch sizes of `sizes` a QuantLinear of this level runs with 8-bit activations
    (below bf16_tiles_min_tokens() on AMX, where larger batches take bfloat16 tiles)."""
    limit = ops.bf16_tiles_min_tokens()
    return [m for m in sizes if not limit or m < limit]


def _linear(ops, shards, k):
    """A QuantLinear over `shards` [(qtype, rows, raw blocks)], no bias, and the float64
    dequantized weight of all of them stacked."""
    packed = [gp.pack(gf.parse(raw, int(q), n, k), int(q), n, k) for q, n, raw in shards]
    layer = ops.QuantLinear(
        packed, [int(q) for q, _, _ in shards], [n for _, n, _ in shards], [None] * len(shards), k
    )
    w = torch.cat([torch.from_numpy(dequantize(raw, q).reshape(n, k)) for q, n, raw in shards])
    return layer, w.double()


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_channels_leave_the_rounding(ops, qtype, dtype):
    """A layer with exact channels equals: the other channels rounded as usual (the exact ones
    read as 0, so they no longer set their blocks' scales) times the dequantized weights, plus
    the exact channels times their weight columns. Two shards (the second Q8_0, 9 rows) check
    that each column lands in its output; M spans the streaming and batched paths."""
    rng = np.random.default_rng(500 + int(qtype))
    k, n1, n2 = 512, 40, 9
    shards = [
        (qtype, n1, random_blocks(qtype, n1, k, rng)),
        (QT.Q8_0, n2, random_blocks(QT.Q8_0, n2, k, rng)),
    ]
    layer, w = _linear(ops, shards, k)
    exact = [511, 3, 64, 100]  # unsorted on purpose; 64 and 100 share no block, 3 sits in 0
    layer.set_exact_channels(exact)
    assert layer.exact_channels() == sorted(exact)
    assert layer.exact_bytes() == 4 * len(exact) * (n1 + n2)
    for m in _int8_batches(ops, (1, 3, 17, 50, 70)):
        x = torch.randn(m, k)
        x[:, exact] *= 200  # outliers: they would set their blocks' scales
        x = x.to(dtype)
        y = layer(x)
        assert y.dtype == dtype and y.shape == (m, n1 + n2)
        rest = x.float().clone()
        rest[:, exact] = 0
        q, d = _reference_activations(rest)
        xd = torch.from_numpy(q.reshape(m, -1, 32) * d[..., None]).double().reshape(m, k)
        ref = xd @ w.T + x.double()[:, exact] @ w[:, exact].T
        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < (1e-5 if dtype == torch.float32 else 8e-3), (m, err)
    # the exact channels help: against the float64 product, error shrinks with them
    x = torch.randn(8, k)
    x[:, exact] *= 200
    exact_err = (layer(x).double() - x.double() @ w.T).abs().max()
    layer.set_exact_channels([])
    assert layer.exact_channels() == [] and layer.exact_bytes() == 0
    rounded_err = (layer(x).double() - x.double() @ w.T).abs().max()
    assert exact_err < rounded_err / 4, (exact_err, rounded_err)


def test_exact_channel_errors_and_calibration_record(ops):
    k, n = 256, 16
    layer, _ = _linear(
        ops, [(QT.Q8_0, n, random_blocks(QT.Q8_0, n, k, np.random.default_rng(1)))], k
    )
    with pytest.raises(RuntimeError, match="distinct"):
        layer.set_exact_channels([5, 5])
    with pytest.raises(RuntimeError, match="not in"):
        layer.set_exact_channels([256])
    with pytest.raises(RuntimeError, match="at most 16"):
        layer.set_exact_channels(list(range(17)))
    with pytest.raises(RuntimeError, match="observe_inputs"):
        layer.observed_absmax()
    layer.observe_inputs(True)
    a, b = torch.randn(3, k), torch.randn(5, k).to(torch.bfloat16)
    layer(a)
    layer(b)
    expected = torch.maximum(a.abs().amax(0), b.float().abs().amax(0))
    assert torch.equal(layer.observed_absmax(), expected)
    layer.observe_inputs(False)
    with pytest.raises(RuntimeError, match="observe_inputs"):
        layer.observed_absmax()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_prepared_batches_equal_quant_gemm(ops, dtype):
    """From 5 tokens on (AVX-512) or 17 (AVX2), a QuantLinear quantizes its input straight into
    the batched path's block-major layout, once for all its segments (with the integer chain
    starts each segment's type needs). Its output must be bit-identical to quantize_activations
    + quant_gemm per segment, at batch sizes around both thresholds, with segments of every type
    (so every chain-start kind: whole blocks with offsets 8, 16 and 128, halves with 32, float
    offsets)."""
    rng = np.random.default_rng(900)
    k = 512
    rows = [16 + 3 * i for i in range(len(ALL_TYPES))]  # partial last tiles
    shards = [(q, n, random_blocks(q, n, k, rng)) for q, n in zip(ALL_TYPES, rows, strict=True)]
    layer, _ = _linear(ops, shards, k)
    packed = [gp.pack(gf.parse(raw, int(q), n, k), int(q), n, k) for q, n, raw in shards]
    for m in _int8_batches(ops, (4, 5, 16, 17, 33, 63, 64, 70)):
        x = torch.randn(m, k).to(dtype)
        y = layer(x)
        xq, meta = ops.quantize_activations(x)
        ref = torch.empty_like(y)
        col = 0
        for (q, n, _), p in zip(shards, packed, strict=True):
            ops.quant_gemm(xq, meta, p, int(q), n, ref, col, None)
            col += n
        assert torch.equal(y, ref), m


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_amx_bfloat16_tiles_multiply_rounded_weights(ops, qtype):
    """From bf16_tiles_min_tokens() tokens on (AMX), a QuantLinear multiplies bfloat16
    weights (gguf's float32 values rounded to nearest even) with bfloat16 activations (float32
    inputs rounded the same way), summing in float32: against that product in float64, within
    1e-5 of the largest output (float32 out; bfloat16 out: its rounding). Two shards (the second
    Q8_0, 9 rows: partial tiles, an odd tile count), a bias on the first, batches at and past
    the threshold and past a 32-token pass; exact channels play no part there. The result is
    closer to the float64 product of the unrounded operands than the 8-bit path below it."""
    limit = ops.bf16_tiles_min_tokens()
    if not limit:
        pytest.skip("this level or CPU has no AMX tiles")
    rng = np.random.default_rng(700 + int(qtype))
    k, n1, n2 = 512, 40, 9
    shards = [
        (qtype, n1, random_blocks(qtype, n1, k, rng, extreme=True)),
        (QT.Q8_0, n2, random_blocks(QT.Q8_0, n2, k, rng)),
    ]
    packed = [gp.pack(gf.parse(raw, int(q), n, k), int(q), n, k) for q, n, raw in shards]
    bias = torch.randn(n1)
    layer = ops.QuantLinear(
        packed,
        [int(q) for q, _, _ in shards],
        [n1, n2],
        [torch.cat([bias, bias.new_zeros(gp.padded_rows(n1) - n1)]), None],
        k,
    )
    w = torch.cat([torch.from_numpy(dequantize(raw, q).reshape(n, k)) for q, n, raw in shards])
    w_bf16 = w.to(torch.bfloat16).double()
    shift = torch.cat([bias, torch.zeros(n2)]).double()
    for m in (limit, limit + 1, limit + 37, 2 * limit + 16):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k).to(dtype)
            y = layer(x)
            assert y.dtype == dtype and y.shape == (m, n1 + n2)
            ref = x.to(torch.bfloat16).double() @ w_bf16.T + shift
            err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
            assert err < (1e-5 if dtype == torch.float32 else 8e-3), (m, dtype, err)
    x = torch.randn(limit, k)
    y = layer(x)
    layer.set_exact_channels([3, 100])
    assert torch.equal(layer(x), y)
    exact = x.double() @ w.double().T + shift
    tiles_err = (y.double() - exact).abs().max()
    int8_err = (layer(x[: limit - 1]).double() - exact[: limit - 1]).abs().max()
    assert tiles_err < int8_err, (tiles_err, int8_err)
