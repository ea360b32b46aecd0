"""The spectral math against float64 SVD of the materialized gradient, on random factors."""

from __future__ import annotations

import math

import pytest
import torch

from gradspec import spectra

# Shapes of SmolLM2-135M's projections (d_in, d_out), and token counts below, near and above them.
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
TOKENS = [7, 150, 190, 570, 600, 1600]


def reference_metrics(g: torch.Tensor) -> tuple[float, ...]:
    s = torch.linalg.svdvals(g.to(torch.float64))
    return spectra.metrics_from_singular_values(s)


def factors(tokens: int, d_in: int, d_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and output gradients with decaying scales, like real activations and gradients."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=gen) * torch.logspace(0, -2, d_in)
    d = torch.randn(tokens, d_out, generator=gen) * torch.logspace(-3, -5, d_out)
    return x.float(), d.float()


def assert_close(got, want, rel=1e-5):
    for name, a, b in zip(spectra.METRICS, got, want, strict=True):
        assert math.isclose(a, b, rel_tol=rel), f"{name}: {a} against {b}"


@pytest.mark.parametrize("d_in,d_out", SHAPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_both_paths_match_float64_svd(tokens, d_in, d_out):
    x, d = factors(tokens, d_in, d_out, seed=tokens + d_in + d_out)
    want = reference_metrics(d.double().T @ x.double())

    factor = spectra.spectrum_from_factor(spectra.input_factor(x), d)
    dense = spectra.spectrum_from_dense(x, d)

    assert_close(factor.metrics(), want)
    assert_close(dense.metrics(), want)
    assert factor.values.numel() == min(tokens, d_in, d_out)


def test_metrics_by_hand():
    # σ = (3, 1): nuclear 4, largest 3, ratio 3/4, Frobenius √10, stable rank 10/9,
    # effective rank exp(-(3/4 ln 3/4 + 1/4 ln 1/4)).
    got = spectra.metrics_from_singular_values(torch.tensor([3.0, 1.0, 0.0]))
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    want = (4.0, 3.0, 0.75, math.sqrt(10.0), math.exp(entropy), 10.0 / 9.0)
    assert_close(got, want, rel=1e-12)


def test_zero_gradient_has_zero_norms():
    nuclear, largest, ratio, frobenius, effective, stable = spectra.metrics_from_singular_values(
        torch.zeros(4)
    )
    assert (nuclear, largest, frobenius, effective) == (0.0, 0.0, 0.0, 0.0)
    assert math.isnan(ratio) and math.isnan(stable)


def test_rank_one_gradient_has_effective_rank_one():
    x, d = factors(1, 64, 32, seed=1)
    spectrum = spectra.spectrum_from_factor(spectra.input_factor(x), d)
    assert spectrum.metrics()[4] == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize(
    "tokens,d_in,d_outs,expected",
    [(20, 576, (576, 192, 192), "factor"), (4000, 576, (576, 192, 192), "dense")],
)
def test_path_choice_follows_counted_cost(tokens, d_in, d_outs, expected):
    assert spectra.choose_path(tokens, d_in, d_outs) == expected
