"""Per-sample spectra from the backward pass against the papers' method on real models.

The reference is what the papers' code does: weights require grad, the loss is Hugging Face's own
causal-LM loss with the prompt masked, and each weight gradient is materialized and decomposed by
a float64 SVD. The fixtures are the papers' own code's numbers for the first 4 GSM8K records.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from gradspec import capture as capture_module
from gradspec import data, prompts
from gradspec.capture import SpectralCapture, find_projections, run_batch
from gradspec.config import MODULES
from gradspec.models import load_model
from gradspec.spectra import METRICS, metrics_from_singular_values

FIXTURE = "tests/fixtures/reference_stats/gsm8k_train_with_cot_gpt4o.first4.jsonl"
COMPARED = ("nuclear_norm", "spectral_norm", "frobenius_norm", "effective_rank")


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model(smollm2_dir)


@pytest.fixture(scope="module")
def smollm2_float64(smollm2):
    """The same weights in float64, so that the reference gradient is exact to rounding and the
    engine's float32 factors are the approximation measured."""
    model, tokenizer = smollm2
    return copy.deepcopy(model).to(torch.float64), tokenizer


def pad_batch(sequences: list[list[int]], pad: int = 0) -> torch.Tensor:
    ids = torch.full((len(sequences), max(map(len, sequences))), pad, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
    return ids


def materialized_metrics(model, ids: list[int], n_prompt: int) -> dict[tuple[int, str], tuple]:
    """The papers' method on one sample: loss on the response, weight gradients, SVD of each."""
    targets = find_projections(model)
    for _, module in targets:
        module.weight.requires_grad_(True)
        module.weight.grad = None
    # Hugging Face's own loss would cast the logits to float32; the reference stays in float64.
    input_ids = torch.tensor([ids])
    with torch.enable_grad():
        logits = model(input_ids=input_ids).logits[0, n_prompt - 1 : -1]
        nn.functional.cross_entropy(logits, input_ids[0, n_prompt:]).backward()

    found = {}
    for target, module in targets:
        grad = module.weight.grad
        for output in target.outputs:
            is_conv1d = not isinstance(module, torch.nn.Linear)
            part = grad[:, output.columns] if is_conv1d else grad[output.columns]
            found[(target.layer, output.module)] = metrics_from_singular_values(
                torch.linalg.svdvals(part)
            )
        module.weight.requires_grad_(False)
        module.weight.grad = None
    return found


def engine_metrics(model, batch: list[tuple[list[int], int]], cosine: bool = False):
    with SpectralCapture(model, cosine=cosine) as capture:
        ids = pad_batch([seq for seq, _ in batch])
        result = run_batch(capture, ids, [p for _, p in batch], [len(s) for s, _ in batch])
    return result, capture


def worst_relative_error(got: dict, want: dict, names=COMPARED) -> float:
    worst = 0.0
    for key, reference in want.items():
        for name in names:
            i = METRICS.index(name)
            worst = max(worst, abs(got[key][i] - reference[i]) / abs(reference[i]))
    return worst


def encode_base(tokenizer, instruction: str, output: str, max_length=4096) -> tuple[list[int], int]:
    record = data.Record(0, "x", instruction, "", output)
    encoded = prompts.encode_record(record, tokenizer, "base", None, max_length)
    return encoded.input_ids, encoded.n_prompt_tokens


def test_matches_the_papers_reference_statistics(smollm2):
    model, tokenizer = smollm2
    with open(FIXTURE) as handle:
        references = [json.loads(line) for line in handle]
    batch = [encode_base(tokenizer, r["instruction"], r["output"], 1024) for r in references]

    result, _ = engine_metrics(model, batch)

    worst = 0.0
    for b, reference in enumerate(references):
        assert result.losses[b] == pytest.approx(reference["loss"], rel=1e-5)
        for layer in range(30):
            for module in MODULES[:4]:
                stats = reference[f"model.layers.{layer}.self_attn.{module}.weight"]
                got = result.metrics[(b, layer, module)]
                for key, name in [("S_sum", "nuclear_norm"), ("S_max", "spectral_norm"),
                                  ("frobenius_norm", "frobenius_norm")]:  # fmt: skip
                    want = stats[key]
                    worst = max(worst, abs(got[METRICS.index(name)] - want) / want)
    assert worst < 1e-4


# (file, record, token limit): T below, near and above SmolLM2's widths 192, 576 and 1536.
SAMPLES = {
    "short": ("layer_gradient/cot_500/gsm8k_train_no_cot.json", 0, 4096),
    "near": ("layer_gradient/wiki_popularity/popular_wikipedia_1000.json", 0, 600),
    "long": ("layer_gradient/wiki_popularity/popular_wikipedia_1000.json", 0, 4096),
    "longest": ("gradient_unified/reasoning/s1_R1.json", 0, 1700),
}


@pytest.mark.parametrize("sample", SAMPLES)
def test_every_projection_matches_float64_svd_of_the_gradient(smollm2_float64, sample):
    model, tokenizer = smollm2_float64
    path, index, limit = SAMPLES[sample]
    record = data.load_records(data.resolve_data_path("resources/datasets", path))[index]
    ids, n_prompt = encode_base(tokenizer, record.instruction, record.output, max_length=limit)

    want = materialized_metrics(model, ids, n_prompt)
    result, capture = engine_metrics(model, [(ids, n_prompt)])

    got = {(layer, module): v for (_, layer, module), v in result.metrics.items()}
    assert set(got) == set(want) and len(got) == 30 * 7
    assert worst_relative_error(got, want) < 1e-5
    assert capture.path_counts["factor" if len(ids) < 300 else "dense"] > 0


def test_results_do_not_depend_on_the_batch(smollm2):
    model, tokenizer = smollm2
    records = data.load_records(
        data.resolve_data_path(
            "resources/datasets", "layer_gradient/cot_500/gsm8k_train_with_cot.json"
        )
    )
    batch = [encode_base(tokenizer, r.instruction, r.output) for r in records[:8]]
    assert len({len(ids) for ids, _ in batch}) > 4, "mixed lengths"

    together, _ = engine_metrics(model, batch)
    worst = 0.0
    for b, sample in enumerate(batch):
        alone, _ = engine_metrics(model, [sample])
        assert alone.losses[0] == pytest.approx(together.losses[b], rel=1e-5)
        for (_, layer, module), values in alone.metrics.items():
            for a, t in zip(values, together.metrics[(b, layer, module)], strict=True):
                worst = max(worst, abs(a - t) / abs(t))
    assert worst < 1e-5


def test_logit_gradient_kept_or_recomputed_gives_the_same_spectra(smollm2, monkeypatch):
    """Forward keeps the logits' gradient while it is small; a larger batch recomputes it."""
    model, tokenizer = smollm2
    batch = [encode_base(tokenizer, "What is 12 times 7?", "12 times 7 is 84. The answer is 84.")]
    kept, _ = engine_metrics(model, batch)
    monkeypatch.setattr(capture_module, "_KEPT_LOGIT_ENTRIES", 0)
    recomputed, _ = engine_metrics(model, batch)

    assert recomputed.losses == kept.losses
    worst = max(
        abs(a - b) / abs(b)
        for key, values in kept.metrics.items()
        for a, b in zip(recomputed.metrics[key], values, strict=True)
        if b != 0
    )
    assert worst < 1e-6


def test_gpt2_conv1d_and_fused_qkv():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=97)
    model = GPT2LMHeadModel(config).eval().requires_grad_(False)
    names = {(t.layer, o.module) for t, _ in find_projections(model) for o in t.outputs}
    assert names == {(l, m) for l in range(2) for m in MODULES if m != "gate_proj"}  # noqa: E741

    ids = torch.randint(0, 97, (40,)).tolist()
    want = materialized_metrics(model, ids, n_prompt=10)
    result, _ = engine_metrics(model, [(ids, 10)])

    got = {(layer, module): v for (_, layer, module), v in result.metrics.items()}
    assert set(got) == set(want)
    assert worst_relative_error(got, want) < 1e-5


def test_bfloat16_model_is_measured_in_float32():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=101)  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval().requires_grad_(False)
    ids = torch.randint(0, 101, (30,)).tolist()

    result, _ = engine_metrics(model, [(ids, 5)])

    assert len(result.metrics) == 2 * 7
    assert all(math.isfinite(v[0]) and v[0] > 0 for v in result.metrics.values())


def test_nonfinite_gradient_is_reported_for_that_sample_only():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=50)  # fmt: skip
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    poisoned = 49
    model.get_input_embeddings().weight[poisoned] = float("inf")
    clean = torch.randint(0, 40, (12,)).tolist()
    bad = clean[:6] + [poisoned] + clean[6:]

    result, _ = engine_metrics(model, [(clean, 4), (bad, 4)])

    assert 1 in result.nonfinite_loss or 1 in result.nonfinite_gradient
    assert 0 not in result.nonfinite_loss and 0 not in result.nonfinite_gradient
    assert {b for b, _, _ in result.metrics} == {0}


def test_cosines_from_factors_match_materialized_gradients(smollm2_float64):
    model, tokenizer = smollm2_float64
    path, index, _ = SAMPLES["short"]
    record = data.load_records(data.resolve_data_path("resources/datasets", path))[index]
    ids, n_prompt = encode_base(tokenizer, record.instruction, record.output)

    targets = find_projections(model)
    for _, module in targets:
        module.weight.requires_grad_(True)
    input_ids = torch.tensor([ids])
    with torch.enable_grad():
        logits = model(input_ids=input_ids).logits[0, n_prompt - 1 : -1]
        nn.functional.cross_entropy(logits, input_ids[0, n_prompt:]).backward()
    grads = {(t.layer, t.outputs[0].module): m.weight.grad.flatten().clone() for t, m in targets}
    for _, module in targets:
        module.weight.requires_grad_(False)
        module.weight.grad = None

    result, _ = engine_metrics(model, [(ids, n_prompt)], cosine=True)

    def cos(a, b):
        return (a @ b / (a.norm() * b.norm())).item()

    worst = 0.0
    for (layer, module), grad in grads.items():
        entry = result.cosines[(0, layer, module)]
        if layer + 1 < 30:
            worst = max(worst, abs(entry["next_layer"] - cos(grad, grads[(layer + 1, module)])))
        else:
            assert "next_layer" not in entry
        if module in ("k_proj", "v_proj"):
            worst = max(
                worst, abs(entry["kv"] - cos(grads[(layer, "k_proj")], grads[(layer, "v_proj")]))
            )
    assert worst < 1e-6
