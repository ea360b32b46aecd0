"""IFD against a direct computation with the model's own loss (Hugging Face ``labels=``)."""

from __future__ import annotations

import math

import pytest
import torch

from gradspec import prompts
from gradspec.data import Record
from gradspec.ifd import ifd_scores, response_alone
from gradspec.models import load_model

RECORDS = [
    Record(0, "a", "Name a primary colour.", "", "Red is a primary colour."),
    Record(1, "b", "Add 2 and 3.", "", "2 + 3 = 5, so the answer is 5."),
    Record(2, "c", "Say nothing.", "", ""),
]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model(smollm2_dir, device="cpu")


def hf_loss(model, ids: list[int], labels: list[int]) -> float:
    """The model's mean cross-entropy over the labels that are not -100 (HF shifts them)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
    return out.loss.item()


def direct_ifd(model, tokenizer, record: Record) -> tuple[float, float, float]:
    prompt = tokenizer.encode(prompts.base_prompt(record), add_special_tokens=False)
    response = tokenizer.encode(record.output, add_special_tokens=False)
    conditioned = hf_loss(model, prompt + response, [-100] * len(prompt) + response)
    # SmolLM2 puts no BOS in front of a text: the response alone is the response's ids.
    alone = hf_loss(model, response, response)
    return math.exp(conditioned), math.exp(alone), math.exp(conditioned) / math.exp(alone)


def test_ifd_matches_direct_computation(smollm2):
    model, tokenizer = smollm2
    assert not prompts.adds_bos(tokenizer)
    scores = ifd_scores(model, tokenizer, RECORDS, "base", None, 1024, batch_size=2)

    for record in RECORDS[:2]:
        row = scores.iloc[record.index]
        ppl_c, ppl_u, ifd = direct_ifd(model, tokenizer, record)
        assert row.status == "ok"
        assert row.ppl_conditioned == pytest.approx(ppl_c, rel=1e-4)
        assert row.ppl_unconditioned == pytest.approx(ppl_u, rel=1e-4)
        assert row.ifd == pytest.approx(ifd, rel=1e-4)
        assert row.n_response_tokens == len(tokenizer.encode(record.output))

    empty = scores.iloc[2]
    assert empty.status == "empty_response" and math.isnan(empty.ifd)


def test_batch_does_not_change_scores(smollm2):
    model, tokenizer = smollm2
    together = ifd_scores(model, tokenizer, RECORDS[:2], "base", None, 1024, batch_size=2)
    alone = ifd_scores(model, tokenizer, RECORDS[:2], "base", None, 1024, batch_size=1)
    assert together.ifd.to_list() == pytest.approx(alone.ifd.to_list(), rel=1e-5)


class _BosTokenizer:
    bos_token_id = 7

    def encode(self, text, add_special_tokens=True):
        return [7, 1] if add_special_tokens else [1]


def test_response_alone_prefix():
    """With BOS every response token is scored; without, the first has no context."""
    assert response_alone([4, 5], _BosTokenizer()) == ([7, 4, 5], 1)
