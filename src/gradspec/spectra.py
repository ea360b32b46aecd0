"""Singular values of a per-sample weight gradient from its factors, and the metrics on them.

For one sample and one linear projection ``y = W x``, the weight gradient is ``G = Dᵀ X`` with
``X`` (tokens × d_in) the projection's inputs and ``D`` (tokens × d_out) the loss gradient with
respect to its outputs. With the thin QR factorization ``Xᵀ = Q R`` (``R`` is k × T, k = min(T,
d_in)), ``G = Dᵀ Rᵀ Qᵀ`` and ``Q`` has orthonormal columns, so the singular values of ``G`` are
those of the small ``M = R D`` (k × d_out). Their squares are the eigenvalues of the Gram matrix
of ``M`` on its shorter side, which a symmetric eigensolver without vectors returns cheaply.

Precision: X and D are taken in float32 (also for a bf16 model); the Gram matrix and its
eigenvalues are float64. A float32 Gram matrix squares the condition number in single precision
and loses the small singular values (errors near 1e-3 on the nuclear norm); float64 keeps every
metric within 1e-6 of a float64 SVD of the materialized gradient.

When the token count T is close to or above the matrix size, forming ``G`` directly is cheaper
than the factorization; :func:`choose_path` decides per matrix by counting operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METRICS = (
    "nuclear_norm",
    "spectral_norm",
    "spectral_ratio",
    "frobenius_norm",
    "effective_rank",
    "stable_rank",
)

# Relative speeds measured on a 2-core CPU, in units of one float32 matrix-multiply operation:
# a float64 multiply costs about twice that, Householder QR about three times, and a symmetric
# eigensolve (tridiagonalization, mostly memory bound) about twelve. Only the ratios matter.
_QR_COST = 3.0
_F64_COST = 2.0
_EIG_COST = 12.0


@dataclass(frozen=True)
class Spectrum:
    """The singular values of one gradient matrix (float64, descending, rank-trimmed)."""

    values: torch.Tensor

    def metrics(self) -> tuple[float, ...]:
        return metrics_from_singular_values(self.values)


def metrics_from_singular_values(s: torch.Tensor) -> tuple[float, ...]:
    """Nuclear norm, largest singular value, their ratio, Frobenius norm, effective and stable rank.

    Nuclear norm and the largest-over-sum ratio are paper 1's statistics; the effective rank is
    paper 2's (Roy & Vetterli 2007): exp of the Shannon entropy of the singular values normalized
    by their sum. The stable rank is ‖G‖_F² / σ_max².
    """
    s = s.to(torch.float64)
    total = s.sum()
    if total <= 0:
        return (0.0, 0.0, math.nan, 0.0, 0.0, math.nan)
    largest = s.max()
    squares = (s * s).sum()
    p = s[s > 0] / total
    entropy = -(p * torch.log(p)).sum()
    return (
        total.item(),
        largest.item(),
        (largest / total).item(),
        squares.sqrt().item(),
        torch.exp(entropy).item(),
        (squares / (largest * largest)).item(),
    )


def singular_values_from_gram(gram: torch.Tensor, rank_bound: int) -> torch.Tensor:
    """Singular values from a float64 Gram matrix: the roots of its top eigenvalues.

    Only the top ``rank_bound`` eigenvalues can be nonzero; the others are rounding noise.
    """
    eigenvalues = torch.linalg.eigvalsh(gram).flip(-1)[..., :rank_bound]
    return eigenvalues.clamp_min(0).sqrt()


def gram_of(m: torch.Tensor) -> torch.Tensor:
    """The float64 Gram matrix of ``m`` on its shorter side."""
    m = m.to(torch.float64)
    return m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m


def input_factor(x: torch.Tensor) -> torch.Tensor:
    """R of the thin QR of ``xᵀ`` (x: T × d_in, float32): ``x xᵀ = Rᵀ R``, R is min(T, d_in) × T."""
    return torch.linalg.qr(x.T, mode="r")[1]


def spectrum_from_factor(r: torch.Tensor, d: torch.Tensor) -> Spectrum:
    """Singular values of ``Dᵀ X`` from R of ``Xᵀ`` (:func:`input_factor`) and D (T × d_out)."""
    m = r @ d
    rank_bound = min(m.shape)
    return Spectrum(singular_values_from_gram(gram_of(m), rank_bound))


def spectrum_from_dense(x: torch.Tensor, d: torch.Tensor) -> Spectrum:
    """Singular values of ``Dᵀ X`` by forming it: cheaper once T is near the matrix size."""
    g = d.T @ x
    rank_bound = min(*g.shape, x.shape[0])
    return Spectrum(singular_values_from_gram(gram_of(g), rank_bound))


def factor_cost(tokens: int, d_in: int) -> float:
    """Operations for the QR of Xᵀ (d_in × T), shared by every projection reading X."""
    k = min(tokens, d_in)
    long_side = max(tokens, d_in)
    return _QR_COST * (2.0 * long_side * k * k - 2.0 * k**3 / 3.0)


def core_cost(tokens: int, d_in: int, d_out: int) -> float:
    """Operations for one projection on the factor path, QR excluded."""
    k = min(tokens, d_in)
    short, long = sorted((k, d_out))
    return 2.0 * k * tokens * d_out + _F64_COST * 2.0 * short * short * long + _EIG_COST * short**3


def dense_cost(tokens: int, d_in: int, d_out: int) -> float:
    """Operations for one projection on the dense path: form G, its Gram matrix, eigenvalues."""
    short, long = sorted((d_in, d_out))
    return (
        2.0 * tokens * d_in * d_out + _F64_COST * 2.0 * short * short * long + _EIG_COST * short**3
    )


def choose_path(tokens: int, d_in: int, d_outs: tuple[int, ...]) -> str:
    """'factor' or 'dense' for a group of projections reading the same input, by counted cost."""
    factor = factor_cost(tokens, d_in) + sum(core_cost(tokens, d_in, d) for d in d_outs)
    dense = sum(dense_cost(tokens, d_in, d) for d in d_outs)
    return "factor" if factor <= dense else "dense"


def inner_product(x1: torch.Tensor, d1: torch.Tensor, x2: torch.Tensor, d2: torch.Tensor) -> float:
    """⟨D₁ᵀX₁, D₂ᵀX₂⟩ of two gradients of one sample without forming either.

    The Frobenius inner product equals the sum of the entries of (D₁D₂ᵀ) ⊙ (X₁X₂ᵀ), two
    T × T matrices: cheaper than forming both gradients while T is below the matrix sizes.
    """
    tokens_square = d1 @ d2.T
    tokens_square *= x1 @ x2.T
    return tokens_square.to(torch.float64).sum().item()


def cosine(inner: float, norm1: float, norm2: float) -> float:
    """Cosine similarity of two flattened gradients from their inner product and norms."""
    return inner / (norm1 * norm2) if norm1 > 0 and norm2 > 0 else math.nan
