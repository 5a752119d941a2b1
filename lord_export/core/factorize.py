"""Closed-form low-rank factorizations of a (stacked) weight matrix.

Pure tensor math: no nn.Module, no hooks, no I/O. Every function works in float64.

Notation (DESIGN.md): W is (d_out, d_in), X is (d_in, N) and C = X Xᵀ is (d_in, d_in).
A factorization is W ≈ A B with A (d_out, r) and B (r, d_in).

* ``lord``: minimizes ‖W X − A B X‖_F. A = U_r, B = U_rᵀ W where U_r are the top-r eigenvectors
  of W C Wᵀ. The squared residual is exactly the sum of the discarded eigenvalues.
* ``svd``: minimizes ‖W − A B‖_F (ignores the activations). A = U_r S_r, B = V_rᵀ.
* ``asvd``: ASVD-style activation scaling. With s = mean|x|^α per input feature,
  SVD of W diag(s) = U S Vᵀ, then A = U_r S_r, B = V_rᵀ diag(1/s).

Error compensation (calibration on the compressed model, :func:`compensated_weight`): when a
layer's input on the already-compressed path is X̂ but its target is the dense path's output W X,
the best rank-r M for min ‖W X − M X̂‖_F is LoRD of the full-rank least-squares solution
W_eff = W H G⁻¹ (G = X̂X̂ᵀ, H = X X̂ᵀ) under the input covariance G: A, B = lord(W_eff, G, r), because
‖W X − M X̂‖² = ‖W X − W_eff X̂‖² + ‖(W_eff − M) X̂‖² (the normal equations W_eff G = W H make the
cross term vanish). W_eff is computed as W + W (H − G) G⁻¹, so it is exactly W when X̂ = X, and the
whole thing reduces to LoRD. G is damped (G + δ·mean(diag G)·I) where it is singular.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Exponent α of the ASVD activation scaling ``s = mean|x| ** α`` (ASVD paper's default 0.5).
ASVD_ALPHA = 0.5


@dataclass
class Factors:
    """Result of one factorization: ``W ≈ A @ B``, all float64."""

    A: torch.Tensor  # (d_out, r)
    B: torch.Tensor  # (r, d_in)
    spectrum: torch.Tensor  # eigenvalues of W C Wᵀ, descending (length min(d_out, d_in))

    @property
    def rank(self) -> int:
        return self.A.shape[1]


def output_spectrum(
    W: torch.Tensor, C: torch.Tensor, *, dtype: torch.dtype = torch.float64, form: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-pairs of the output covariance W C Wᵀ, descending, without inverting C.

    Returns (eigenvalues, eigenvectors) with at most min(d_out, d_in) pairs. Wide or square groups
    (d_out <= d_in) take ``eigh`` of the d_out × d_out W C Wᵀ. Tall groups (d_out > d_in: q|k|v and
    gate|up groups of a d → 3d or d → 8d model) work in the small d_in × d_in space: with M = W C^{1/2},
    the eigenvectors V of the Gram matrix MᵀM give W C Wᵀ's as U = M V S⁻¹ (``form="gram"``, the
    default: two GEMMs and one small ``eigh``), the same pairs a thin SVD of M gives (``form="svd"``,
    several times slower at these shapes; kept for comparison). Directions whose singular value is
    below 1e-7 of the largest (a C seen on fewer tokens than features) get an orthonormal completion
    instead of M V S⁻¹, which would only amplify round-off there.
    ``dtype`` float32 exists to measure what a device without float64 would lose
    (``benchmarks/factorize_precision.py``); everything else uses float64.
    """
    W = W.to(dtype)
    C = C.to(dtype)
    d_out, d_in = W.shape
    if d_out <= d_in:
        M = W @ C @ W.T
        M = (M + M.T) / 2
        evals, evecs = torch.linalg.eigh(M)
        return evals.flip(0).clamp_min(0), evecs.flip(1)
    lam, Q = torch.linalg.eigh((C + C.T) / 2)
    M = W @ ((Q * lam.clamp_min(0).sqrt()) @ Q.T)  # W C^{1/2}, (d_out, d_in)
    if form == "svd":
        U, S, _ = torch.linalg.svd(M, full_matrices=False)
        return S.square(), U
    K = M.T @ M
    evals, V = torch.linalg.eigh((K + K.T) / 2)
    evals, V = evals.flip(0).clamp_min(0), V.flip(1)
    s = evals.sqrt()
    good = s > 1e-7 * float(s[0]) if float(s[0]) > 0 else torch.zeros_like(s, dtype=torch.bool)
    U = (M @ V[:, good]) / s[good]
    if not bool(good.all()):
        U = _complete_orthonormal(U, W, d_in)
        evals = torch.where(good, evals, torch.zeros_like(evals))
    return evals, U


def _complete_orthonormal(U: torch.Tensor, W: torch.Tensor, width: int) -> torch.Tensor:
    """``U``'s (d_out, k) orthonormal columns followed by ``width - k`` more: first the directions of W's own
    column space that U misses (largest first, so that factors at full rank give W back exactly), then
    fixed pseudo-random ones (the same completion on every run)."""
    k = U.shape[1]
    R = W - U @ (U.T @ W)
    evals, V = torch.linalg.eigh(R.T @ R)
    evals, V = evals.flip(0), V.flip(1)
    keep = evals > 1e-20 * float(W.square().sum())
    extra = (R @ V[:, keep]) / evals[keep].sqrt()
    g = torch.Generator(device="cpu").manual_seed(0)
    noise = torch.randn(U.shape[0], width, generator=g, dtype=U.dtype).to(U.device)
    Q, Rq = torch.linalg.qr(torch.cat([U, extra, noise], dim=1))
    d = torch.diagonal(Rq)
    Q = Q * torch.where(d < 0, -1.0, 1.0).to(Q.dtype)  # keep U's own columns' signs
    return torch.cat([U, Q[:, k:width]], dim=1)


def output_eigenvalues(W: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """The eigenvalues of :func:`output_spectrum` alone, descending (what a rank allocation needs).

    No eigenvectors are formed, which is several times cheaper: ``eigvalsh`` of W C Wᵀ when
    d_out <= d_in, else of Lᵀ WᵀW L with C = L Lᵀ (the same non-zero eigenvalues, d_in × d_in); a C
    that is not numerically positive definite (fewer calibration tokens than features) takes its
    square root from an eigendecomposition instead of Cholesky.
    """
    W, C = W.double(), C.double()
    d_out, d_in = W.shape
    if d_out <= d_in:
        M = W @ C @ W.T
        return torch.linalg.eigvalsh((M + M.T) / 2).flip(0).clamp_min(0)
    C = (C + C.T) / 2
    L, info = torch.linalg.cholesky_ex(C)
    if int(info) != 0:
        lam, Q = torch.linalg.eigh(C)
        L = Q * lam.clamp_min(0).sqrt()
    K = L.T @ (W.T @ W) @ L
    return torch.linalg.eigvalsh((K + K.T) / 2).flip(0).clamp_min(0)


def lord(W: torch.Tensor, C: torch.Tensor, rank: int, *, decomposition: tuple | None = None) -> Factors:
    """Activation-aware optimal rank-``rank`` factorization of W for inputs with covariance C.

    ``decomposition``: the ``output_spectrum(W, C)`` pair when already known (it does not depend
    on the rank, so sweeps over ranks compute it once).
    """
    _check(W, rank)
    evals, U = decomposition if decomposition is not None else output_spectrum(W, C)
    U_r = U[:, :rank]
    return Factors(A=U_r.contiguous(), B=(U_r.T @ W.double()).contiguous(), spectrum=evals)


#: Damping of G = X̂X̂ᵀ in :func:`compensated_weight`, relative to mean(diag G) (GPTQ's default).
COMPENSATION_DAMPING = 0.01


def compensated_weight(
    W: torch.Tensor, G: torch.Tensor, H: torch.Tensor, damping: float = COMPENSATION_DAMPING
) -> torch.Tensor:
    """W_eff = W H G⁻¹ = W + W (H − G) G⁻¹ (module docstring), with G damped; exactly W when H == G."""
    W, G, H = W.double(), G.double(), H.double()
    delta = H - G
    if not delta.any():
        return W
    diag = G.diagonal()
    G_d = G + damping * float(diag.mean().clamp_min(1e-12)) * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    L = torch.linalg.cholesky((G_d + G_d.T) / 2)
    correction = torch.cholesky_solve((W @ delta).T, L).T  # (W Δ) G_d⁻¹ (G_d symmetric)
    return W + correction


def best_output_error(W: torch.Tensor, G: torch.Tensor, H: torch.Tensor, total: float, rank: int) -> float:
    """min over rank-``rank`` M of ‖W X − M X̂‖² (exact; no damping), from G = X̂X̂ᵀ and H = X X̂ᵀ.

    With the pseudo-inverse G⁺ = Q Λ⁻¹ Qᵀ (eigenvalues above 1e-10·λ_max) and Z = W H Q Λ^{-1/2}, the
    minimum is ‖W X‖² − Σ_{i≤r} σ_i(Z)²: the least-squares fit W H G⁺ explains ‖Z‖², and the best
    rank-r M keeps its top r directions (columns of H lie in the range of G, so G⁺ loses nothing).
    """
    lam, Q = torch.linalg.eigh((G.double() + G.double().T) / 2)
    keep = lam > 1e-10 * float(lam.max().clamp_min(1e-300))
    Z = (W.double() @ (H.double() @ Q[:, keep])) / lam[keep].sqrt()
    s = torch.linalg.svdvals(Z)
    return max(total - float(s[:rank].square().sum()), 0.0)


def output_error(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, Cxx: torch.Tensor, H: torch.Tensor, G: torch.Tensor
) -> tuple[float, float]:
    """(‖W X − A B X̂‖², ‖W X‖²) from Cxx = X Xᵀ, H = X X̂ᵀ, G = X̂X̂ᵀ, never from X or X̂.

    ‖W X − M X̂‖² = tr(W Cxx Wᵀ) − 2 tr(W H Bᵀ Aᵀ) + tr(AᵀA · B G Bᵀ) with M = A B.
    """
    W, A, B = W.double(), A.double(), B.double()
    total = float(((W @ Cxx.double()) * W).sum())
    cross = float(((W @ (H.double() @ B.T)) * A).sum())
    quad = float(((A.T @ A) * (B @ G.double() @ B.T)).sum())
    return max(total - 2 * cross + quad, 0.0), total


def svd(W: torch.Tensor, rank: int, C: torch.Tensor | None = None) -> Factors:
    """Plain weight SVD (the baseline). C, when given, only fills in the spectrum for reports."""
    _check(W, rank)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    spectrum = output_spectrum(W, C)[0] if C is not None else S.square()
    return Factors(A=(U[:, :rank] * S[:rank]).contiguous(), B=Vh[:rank].contiguous(), spectrum=spectrum)


def asvd(
    W: torch.Tensor, mean_abs: torch.Tensor, rank: int, C: torch.Tensor | None = None, alpha: float = ASVD_ALPHA
) -> Factors:
    """ASVD-style factorization: SVD of W scaled by per-input-feature activation magnitude."""
    _check(W, rank)
    s = mean_abs.double().clamp_min(1e-12) ** alpha
    s = s / s.mean()  # scale-free: only relative feature magnitudes matter
    U, S, Vh = torch.linalg.svd(W.double() * s, full_matrices=False)
    spectrum = output_spectrum(W, C)[0] if C is not None else S.square()
    B = Vh[:rank] / s
    return Factors(A=(U[:, :rank] * S[:rank]).contiguous(), B=B.contiguous(), spectrum=spectrum)


def relative_error(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, total: float | None = None
) -> float:
    """‖W X − A B X‖_F / ‖W X‖_F computed from C = X Xᵀ (never from X).

    Uses ‖(W − AB) X‖² = tr(W C Wᵀ) − 2 tr(Aᵀ W C Bᵀ) + tr(AᵀA · B C Bᵀ), which costs
    O(r d_in (d_in + d_out)) instead of O(d_out d_in²); when the error is below 1e-4 relative that
    difference has lost its digits and the direct form is used instead. ``total`` = tr(W C Wᵀ) when already known
    (it is the sum of the output spectrum).
    """
    W, A, B, C = W.double(), A.double(), B.double(), C.double()
    if total is None:
        total = float(torch.einsum("ij,jk,ik->", W, C, W))
    BC = B @ C  # (r, d_in)
    cross = float(torch.einsum("rj,ij,ir->", BC, W, A))  # tr(Aᵀ W C Bᵀ)
    quad = float(((A.T @ A) * (BC @ B.T)).sum())  # tr(AᵀA · B C Bᵀ)
    num = total - 2 * cross + quad
    if num < 1e-8 * total:  # the difference has lost its digits: pay for the direct O(d_out d_in²) form
        E = W - A @ B
        num = float(torch.einsum("ij,jk,ik->", E, C, E))
    num = max(num, 0.0)
    if total <= 0:
        return 0.0 if num <= 0 else math.inf
    return math.sqrt(num / total)


def relative_errors_by_rank(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, total: float | None = None
) -> torch.Tensor:
    """:func:`relative_error` of every leading truncation: entry r − 1 is the error of A[:, :r] B[:r].

    The trace identity of :func:`relative_error`, cumulated over the rank: tr(Aᵣᵀ W C Bᵣᵀ) is a
    partial sum of the diagonal of Aᵀ W C Bᵀ, and tr(AᵣᵀAᵣ · Bᵣ C Bᵣᵀ) the sum of the leading
    r × r block of (AᵀA) ∘ (B C Bᵀ); one pass costs what :func:`relative_error` costs at the full
    rank of A. Ranks where the difference has lost its digits get the direct form, as there.
    """
    W, A, B, C = W.double(), A.double(), B.double(), C.double()
    if total is None:
        total = float(torch.einsum("ij,jk,ik->", W, C, W))
    BC = B @ C  # (R, d_in)
    cross = (A * (W @ BC.T)).sum(0).cumsum(0)  # tr(Aᵣᵀ W C Bᵣᵀ) for r = 1..R
    quad = ((A.T @ A) * (BC @ B.T)).cumsum(0).cumsum(1).diagonal()
    num = total - 2 * cross + quad
    for r in (num < 1e-8 * total).nonzero().flatten().tolist():
        E = W - A[:, : r + 1] @ B[: r + 1]
        num[r] = torch.einsum("ij,jk,ik->", E, C, E)
    num = num.clamp_min(0)
    if total <= 0:
        return torch.where(num > 0, math.inf, 0.0)
    return (num / total).sqrt()


def optimal_relative_error(spectrum: torch.Tensor, rank: int) -> float:
    """Closed-form lower bound: sqrt(sum of discarded eigenvalues / sum of all eigenvalues)."""
    total = float(spectrum.sum())
    if total <= 0:
        return 0.0
    return math.sqrt(max(float(spectrum[rank:].sum()), 0.0) / total)


def full_rank(d_out: int, d_in: int) -> int:
    """The paper's full rank of a (stacked) weight: min(d_out, d_in)."""
    return min(d_out, d_in)


def parity_rank(d_out: int, d_in: int) -> float:
    """Rank at which r (d_in + d_out) factor parameters equal the d_in d_out dense parameters."""
    return d_in * d_out / (d_in + d_out)


def rank_for(d_out: int, d_in: int, rank_reduction: float, multiple: int = 1) -> int:
    """Rank kept when removing ``rank_reduction`` of the full rank, rounded to ``multiple``.

    r = round((1 − rank_reduction) · min(d_out, d_in)); with ``multiple`` > 1, r is rounded to the
    nearest multiple (ties go up), never below ``multiple`` nor above the full rank.
    """
    full = full_rank(d_out, d_in)
    r = max(1, int(math.floor((1.0 - rank_reduction) * full + 0.5)))
    if multiple > 1:
        r = max(multiple, int(math.floor(r / multiple + 0.5)) * multiple)
    return min(r, full)


#: A factorization method as the pipeline calls it: (W, C, mean|x| per input feature, rank,
#: decomposition=the rank-independent ``output_spectrum(W, C)`` when already known) → Factors.
Method = Callable[..., Factors]
METHODS: dict[str, Method] = {}


def register_method(name: str) -> Callable[[Method], Method]:
    """Add a factorization method to :data:`METHODS` under ``name`` (then ``LordConfig(method=name)``)."""

    def add(fn: Method) -> Method:
        METHODS[name] = fn
        return fn

    return add


@register_method("lord")
def _lord_method(W, C, mean_abs, rank, *, decomposition=None) -> Factors:
    return lord(W, C, rank, decomposition=decomposition)


@register_method("svd")
def _svd_method(W, C, mean_abs, rank, *, decomposition=None) -> Factors:
    f = svd(W, rank)
    f.spectrum = decomposition[0] if decomposition is not None else output_spectrum(W, C)[0]
    return f


@register_method("asvd")
def _asvd_method(W, C, mean_abs, rank, *, decomposition=None) -> Factors:
    f = asvd(W, mean_abs, rank)
    f.spectrum = decomposition[0] if decomposition is not None else output_spectrum(W, C)[0]
    return f


def _check(W: torch.Tensor, rank: int) -> None:
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    if not 1 <= rank <= min(W.shape):
        raise ValueError(f"rank {rank} is outside [1, {min(W.shape)}] for a weight of shape {tuple(W.shape)}")
