"""Unstructured sparsity (raypress.compress.sparsity) and input statistics (raypress.calibrate)."""
import numpy as np
import pytest
import torch

from raypress.compress import get_method
from raypress.compress.sparsity import DEFAULT_LEVELS, Magnitude, SparseGPT, Wanda
from raypress.errors import RayPressError


def _layer(out=64, inp=300, n=2048, seed=0):
    """Random layer with strongly correlated inputs (low-rank mixing + scale spread)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g) * 0.05
    mix = torch.randn(inp, 16, generator=g)
    X = mix @ torch.randn(16, n, generator=g) + 0.3 * torch.randn(inp, n, generator=g)
    X = X * torch.linspace(0.2, 3.0, inp).unsqueeze(1)
    H = 2 * X @ X.T / n
    return W, X, H


def _err(W, Wp, X):
    return float(((W - Wp) @ X).pow(2).sum())


def _reference_sparsegpt(W, H, sparsity, blocksize=128, percdamp=0.01):
    """IST-DASLab/sparsegpt fasterprune (unstructured), with an exact-k block mask."""
    W = W.clone().float()
    H = H.clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(cols)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
        k = int(round(tmp.numel() * sparsity))
        mask1 = torch.zeros(tmp.numel(), dtype=torch.bool)
        mask1[torch.argsort(tmp.flatten())[:k]] = True
        mask1 = mask1.view_as(tmp)
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def test_registry_and_defaults():
    assert isinstance(get_method("sparsegpt"), SparseGPT)
    assert isinstance(get_method("magnitude"), Magnitude)
    assert isinstance(get_method("wanda", levels=[0.0, 0.5]), Wanda)
    with pytest.raises(KeyError):
        get_method("nope")
    m = SparseGPT()
    assert m.level_values() == list(DEFAULT_LEVELS) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert m.params() == {"name": "sparsegpt", "levels": list(DEFAULT_LEVELS), "blocksize": 128, "percdamp": 0.01}
    assert m.needs_hessian and not m.needs_norms
    assert Wanda().needs_norms and not Wanda().needs_hessian
    assert not Magnitude().needs_hessian and not Magnitude().needs_norms
    for bad in ([0.5, 0.1], [0.0, 1.0], [], [0.1, 0.1], [-0.1, 0.2]):
        with pytest.raises(RayPressError):
            SparseGPT(levels=bad)


@pytest.mark.parametrize("method", [SparseGPT(), Wanda(), Magnitude()], ids=lambda m: m.name)
def test_zero_fraction_matches_level(method):
    W, X, H = _layer()
    norms = X.norm(dim=1)
    for v in method.level_values():
        Wp = method.build(W, H, v, **({"norms": norms} if method.needs_norms else {}))
        assert Wp.shape == W.shape and Wp.dtype == torch.float32
        assert abs(float((Wp == 0).float().mean()) - v) <= 0.01, (method.name, v)


@pytest.mark.parametrize("method", [SparseGPT(), Wanda(), Magnitude()], ids=lambda m: m.name)
def test_level_zero_identity_and_inputs_untouched(method):
    W, X, H = _layer(seed=1)
    W[:, 5] = 0.0
    H[7, :] = 0.0
    H[:, 7] = 0.0  # a dead input column
    W0, H0 = W.clone(), H.clone()
    norms = X.norm(dim=1)
    n0 = norms.clone()
    kw = {"norms": norms} if method.needs_norms else {}
    assert torch.equal(method.build(W, H, 0.0, **kw), W0)
    out = method.build(W, H, 0.5, **kw)
    assert torch.equal(W, W0) and torch.equal(H, H0) and torch.equal(norms, n0)
    assert out.data_ptr() != W.data_ptr()
    if method.name == "sparsegpt":
        assert bool((out[:, 7] == 0).all())  # dead column zeroed (reference behaviour)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_beats_magnitude(sparsity):
    W, X, H = _layer(seed=2)
    e_sgpt = _err(W, SparseGPT().build(W, H, sparsity), X)
    e_mag = _err(W, Magnitude().build(W, None, sparsity), X)
    e_wanda = _err(W, Wanda().build(W, None, sparsity, norms=X.norm(dim=1)), X)
    assert e_sgpt < e_mag, (e_sgpt, e_mag)
    assert e_sgpt < e_wanda < e_mag, (e_sgpt, e_wanda, e_mag)


def test_sparsegpt_matches_reference_and_batched_levels():
    W, X, H = _layer(out=40, inp=200, seed=3)
    m = SparseGPT(levels=[0.0, 0.3, 0.5, 0.8], blocksize=64)
    for v in (0.3, 0.8):
        ref = _reference_sparsegpt(W, H, v, blocksize=64)
        got = m.build(W, H, v)
        assert torch.equal(got == 0, ref == 0)
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4)
    allv = m.build_levels(W, H, m.level_values())
    assert torch.equal(allv[0], W)
    for v, got in zip(m.level_values(), allv):
        assert torch.allclose(got, m.build(W, H, v), atol=1e-5, rtol=1e-4)
    # level chunking (memory cap) gives the same result
    small = SparseGPT(levels=m.level_values(), blocksize=64, max_batch_bytes=1)
    for a, b in zip(small.build_levels(W, H, m.level_values()), allv):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_wanda_per_row_and_hessian_fallback():
    W, X, H = _layer(seed=4)
    out = Wanda().build(W, None, 0.5, norms=X.norm(dim=1))
    assert bool(((out == 0).sum(1) == W.shape[1] // 2).all())  # exactly half of every row
    # sqrt(diag(H)) is ‖X_j‖ up to a constant: same mask
    assert torch.equal(Wanda().build(W, H, 0.5) == 0, out == 0)
    with pytest.raises(RayPressError):
        Wanda().build(W, None, 0.5)


def test_sparsegpt_errors():
    W, X, H = _layer(out=8, inp=32, n=64)
    with pytest.raises(RayPressError):
        SparseGPT().build(W, None, 0.5)
    with pytest.raises(RayPressError):
        SparseGPT().build(W, H[:16, :16], 0.5)
    with pytest.raises(RayPressError):
        SparseGPT().build(W, H, 1.0)


# ----------------------------------------------------------------------------- calibration
def test_collect_stats_matches_direct_hooks():
    from _tiny import load_tiny

    from raypress.calibrate import collect_hessians, collect_input_norms, collect_stats
    from raypress.models import get_adapter

    model, _ = load_tiny("llama")
    ad = get_adapter(model)
    calib = np.random.default_rng(0).integers(0, 500, size=(5, 24))  # 5 rows, batch 2: uneven last batch
    stats = collect_stats(model, ad, calib, batch_size=2, progress=False)
    inputs = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.setdefault(n, []).append(a[0]))
               for n, m in ad.linear_layers().items()]
    with torch.no_grad():
        model(torch.from_numpy(calib))
    for h in handles:
        h.remove()
    assert set(stats["hessian"]) == set(inputs) == set(stats["norms"])
    for n, xs in inputs.items():
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).float()
        H = 2 * X.T @ X / X.shape[0]
        assert stats["hessian"][n].dtype == torch.float32
        assert torch.allclose(stats["hessian"][n], H, rtol=1e-4, atol=1e-4 * float(H.abs().max())), n
        assert torch.allclose(stats["norms"][n], X.norm(dim=0), rtol=1e-4, atol=1e-4), n
    h = stats["hessian"]
    assert h["model.layers.0.self_attn.q_proj"] is h["model.layers.0.self_attn.v_proj"]  # shared input
    sub = ["model.layers.1.mlp.down_proj"]
    hs = collect_hessians(model, ad, calib, batch_size=8, layers=sub, progress=False)
    assert list(hs) == sub and torch.allclose(hs[sub[0]], h[sub[0]], rtol=1e-4, atol=1e-5)
    ns = collect_input_norms(model, ad, calib, layers=sub, progress=False)
    assert torch.allclose(ns[sub[0]], stats["norms"][sub[0]], rtol=1e-4, atol=1e-5)
    with pytest.raises(RayPressError):
        collect_hessians(model, ad, calib, layers=["model.layers.9.nope"])
