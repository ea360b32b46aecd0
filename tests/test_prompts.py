"""prompts.py with the real SmolLM2 and Gemma-3 tokenizers; no forward passes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from gradspec import data, prompts
from gradspec.config import compose
from gradspec.data import Record

GSM8K_DETAILED = "layer_gradient/cot_500/gsm8k_train_with_cot_gpt4o.json"
REFERENCE = "tests/fixtures/reference_stats/gsm8k_train_with_cot_gpt4o.first4.jsonl"
SYSTEM = "You are a careful grader of arithmetic."


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def gemma3(gemma3_dir: Path):
    return AutoTokenizer.from_pretrained(gemma3_dir)


@pytest.fixture(scope="module")
def gsm8k(repo_root: Path) -> list[Record]:
    path = data.resolve_data_path(repo_root / "resources" / "datasets", GSM8K_DETAILED)
    return data.load_records(path)[:8]


def record(instruction: str, output: str, input: str = "", messages=None) -> Record:
    return Record(0, "0" * 16, instruction, input, output, messages)


def response_text(encoded: prompts.Encoded, tokenizer) -> str:
    return tokenizer.decode(encoded.input_ids[encoded.n_prompt_tokens :])


# --------------------------------------------------------------------------------------------
# Compatibility with the reference statistics


def test_separate_tokenization_equals_the_reference_encoding(smollm2, repo_root: Path, gsm8k):
    """The reference encoded instruction + newline + output in one piece; ids must agree."""
    lines = (repo_root / REFERENCE).read_text(encoding="utf-8").splitlines()
    references = [json.loads(line) for line in lines]
    assert len(references) == 4

    for reference, rec in zip(references, gsm8k, strict=False):
        assert (reference["instruction"], reference["output"]) == (rec.instruction, rec.output)
        one_piece = smollm2.encode(rec.instruction + "\n" + rec.output)[:1024]
        start = len(smollm2.encode(rec.instruction + "\n"))

        encoded = prompts.encode_record(rec, smollm2, "base", None, 1024)

        assert encoded.input_ids == one_piece
        assert encoded.n_prompt_tokens == start
        assert encoded.status == "ok" and not encoded.truncated


# --------------------------------------------------------------------------------------------
# The base template


def test_base_prompt_with_and_without_input():
    assert prompts.base_prompt(record("Do this.", "ok")) == "Do this.\n"
    assert prompts.base_prompt(record("Do this.", "ok", input="with that")) == (
        "Do this.\nwith that\n"
    )


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_base_prompt_ids_are_a_prefix_and_span_is_the_response(name, request, gsm8k):
    tokenizer = request.getfixturevalue(name)
    for rec in gsm8k:
        encoded = prompts.encode_record(rec, tokenizer, "base", None, 4096)
        prompt_ids = tokenizer.encode(encoded.prompt_text, add_special_tokens=False)
        if prompts.adds_bos(tokenizer):
            prompt_ids = [tokenizer.bos_token_id, *prompt_ids]

        assert encoded.prompt_text == rec.instruction + "\n"
        assert encoded.input_ids[: encoded.n_prompt_tokens] == prompt_ids
        assert response_text(encoded, tokenizer) == rec.output
        assert encoded.n_response_tokens == encoded.n_response_tokens_full > 0
        assert len(encoded.input_ids) == encoded.n_prompt_tokens + encoded.n_response_tokens


def test_bos_once_for_gemma_and_never_for_smollm2_base(smollm2, gemma3, gsm8k):
    assert prompts.adds_bos(gemma3) and not prompts.adds_bos(smollm2)

    for rec in gsm8k:
        gemma_ids = prompts.encode_record(rec, gemma3, "base", None, 4096).input_ids
        smol_ids = prompts.encode_record(rec, smollm2, "base", None, 4096).input_ids

        assert gemma_ids[0] == gemma3.bos_token_id
        assert gemma_ids.count(gemma3.bos_token_id) == 1
        assert smollm2.bos_token_id not in smol_ids


def test_gemma_prompt_with_its_own_bos_gets_no_second_one(gemma3):
    encoded = prompts.encode_record(record("<bos>Say hi.", "hi"), gemma3, "base", None, 64)
    assert encoded.input_ids.count(gemma3.bos_token_id) == 1
    assert encoded.input_ids[0] == gemma3.bos_token_id


# --------------------------------------------------------------------------------------------
# The chat template


def test_chat_prompt_holds_the_system_prompt_and_user_turn(smollm2, gsm8k):
    rec = replace(gsm8k[0], input="extra context")
    encoded = prompts.encode_record(rec, smollm2, "chat", SYSTEM, 4096)

    assert SYSTEM in encoded.prompt_text
    assert rec.instruction + "\nextra context" in encoded.prompt_text
    assert encoded.prompt_text.endswith("<|im_start|>assistant\n")
    assert encoded.input_ids[: encoded.n_prompt_tokens] == smollm2.encode(
        encoded.prompt_text, add_special_tokens=False
    )
    assert response_text(encoded, smollm2) == rec.output
    assert encoded.input_ids[0] == smollm2.bos_token_id != encoded.input_ids[1]


def test_chat_without_system_prompt_leaves_ours_out(smollm2, gsm8k):
    encoded = prompts.encode_record(gsm8k[0], smollm2, "chat", None, 4096)
    assert SYSTEM not in encoded.prompt_text
    assert gsm8k[0].instruction in encoded.prompt_text


def test_chat_record_uses_its_own_turns(smollm2):
    turns = (
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "second answer"},
    )
    rec = record("second question", "second answer", messages=turns)
    encoded = prompts.encode_record(rec, smollm2, "chat", SYSTEM, 4096)

    assert "first question" in encoded.prompt_text and "first answer" in encoded.prompt_text
    assert "second answer" not in encoded.prompt_text
    assert SYSTEM in encoded.prompt_text
    assert response_text(encoded, smollm2) == "second answer"


def test_chat_template_missing_is_a_clear_error(gemma3, gsm8k):
    with pytest.raises(ValueError, match=r"gemma3_270m.*no chat template"):
        prompts.encode_record(gsm8k[0], gemma3, "chat", SYSTEM, 4096)


def test_template_comes_from_the_model_unless_set():
    assert prompts.resolve_template(compose(["model=smollm2_135m_instruct"])) == "chat"
    assert prompts.resolve_template(compose(["model=gemma3_270m"])) == "base"
    assert prompts.resolve_template(compose(["prompt.template=base"])) == "base"
    with pytest.raises(ValueError, match="prompt.template"):
        prompts.resolve_template(compose(["prompt.template=alpaca"]))


# --------------------------------------------------------------------------------------------
# Truncation, empty responses, EOS


def test_truncation_cuts_the_response_first(smollm2, gsm8k):
    full = prompts.encode_record(gsm8k[0], smollm2, "base", None, 4096)
    n_prompt = full.n_prompt_tokens

    cut = prompts.encode_record(gsm8k[0], smollm2, "base", None, n_prompt + 5)
    assert cut.truncated and cut.status == "ok"
    assert cut.input_ids == full.input_ids[: n_prompt + 5]
    assert (cut.n_prompt_tokens, cut.n_response_tokens) == (n_prompt, 5)
    assert cut.n_response_tokens_full == full.n_response_tokens_full

    for max_length in (n_prompt, n_prompt - 3):
        gone = prompts.encode_record(gsm8k[0], smollm2, "base", None, max_length)
        assert gone.truncated and gone.status == "response_truncated"
        assert gone.n_response_tokens == 0 and len(gone.input_ids) == max_length

    exact = prompts.encode_record(gsm8k[0], smollm2, "base", None, len(full.input_ids))
    assert not exact.truncated and exact.status == "ok"


@pytest.mark.parametrize("append_eos", [False, True])
def test_empty_output_has_its_own_status(smollm2, append_eos: bool):
    encoded = prompts.encode_record(
        record("Say nothing.", ""), smollm2, "base", None, 64, append_eos
    )

    assert encoded.status == "empty_response"
    assert encoded.n_response_tokens == encoded.n_response_tokens_full == 0
    assert len(encoded.input_ids) == encoded.n_prompt_tokens > 0


def test_append_eos_closes_the_response(smollm2, gemma3, gsm8k):
    im_end = smollm2.convert_tokens_to_ids("<|im_end|>")
    cases = [(smollm2, "chat", im_end), (smollm2, "base", smollm2.eos_token_id)]
    cases.append((gemma3, "base", gemma3.eos_token_id))

    for tokenizer, template, closing in cases:
        plain = prompts.encode_record(gsm8k[1], tokenizer, template, SYSTEM, 4096)
        closed = prompts.encode_record(gsm8k[1], tokenizer, template, SYSTEM, 4096, True)

        assert closed.input_ids == [*plain.input_ids, closing]
        assert closed.n_response_tokens == plain.n_response_tokens + 1
        assert closed.n_prompt_tokens == plain.n_prompt_tokens


def test_invalid_record_is_passed_through(smollm2):
    bad = Record(3, "f" * 16, "q", "", "", None, "invalid_record", "field 'output' is missing")
    encoded = prompts.encode_record(bad, smollm2, "base", None, 64)

    assert encoded.status == "invalid_record"
    assert encoded.reason == "field 'output' is missing"
    assert encoded.input_ids == []


def test_labels_mask_the_prompt(smollm2, gsm8k):
    encoded = prompts.encode_record(gsm8k[2], smollm2, "base", None, 4096)
    labels = encoded.labels()

    assert labels[: encoded.n_prompt_tokens] == [-100] * encoded.n_prompt_tokens
    assert labels[encoded.n_prompt_tokens :] == encoded.input_ids[encoded.n_prompt_tokens :]
