"""Closed-form low-rank factorizations of a (stacked) weight matrix.

Pure tensor math: no nn.Module, no hooks, no I/O. Every function works in float64.

Notation (DESIGN.md): W is (d_out, d_in), X is (d_in, N) and C = X Xᵀ is (d_in, d_in).
A factorization is W ≈ A B with A (d_out, r) and B (r, d_in).

* ``lord``: minimizes ‖W X − A B X‖_F. A = U_r, B = U_rᵀ W where U_r are the top-r eigenvectors
  of W C Wᵀ. The squared residual is exactly the sum of the discarded eigenvalues.
* ``svd``: minimizes ‖W − A B‖_F (ignores the activations). A = U_r S_r, B = V_rᵀ.
* ``asvd``: ASVD-style activation scaling. With s = mean|x|^α per input feature,
  SVD of W diag(s) = U S Vᵀ, then A = U_r S_r, B = V_rᵀ diag(1/s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METHODS = ("lord", "svd", "asvd")

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


def output_spectrum(W: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-pairs of the output covariance W C Wᵀ, descending, without inverting C.

    Returns (eigenvalues, eigenvectors) with at most min(d_out, d_in) pairs. When d_out > d_in
    the (d_out, d_out) eigenproblem is replaced by the thin SVD of W C^{1/2}, which has the same
    left singular vectors and squared singular values but costs O(d_out d_in²).
    """
    W = W.double()
    C = C.double()
    d_out, d_in = W.shape
    if d_out <= d_in:
        M = W @ C @ W.T
        M = (M + M.T) / 2
        evals, evecs = torch.linalg.eigh(M)
        evals, evecs = evals.flip(0), evecs.flip(1)
    else:
        lam, Q = torch.linalg.eigh((C + C.T) / 2)
        sqrt_c = (Q * lam.clamp_min(0).sqrt()) @ Q.T
        U, S, _ = torch.linalg.svd(W @ sqrt_c, full_matrices=False)
        evals, evecs = S.square(), U
    return evals.clamp_min(0), evecs


def lord(W: torch.Tensor, C: torch.Tensor, rank: int) -> Factors:
    """Activation-aware optimal rank-``rank`` factorization of W for inputs with covariance C."""
    _check(W, rank)
    evals, U = output_spectrum(W, C)
    U_r = U[:, :rank]
    return Factors(A=U_r.contiguous(), B=(U_r.T @ W.double()).contiguous(), spectrum=evals)


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


def _check(W: torch.Tensor, rank: int) -> None:
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    if not 1 <= rank <= min(W.shape):
        raise ValueError(f"rank {rank} is outside [1, {min(W.shape)}] for a weight of shape {tuple(W.shape)}")
