"""Per-sample spectra of every projection's weight gradient, computed inside the backward pass.

Weights stay frozen. A forward hook on each projection keeps, per sample, either its input X or
the small QR factor of X (whichever the counted cost prefers); a hook on the projection's output
receives D, the loss gradient with respect to that output, during backward. There the sample's
singular values are computed from the factors (see :mod:`gradspec.spectra`) and the inputs are
released, so no weight gradient is ever accumulated and at most one is formed at a time.

Projections that read the same tensor (q, k and v; gate and up) are found by identity of that
tensor and share one factorization. GPT-2's fused ``c_attn`` (a Conv1D) is split into q, k, v by
output columns; its transposed weight layout leaves the singular values unchanged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from gradspec import spectra
from gradspec.config import MODULES

log = logging.getLogger(__name__)

_LAYER_MODULE = re.compile(r"(?:^|\.)(\d+)\.(?:self_attn|attn|attention|mlp|feed_forward)\.(\w+)$")

# Leaf names of projections that are one of MODULES under another name, or fused.
_ALIASES = {"c_proj@attn": "o_proj", "c_fc": "up_proj", "c_proj@mlp": "down_proj"}


@dataclass(frozen=True)
class Output:
    """One projection's slice of a module's output columns."""

    module: str
    columns: slice


@dataclass(frozen=True)
class Target:
    name: str
    layer: int
    outputs: tuple[Output, ...]
    d_in: int


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always ships it
        return ()
    return (Conv1D,)


def _shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear or a GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    d_in, d_out = module.weight.shape
    return d_in, d_out


def _split_fused(leaf: str, d_out: int, config) -> tuple[Output, ...] | None:
    """Column slices of fused projections: GPT-2 c_attn, Phi-3 style qkv_proj and gate_up_proj."""
    if leaf == "c_attn":
        width = d_out // 3
        return tuple(
            Output(m, slice(i * width, (i + 1) * width)) for i, m in enumerate(MODULES[:3])
        )
    if leaf == "qkv_proj":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv = getattr(config, "num_key_value_heads", heads) * head_dim
        q = heads * head_dim
        return (Output("q_proj", slice(0, q)), Output("k_proj", slice(q, q + kv)),
                Output("v_proj", slice(q + kv, q + 2 * kv)))  # fmt: skip
    if leaf == "gate_up_proj":
        half = d_out // 2
        return (Output("gate_proj", slice(0, half)), Output("up_proj", slice(half, d_out)))
    return None


def find_projections(
    model: nn.Module, modules: Iterable[str] = MODULES
) -> list[tuple[Target, nn.Module]]:
    """Every projection of every decoder layer, as (target, module), in layer order."""
    wanted = set(modules)
    unknown = wanted - set(MODULES)
    if unknown:
        raise ValueError(f"unknown modules {sorted(unknown)}; valid: {', '.join(MODULES)}")
    linear_types = (nn.Linear, *_conv1d_type())
    found = []
    for name, module in model.named_modules():
        match = _LAYER_MODULE.search(name)
        if not match or not isinstance(module, linear_types):
            continue
        layer, leaf = int(match.group(1)), match.group(2)
        d_in, d_out = _shape(module)
        block = "attn" if re.search(r"\.(self_attn|attn|attention)\.", name) else "mlp"
        outputs = _split_fused(leaf, d_out, model.config)
        if outputs is None:
            leaf = _ALIASES.get(f"{leaf}@{block}", _ALIASES.get(leaf, leaf))
            if leaf not in MODULES:
                continue
            outputs = (Output(leaf, slice(0, d_out)),)
        outputs = tuple(o for o in outputs if o.module in wanted)
        if outputs:
            found.append((Target(name, layer, outputs, d_in), module))
    if not found:
        raise ValueError(
            f"no projections named {', '.join(MODULES)} found in {type(model).__name__}: "
            "this architecture is not supported"
        )
    return sorted(found, key=lambda item: (item[0].layer, item[0].name))


@dataclass
class _SharedInput:
    """One input tensor read by several projections, with its per-sample factors."""

    x: torch.Tensor
    readers: int = 0
    done: int = 0
    paths: dict[int, str] = field(default_factory=dict)
    factors: dict[int, torch.Tensor] = field(default_factory=dict)


class SpectralCapture:
    """Hooks that turn one backward pass into per-sample singular-value metrics.

    Use as a context manager around forward and backward of a batch, after :meth:`begin_batch`:
    ``results[(sample, layer, module)]`` then holds the metric tuple (see ``spectra.METRICS``)
    and ``nonfinite`` the samples whose gradient held a NaN or an infinity.

    With ``cosine=True`` it also gives, in ``cosines[(sample, layer, module)]``, the cosine
    similarity of the flattened gradient with the same projection's in the next layer
    (``"next_layer"``) and, for k_proj and v_proj, of k's with v's in the same layer (``"kv"``).
    Backward reaches layer l + 1 before layer l, so each projection's X and D of one layer are
    kept until the layer below is done: memory for one layer more, not for the model.
    """

    def __init__(self, model: nn.Module, modules: Iterable[str] = MODULES, cosine: bool = False):
        self.model = model
        self.cosine = cosine
        self.targets = find_projections(model, modules)
        self.layers = 1 + max(t.layer for t, _ in self.targets)
        self._handles: list = []
        self._lengths: list[int] = []
        self._inputs: dict[tuple, _SharedInput] = {}
        self.results: dict[tuple[int, int, str], tuple[float, ...]] = {}
        self.nonfinite: dict[int, str] = {}
        self.path_counts = {"factor": 0, "dense": 0}
        self.cosines: dict[tuple[int, int, str], dict[str, float]] = {}
        self._held: dict[tuple[int, str], tuple[int, torch.Tensor, torch.Tensor, float]] = {}

    def __enter__(self) -> SpectralCapture:
        for target, module in self.targets:
            self._handles.append(module.register_forward_hook(self._forward_hook(target)))
        embeddings = self.model.get_input_embeddings()
        self._handles.append(embeddings.register_forward_hook(_require_grad))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()

    def begin_batch(self, lengths: list[int]) -> None:
        """Set how many leading rows of each sample carry gradient (0: skip the sample)."""
        self._lengths = list(lengths)
        self._inputs.clear()
        self.results = {}
        self.nonfinite = {}
        self.cosines = {}
        self._held = {}

    def _forward_hook(self, target: Target):
        d_outs = tuple(o.columns.stop - o.columns.start for o in target.outputs)

        def hook(module, args, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            shared = self._inputs.get(key)
            if shared is None:
                shared = self._inputs[key] = _SharedInput(x.detach())
            shared.readers += len(target.outputs)
            self._prepare_factors(shared, target.d_in, d_outs)
            output.register_hook(lambda grad: self._on_gradient(target, key, grad))

        return hook

    def _prepare_factors(self, shared: _SharedInput, d_in: int, d_outs: tuple[int, ...]) -> None:
        """Choose each sample's path once per input, and factor X now if it pays: R is smaller."""
        for sample, length in enumerate(self._lengths):
            if length <= 0 or sample in shared.paths:
                continue
            path = spectra.choose_path(length, d_in, d_outs)
            shared.paths[sample] = path
            if path == "factor":
                x = shared.x[sample, :length].to(torch.float32)
                shared.factors[sample] = spectra.input_factor(x)

    def _on_gradient(self, target: Target, key: tuple, grad: torch.Tensor) -> None:
        shared = self._inputs[key]
        for sample, length in enumerate(self._lengths):
            if length <= 0 or sample in self.nonfinite:
                continue
            d_all = grad[sample, :length].to(torch.float32)
            if not torch.isfinite(d_all).all():
                self.nonfinite[sample] = f"non-finite gradient at {target.name}"
                continue
            for output in target.outputs:
                d = d_all[:, output.columns]
                if shared.paths[sample] == "factor":
                    spectrum = spectra.spectrum_from_factor(shared.factors[sample], d)
                else:
                    x = shared.x[sample, :length].to(torch.float32)
                    spectrum = spectra.spectrum_from_dense(x, d)
                self.path_counts[shared.paths[sample]] += 1
                metrics = spectrum.metrics()
                self.results[(sample, target.layer, output.module)] = metrics
                if self.cosine:
                    x = shared.x[sample, :length].to(torch.float32)
                    self._pair(sample, target.layer, output.module, x, d, metrics[3])

        shared.done += len(target.outputs)
        if shared.done >= shared.readers:
            del self._inputs[key]

    def _pair(self, sample: int, layer: int, module: str, x, d, norm: float) -> None:
        """Cosines with the layer above (held since its backward) and between k and v."""
        entry = self.cosines.setdefault((sample, layer, module), {})
        above = self._held.get((sample, module))
        if above is not None and above[0] == layer + 1:
            _, x_above, d_above, norm_above = above
            inner = spectra.inner_product(x, d, x_above, d_above)
            entry["next_layer"] = spectra.cosine(inner, norm, norm_above)
        self._held[(sample, module)] = (layer, x, d, norm)

        partner = {"k_proj": "v_proj", "v_proj": "k_proj"}.get(module)
        other = self._held.get((sample, partner)) if partner else None
        if other is not None and other[0] == layer:
            _, x_other, d_other, norm_other = other
            value = spectra.cosine(spectra.inner_product(x, d, x_other, d_other), norm, norm_other)
            entry["kv"] = value
            self.cosines[(sample, layer, partner)]["kv"] = value


def _require_grad(module, args, output):
    """Make the embeddings' output require grad, so a frozen model still backpropagates to D."""
    if torch.is_grad_enabled():
        output.requires_grad_(True)


# Logits are the largest tensor for big vocabularies (Gemma-3: 262k entries, about 1 GB per 1,000
# tokens in float32): they are made for this many entries at a time.
_LOGIT_CHUNK_ENTRIES = 1 << 25
# The loss gradient with respect to the logits is kept from forward, instead of recomputing the
# logits in backward, while the batch's logits have at most this many entries (512 MB in float32):
# one output-head product per token saved, a large share of a small model's pass.
_KEPT_LOGIT_ENTRIES = 1 << 27
# The hidden-state gradient sums over the whole vocabulary. With few rows a float32 product runs
# as one long dot product per entry (errors near 1e-5 at 49k entries, grown to 1e-4 by the
# layers below); summing blocks of this many entries in float64 keeps it near 1e-7.
_VOCAB_BLOCK = 1024


@dataclass
class BatchResult:
    losses: list[float]
    metrics: dict[tuple[int, int, str], tuple[float, ...]]
    # (sample, layer, module) -> {"next_layer": cosine, "kv": cosine}, when asked for
    cosines: dict[tuple[int, int, str], dict[str, float]]
    # sample -> reason, for samples whose loss or gradient was not finite
    nonfinite_loss: dict[int, str]
    nonfinite_gradient: dict[int, str]


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _logits(head: nn.Linear, hidden: torch.Tensor, cap: float | None):
    """The head's raw logits (at least float32) and the logits after the soft cap, if any."""
    raw = _at_least_float32(nn.functional.linear(hidden, head.weight, head.bias))
    return raw, (torch.tanh(raw / cap) * cap if cap else raw)


class _TokenLosses(torch.autograd.Function):
    """Cross-entropy of each supervised position from hidden states, logits never kept whole.

    Forward and backward go over chunks of positions and return the gradient for the hidden
    states only (the output head is frozen). When the batch's logits are small enough, forward
    keeps each chunk's loss gradient with respect to its logits; otherwise backward recomputes it.
    """

    @staticmethod
    def forward(ctx, hidden, targets, head, cap, chunk):
        ctx.save_for_backward(hidden, targets)
        ctx.head, ctx.cap, ctx.chunk = head, cap, chunk
        keep = hidden.shape[0] * head.weight.shape[0] <= _KEPT_LOGIT_ENTRIES
        ctx.kept = []
        losses = []
        for i in range(0, hidden.shape[0], chunk):
            raw, logits = _logits(head, hidden[i : i + chunk], cap)
            chunk_targets = targets[i : i + chunk]
            losses.append(nn.functional.cross_entropy(logits, chunk_targets, reduction="none"))
            if keep:
                ctx.kept.append(_logit_gradient(raw, logits, chunk_targets, cap))
        return torch.cat(losses)

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, targets = ctx.saved_tensors
        head, cap, chunk = ctx.head, ctx.cap, ctx.chunk
        grad_hidden = torch.empty_like(hidden)
        for n, i in enumerate(range(0, hidden.shape[0], chunk)):
            if ctx.kept:
                grad_logits = ctx.kept[n]
            else:
                raw, logits = _logits(head, hidden[i : i + chunk], cap)
                grad_logits = _logit_gradient(raw, logits, targets[i : i + chunk], cap)
            grad_logits *= grad_losses[i : i + chunk, None]
            grad_hidden[i : i + chunk] = _blocked_product(grad_logits, head.weight).to(hidden.dtype)
        ctx.kept = []
        return grad_hidden, None, None, None, None


def _logit_gradient(raw, logits, targets, cap) -> torch.Tensor:
    """d(cross-entropy)/d(raw logits) per row: softmax minus one-hot, through the soft cap."""
    grad = torch.softmax(logits, dim=-1)
    rows = torch.arange(grad.shape[0], device=grad.device)
    grad[rows, targets] -= 1
    if cap:
        grad *= 1 - torch.tanh(raw / cap) ** 2
    return grad


def _blocked_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ right`` summed over blocks of the inner dimension in float64."""
    total = torch.zeros(left.shape[0], right.shape[1], dtype=torch.float64, device=left.device)
    for j in range(0, left.shape[1], _VOCAB_BLOCK):
        block = right[j : j + _VOCAB_BLOCK].to(left.dtype)
        total += (left[:, j : j + _VOCAB_BLOCK] @ block).to(torch.float64)
    return total


def _token_losses(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    chunk = max(1, _LOGIT_CHUNK_ENTRIES // head.weight.shape[0])
    return _TokenLosses.apply(hidden, targets, head, cap, chunk)


def run_batch(
    capture: SpectralCapture,
    input_ids: torch.Tensor,
    prompt_lengths: list[int],
    total_lengths: list[int],
    reduction: str = "mean",
) -> BatchResult:
    """Forward and backward of one right-padded batch; metrics for every sample and projection.

    The loss of each sample is over its response tokens only (positions ``prompt_lengths[b]`` to
    ``total_lengths[b]``), mean or sum. Backpropagating the sum of the per-sample losses gives each
    sample exactly its own gradient, since no sample attends to another.
    """
    model = capture.model
    device = input_ids.device
    batch, width = input_ids.shape
    positions = torch.arange(width, device=device)
    attention_mask = (
        positions[None, :] < torch.tensor(total_lengths, device=device)[:, None]
    ).long()

    # Position t predicts token t + 1: rows p-1 .. n-2 of sample b predict its response. Rows from
    # n-1 on carry no gradient, so each sample's factors use its first n-1 rows only.
    rows, targets, owners = [], [], []
    for b, (p, n) in enumerate(zip(prompt_lengths, total_lengths, strict=True)):
        first = max(p, 1) - 1
        rows.append(b * width + torch.arange(first, n - 1, device=device))
        targets.append(input_ids[b, first + 1 : n])
        owners.append(torch.full((n - 1 - first,), b, device=device))
    rows, targets, owners = torch.cat(rows), torch.cat(targets), torch.cat(owners)
    capture.begin_batch([n - 1 for n in total_lengths])

    with torch.enable_grad():
        hidden = capture.model.base_model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = hidden.last_hidden_state.reshape(batch * width, -1)[rows]
        token_losses = _token_losses(model, hidden, targets)
        sums = torch.zeros(batch, device=device, dtype=token_losses.dtype).index_add(
            0, owners, token_losses
        )
        counts = torch.bincount(owners, minlength=batch).clamp_min(1)
        losses = sums / counts if reduction == "mean" else sums

        finite = torch.isfinite(losses)
        nonfinite_loss = {b: "non-finite loss" for b in range(batch) if not finite[b]}
        for b in nonfinite_loss:
            capture.nonfinite[b] = "non-finite loss"
        if finite.any():
            losses[finite].sum().backward()

    metrics = {k: v for k, v in capture.results.items() if k[0] not in capture.nonfinite}
    nonfinite_gradient = {b: r for b, r in capture.nonfinite.items() if b not in nonfinite_loss}
    cosines = {k: v for k, v in capture.cosines.items() if k[0] not in capture.nonfinite}
    return BatchResult(
        losses.detach().tolist(), metrics, cosines, nonfinite_loss, nonfinite_gradient
    )
