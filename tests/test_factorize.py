"""The closed form: exactness at full rank, optimality against its bound, lord ≤ svd, parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lord_export
from lord_export.core import factorize as fz


def correlated_inputs(d_in: int, n: int, seed: int) -> torch.Tensor:
    """X (d_in, n) with a strongly non-isotropic covariance, like real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    scales = torch.logspace(1, -2, d_in, dtype=torch.float64)
    return (mix * scales) @ torch.randn(d_in, n, generator=g, dtype=torch.float64)


def direct_error(W, A, B, X) -> float:
    return float(torch.linalg.norm(W @ X - A @ (B @ X)) / torch.linalg.norm(W @ X))


@pytest.mark.parametrize("d_out,d_in", [(12, 20), (30, 16), (16, 16)])
@pytest.mark.parametrize("method", ["lord", "svd", "asvd"])
def test_full_rank_reproduces_the_layer(d_out, d_in, method):
    W = torch.randn(d_out, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(d_out))
    X = correlated_inputs(d_in, 200, seed=0)
    C = X @ X.T
    r = min(d_out, d_in)
    f = {
        "lord": lambda: fz.lord(W, C, r),
        "svd": lambda: fz.svd(W, r, C),
        "asvd": lambda: fz.asvd(W, X.abs().mean(1), r, C),
    }[method]()
    assert direct_error(W, f.A, f.B, X) < 1e-6
    assert fz.relative_error(W, f.A, f.B, C) < 1e-6


@pytest.mark.parametrize("d_out,d_in,rank", [(12, 20, 5), (30, 16, 7), (48, 16, 1), (16, 16, 15)])
def test_lord_error_equals_closed_form_bound(d_out, d_in, rank):
    W = torch.randn(d_out, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    X = correlated_inputs(d_in, 300, seed=1)
    C = X @ X.T
    f = fz.lord(W, C, rank)
    err_from_c = fz.relative_error(W, f.A, f.B, C)
    bound = fz.optimal_relative_error(f.spectrum, rank)
    # abs: a residual near 1e-8 sits at the eigensolver's precision (sqrt(eps) in the error)
    assert err_from_c == pytest.approx(bound, rel=1e-6, abs=1e-7)
    assert direct_error(W, f.A, f.B, X) == pytest.approx(bound, rel=1e-6, abs=1e-7)
    # the bound is the Eckart-Young optimum of the output: no rank-r map of W X beats it
    _, S, _ = torch.linalg.svd(W @ X)
    assert bound == pytest.approx(math.sqrt(float(S[rank:].square().sum() / S.square().sum())), rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(d_out=st.integers(2, 40), d_in=st.integers(2, 40), frac=st.floats(0.05, 0.95), seed=st.integers(0, 10_000))
def test_lord_never_worse_than_svd_or_asvd(d_out, d_in, frac, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    X = correlated_inputs(d_in, 3 * d_in, seed)
    C = X @ X.T
    rank = max(1, int(frac * min(d_out, d_in)))
    lord = fz.relative_error(W, *_ab(fz.lord(W, C, rank)), C)
    svd = fz.relative_error(W, *_ab(fz.svd(W, rank, C)), C)
    asvd = fz.relative_error(W, *_ab(fz.asvd(W, X.abs().mean(1), rank, C)), C)
    assert lord <= svd + 1e-9
    assert lord <= asvd + 1e-9


def _ab(f):
    return f.A, f.B


def test_singular_covariance_is_fine():
    """Fewer tokens than features: C is singular; the eigenvector form needs no inverse."""
    d_in, d_out = 32, 48
    W = torch.randn(d_out, d_in, dtype=torch.float64)
    X = torch.randn(d_in, 10, dtype=torch.float64)  # rank-10 C
    X[5] = 0  # a dead feature too
    C = X @ X.T
    f = fz.lord(W, C, 10)
    assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
    assert direct_error(W, f.A, f.B, X) < 1e-8  # 10 directions seen, rank 10 captures them exactly


def test_grouped_parameter_count():
    members = [(64, 48), (16, 48), (16, 48)]  # q, k, v of a GQA layer
    W = torch.cat([torch.randn(o, i, dtype=torch.float64) for o, i in members])
    C = (lambda X: X @ X.T)(correlated_inputs(48, 100, 3))
    r = fz.rank_for(W.shape[0], 48, 0.5)
    f = fz.lord(W, C, r)
    assert f.A.numel() + f.B.numel() == r * (48 + sum(o for o, _ in members))


@pytest.mark.parametrize(
    "d_out,d_in,rr,multiple,expected",
    [
        (64, 64, 0.3, 1, 45),
        (64, 64, 0.0, 1, 64),
        (256, 64, 0.5, 1, 32),
        (64, 64, 0.3, 8, 48),
        (64, 64, 0.99, 8, 8),
        (100, 30, 0.3, 64, 30),
        (10, 10, 0.96, 1, 1),
    ],
)
def test_rank_for(d_out, d_in, rr, multiple, expected):
    assert fz.rank_for(d_out, d_in, rr, multiple) == expected


def test_parity_rank():
    assert fz.parity_rank(64, 64) == 32  # square: 50% rank reduction to break even
    assert fz.parity_rank(256, 64) == pytest.approx(51.2)  # d -> 4d: 20%
    assert 1 - fz.parity_rank(3 * 64, 64) / 64 == pytest.approx(0.25)  # MHA q|k|v group: 25%


def test_bad_rank_raises():
    with pytest.raises(ValueError, match="outside"):
        fz.lord(torch.randn(4, 4), torch.eye(4), 5)


@pytest.mark.parametrize("d_out,d_in", [(24, 40), (60, 20)])  # both branches: eigh of WCWᵀ, SVD of W C^½
def test_float32_spectrum_gives_near_optimal_factors(d_out, d_in):
    """The float32 decomposition's subspace is as good as float64's to second order (the optimum is
    stationary), which is what benchmarks/factorize_precision.py measures on real statistics."""
    W = torch.randn(d_out, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    X = correlated_inputs(d_in, 400, seed=2)
    C = X @ X.T
    spectrum, _ = fz.output_spectrum(W, C)
    evals32, U32 = fz.output_spectrum(W, C, dtype=torch.float32)
    assert U32.dtype == torch.float32
    for rank in (3, min(d_out, d_in) // 2):
        A = U32[:, :rank].double()
        err32, bound = fz.relative_error(W, A, A.T @ W, C), fz.optimal_relative_error(spectrum, rank)
        assert bound * (1 - 1e-9) <= err32 < bound * (1 + 1e-6)
    assert torch.allclose(evals32.double(), spectrum, rtol=1e-3, atol=1e-4 * float(spectrum[0]))


@pytest.mark.parametrize("d_out,d_in,n", [(24, 40, 400), (60, 20, 400), (60, 20, 12)])  # the last: C singular
def test_output_eigenvalues_are_the_output_spectrum(d_out, d_in, n):
    W = torch.randn(d_out, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    X = correlated_inputs(d_in, n, seed=4)
    C = X @ X.T
    evals, _ = fz.output_spectrum(W, C)
    fast = fz.output_eigenvalues(W, C)
    assert fast.shape == evals.shape
    assert torch.allclose(fast, evals, rtol=1e-8, atol=1e-10 * float(evals[0]))


@pytest.mark.parametrize(
    "d_out,d_in,dtype", [(24, 16, torch.float64), (16, 40, torch.float32), (20, 20, torch.bfloat16)]
)
def test_errors_of_every_truncation_equal_relative_error_at_each_rank(d_out, d_in, dtype):
    g = torch.Generator().manual_seed(d_in)
    W = torch.randn(d_out, d_in, dtype=torch.float64, generator=g)
    X = correlated_inputs(d_in, 3 * d_in, seed=d_out)
    C = X @ X.T
    top = min(d_out, d_in)
    f = fz.lord(W, C, top)
    A, B = f.A.to(dtype), f.B.to(dtype)  # the factors as stored: cast, so not exactly orthonormal
    errors = fz.relative_errors_by_rank(W, A, B, C)
    assert errors.shape == (top,)
    for r in range(1, top + 1):
        assert float(errors[r - 1]) == pytest.approx(fz.relative_error(W, A[:, :r], B[:r], C), rel=1e-6, abs=1e-9)
    if dtype == torch.float64:  # exact factors: the closed-form bound at every rank, 0 at full rank
        bounds = [fz.optimal_relative_error(f.spectrum, r) for r in range(1, top + 1)]
        torch.testing.assert_close(errors, torch.tensor(bounds, dtype=torch.float64), rtol=1e-6, atol=1e-7)
        assert float(errors[-1]) < 1e-6


def _tall_groups(arch):
    """(W, C) of every tall group (d_out > d_in: the Gram form's case) of a tiny model, from its calibration."""
    from lord_export.pipeline.planner import build_groups, describe_group, stacked_weight
    from tests.helpers import correlated_batches, tiny_model

    model = tiny_model(arch, torch.float64)
    layers = lord_export.select_targets(model, ("all",))
    cal = lord_export.calibrate(model, correlated_batches(seq=40), layers)
    modules = dict(model.named_modules())
    config = lord_export.LordConfig(rank_reduction=0.3, force=True)
    for names in build_groups(layers, cal.input_of, True):
        g = describe_group(modules, names, config)
        if g.d_out > g.d_in:
            yield g, stacked_weight(modules, g), cal.of(names[0]).C


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "gpt2", "codegen", "phi3", "bert"])
def test_gram_form_gives_the_svd_forms_factors(arch):
    """Tall groups decompose the small d_in × d_in Gram matrix instead of a thin SVD of W C^{1/2}: the same
    spectrum and the same rank-r factors (A B = U_r U_rᵀ W; individual vectors may differ in sign) to
    float64 round-off, at every rank."""
    shapes = 0
    for g, W, C in _tall_groups(arch):
        shapes += 1
        e_svd, U_svd = fz.output_spectrum(W, C, form="svd")
        e_gram, U_gram = fz.output_spectrum(W, C, form="gram")
        scale = float(e_svd[0])
        assert float((e_svd - e_gram).abs().max()) <= 1e-10 * scale, g.name
        for r in sorted({1, g.rank, g.full_rank // 2, g.full_rank}):
            if float(e_svd[r - 1]) <= 1e-10 * scale:
                continue  # past C's rank (a LayerNorm input is centred): the data leaves the subspace open
            a = fz.lord(W, C, r, decomposition=(e_svd, U_svd))
            b = fz.lord(W, C, r, decomposition=(e_gram, U_gram))
            torch.testing.assert_close(b.A @ b.B, a.A @ a.B, rtol=0, atol=1e-10 * float(W.abs().max()))
        torch.testing.assert_close(U_gram.T @ U_gram, torch.eye(U_gram.shape[1], dtype=W.dtype), rtol=0, atol=1e-9)
        full = fz.lord(W, C, g.full_rank, decomposition=(e_gram, U_gram))
        torch.testing.assert_close(full.A @ full.B, W, rtol=0, atol=1e-10 * float(W.abs().max()))  # W at full rank
    assert shapes > 0  # the architecture has tall groups (q|k|v, gate|up, fused c_attn, ...)


def test_gram_form_survives_fewer_tokens_than_features():
    """C seen on fewer tokens than features: the Gram form still returns orthonormal vectors, zero
    eigenvalues past the data's rank, and factors whose error is the closed-form bound."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(96, 32, generator=g, dtype=torch.float64)
    X = torch.randn(32, 10, generator=g, dtype=torch.float64)  # 10 tokens < 32 features
    C = X @ X.T
    evals, U = fz.output_spectrum(W, C, form="gram")
    assert U.shape == (96, 32) and float(evals[10:].abs().max()) < 1e-9 * float(evals[0])
    torch.testing.assert_close(U.T @ U, torch.eye(32, dtype=W.dtype), rtol=0, atol=1e-10)
    for r in (5, 10, 20):
        f = fz.lord(W, C, r)
        assert fz.relative_error(W, f.A, f.B, C) == pytest.approx(fz.optimal_relative_error(f.spectrum, r), abs=1e-7)
