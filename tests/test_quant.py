"""GPTQ / RTN quantization (raypress.compress.quant)."""
import pytest
import torch

from raypress.compress.quant import GPTQ, RTN, dequantize, effective_bits
from raypress.errors import RayPressError


def _layer(out=48, inp=256, n=2048, seed=0):
    """Random layer with strongly correlated inputs (low-rank mixing + scale spread + outlier dims)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g) * 0.05
    mix = torch.randn(inp, 16, generator=g)
    X = mix @ torch.randn(16, n, generator=g) + 0.3 * torch.randn(inp, n, generator=g)
    X = X * torch.linspace(0.2, 3.0, inp).unsqueeze(1)
    H = 2 * X @ X.T / n
    return W, X, H


def _err(W, Wq, X):
    return float(((W - Wq) @ X).pow(2).sum())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn(bits):
    W, X, H = _layer()
    for gs in (128, 64):
        e_gptq = _err(W, GPTQ(group_size=gs).build(W, H, bits), X)
        e_rtn = _err(W, RTN(group_size=gs).build(W, None, bits), X)
        assert e_gptq < e_rtn, (bits, gs, e_gptq, e_rtn)


def test_gptq_act_order_and_sym_and_per_row():
    W, X, H = _layer(seed=1)
    e_rtn = _err(W, RTN(group_size=128).build(W, None, 3), X)
    for kw in ({"act_order": True}, {"sym": True}, {"group_size": -1}, {"act_order": True, "group_size": -1}):
        Wq = GPTQ(**kw).build(W, H, 3)
        assert Wq.shape == W.shape and Wq.dtype == torch.float32
        assert _err(W, Wq, X) < e_rtn * (1.5 if kw.get("group_size") == -1 else 1.0), kw


def test_8bit_nearly_lossless():
    W, X, H = _layer()
    for m in (GPTQ(), RTN()):
        Wq = m.build(W, H, 8)
        rel = _err(W, Wq, X) / float((W @ X).pow(2).sum())
        assert rel < 1e-4, (m.name, rel)
        assert (W - Wq).abs().max() < 0.01 * W.abs().max()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_distinct_values_per_group(bits):
    W, X, H = _layer(inp=200)  # last group is partial (200 = 128 + 72)
    for m in (GPTQ(group_size=64), GPTQ(group_size=128, act_order=True), RTN(group_size=64)):
        Wq = m.build(W, H, bits)
        gs = m.group_size
        for g0 in range(0, W.shape[1], gs):
            for r in range(W.shape[0]):
                assert Wq[r, g0:g0 + gs].unique().numel() <= 2**bits


@pytest.mark.parametrize("method", [GPTQ(group_size=64), GPTQ(act_order=True), GPTQ(sym=True), RTN(), GPTQ(group_size=-1)])
def test_packed_roundtrip_exact(method):
    W, X, H = _layer(inp=200)
    for bits in (2, 4, 8):
        codes, scales, zeros = method.quantize_packed(W, H, bits)
        ng = 1 if not method.group_size else -(-200 // method.group_size)
        assert codes.dtype == torch.uint8 and codes.shape == W.shape
        assert scales.dtype == torch.float16 and scales.shape == (W.shape[0], ng)
        assert zeros.dtype == torch.float16 and zeros.shape == (W.shape[0], ng)
        assert int(codes.max()) <= 2**bits - 1
        dense = method.build(W, H, bits)
        assert torch.equal(method.dequantize(codes, scales, zeros), dense)
        assert torch.equal(dequantize(codes.numpy(), scales.numpy(), zeros.numpy(), method.group_size), dense)
        packed_bytes = codes.numel() + 2 * (scales.numel() + zeros.numel())
        assert packed_bytes < 0.55 * 2 * W.numel()  # about half of float16


def test_inputs_not_modified_and_dead_columns():
    W, X, H = _layer(inp=128)
    H[5, :] = 0
    H[:, 5] = 0
    W0, H0 = W.clone(), H.clone()
    Wq = GPTQ().build(W, H, 4)
    assert torch.equal(W, W0) and torch.equal(H, H0)
    assert torch.all(Wq[:, 5] == 0)
    assert torch.isfinite(Wq).all()


def test_levels_params_and_errors():
    m = GPTQ(bits=[2, 3, 4, 8])
    assert m.level_values() == [2.0, 3.0, 4.0, 8.0]
    assert m.value_kind == "bits" and m.needs_hessian and m.packed
    assert not RTN().needs_hessian
    p = m.params()
    assert p["name"] == "gptq" and p["group_size"] == 128 and p["percdamp"] == 0.01
    assert effective_bits(4, 128) == 4.25 and m.effective_bits(3) == 3.25
    assert effective_bits(4, -1) == 4.0
    with pytest.raises(RayPressError):
        GPTQ(bits=[2, 16])
    with pytest.raises(RayPressError):
        GPTQ().build(torch.randn(4, 8), None, 4)
    with pytest.raises(RayPressError):
        GPTQ().build(torch.randn(4, 8), torch.eye(4), 4)


def test_registry_entries():
    import raypress.compress as rc

    assert isinstance(rc.get_method("gptq", bits=[2, 4]), GPTQ)
    assert isinstance(rc.get_method("rtn"), RTN)


def test_pack_levels_and_decode_stored():
    W, X, H = _layer(inp=128)
    m = GPTQ(bits=[2, 4, 8], group_size=64)
    stored = m.pack_levels(W, H)
    assert stored["codes"].shape == (3, 48, 128) and stored["codes"].dtype.name == "uint8"
    assert stored["scales"].shape == (3, 48, 2) and stored["scales"].dtype.name == "float16"
    for level, bits in enumerate(m.level_values()):
        got = m.decode_stored(stored, level)
        assert got.dtype.name == "float32" and torch.equal(torch.from_numpy(got), m.build(W, H, bits))
    dense = torch.stack([m.build(W, H, b) for b in m.level_values()]).numpy()
    assert (m.decode_stored(dense, 1) == dense[1]).all()


@pytest.mark.parametrize("method", [GPTQ(bits=[2, 3, 4]), GPTQ(bits=[2, 4], act_order=True, group_size=64)])
def test_build_levels_matches_build(method):
    W, X, H = _layer(inp=128)
    outs = method.build_levels(W, H, method.level_values())
    for out, bits in zip(outs, method.level_values()):
        assert torch.equal(out, method.build(W, H, bits))
