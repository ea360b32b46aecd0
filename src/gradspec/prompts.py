"""Turn a record into token ids and a response mask: the step between data and gradients.

The loss whose gradients are measured covers the response tokens only, so the boundary between
prompt and response must be exact. The prompt and the response are therefore tokenized separately
and concatenated: the response span is known by construction instead of being guessed from a
re-tokenization of the joined text. Two templates:

- ``base``, the papers' own: ``instruction + "\\n"`` (plus ``input + "\\n"`` when there is one),
  then the output;
- ``chat``, the tokenizer's chat template, rendered up to the assistant's turn, then the output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from omegaconf import DictConfig

from gradspec.data import INVALID, Record

log = logging.getLogger(__name__)

TEMPLATES = ("base", "chat")
OK = "ok"
EMPTY_RESPONSE = "empty_response"
RESPONSE_TRUNCATED = "response_truncated"
IGNORE_INDEX = -100

# Stands in for an assistant reply so that what a template writes after a reply can be found.
_PROBE = "\u2063probe-reply\u2063"


@dataclass
class Encoded:
    """The ids of one prompt + response, with the response span and what happened to it."""

    input_ids: list[int]
    n_prompt_tokens: int
    n_response_tokens: int
    n_response_tokens_full: int
    truncated: bool
    status: str
    reason: str
    prompt_text: str

    @property
    def response_start(self) -> int:
        return self.n_prompt_tokens

    def labels(self, ignore_index: int = IGNORE_INDEX) -> list[int]:
        """Causal-LM labels: the prompt masked out, the response supervised."""
        masked = [ignore_index] * self.n_prompt_tokens
        return masked + self.input_ids[self.n_prompt_tokens :]


def resolve_template(cfg: DictConfig) -> str:
    """``prompt.template`` if set, else the model's own default."""
    template = cfg.prompt.template or cfg.model.template
    if template not in TEMPLATES:
        raise ValueError(f"prompt.template must be one of {', '.join(TEMPLATES)}, not {template!r}")
    return template


def user_text(record: Record) -> str:
    """The user's turn of an Alpaca record: the instruction, then the input when there is one."""
    return record.instruction + ("\n" + record.input if record.input else "")


def base_prompt(record: Record) -> str:
    """The papers' template; the newline after the instruction is part of the prompt."""
    if record.input:
        return record.instruction + "\n" + record.input + "\n"
    return record.instruction + "\n"


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of {_tokenizer_name(tokenizer)!r} has no chat template; "
            "use prompt.template=base for this model"
        )


def prompt_messages(record: Record, system_prompt: str | None) -> list[dict]:
    """The turns before the response: a chat record's own, or a user turn built from the record.

    The system prompt is added unless it is None or the record already opens with a system turn.
    """
    if record.messages is not None:
        last = max(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
        turns = [dict(m) for m in record.messages[:last]]
    else:
        turns = [{"role": "user", "content": user_text(record)}]
    has_system = bool(turns) and turns[0]["role"] == "system"
    if system_prompt is not None and not has_system:
        turns.insert(0, {"role": "system", "content": system_prompt})
    return turns


def chat_prompt(record: Record, tokenizer, system_prompt: str | None) -> str:
    _require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(
        prompt_messages(record, system_prompt), add_generation_prompt=True, tokenize=False
    )


def render_prompt(record: Record, tokenizer, template: str, system_prompt: str | None) -> str:
    if template == "base":
        return base_prompt(record)
    if template == "chat":
        return chat_prompt(record, tokenizer, system_prompt)
    raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, not {template!r}")


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's default encode starts with BOS (Gemma's does, SmolLM2's does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer.encode("a")
    return bool(ids) and ids[0] == bos


def end_of_turn_id(tokenizer, template: str) -> int:
    """The token that closes a reply: the chat template's end of turn, else the EOS token.

    Found by rendering a probe reply and reading the first special token the template writes
    after it, so no model's marker is hard-coded here.
    """
    if template == "chat":
        _require_chat_template(tokenizer)
        probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _PROBE}]
        rendered = tokenizer.apply_chat_template(probe, tokenize=False)
        if _PROBE in rendered:
            after = rendered.split(_PROBE, 1)[1]
            special = set(tokenizer.all_special_ids)
            for token in tokenizer.encode(after, add_special_tokens=False):
                if token in special:
                    return token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {_tokenizer_name(tokenizer)!r} has no EOS token")
    return tokenizer.eos_token_id


def _prompt_ids(prompt_text: str, tokenizer) -> list[int]:
    """The prompt's ids with exactly one leading BOS where the tokenizer uses one, else none."""
    ids = tokenizer.encode(prompt_text, add_special_tokens=False)
    if not adds_bos(tokenizer):
        return ids
    bos = tokenizer.bos_token_id
    while len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids if ids and ids[0] == bos else [bos, *ids]


def _invalid(record: Record) -> Encoded:
    return Encoded([], 0, 0, 0, False, INVALID, record.reason, "")


def encode_record(
    record: Record,
    tokenizer,
    template: str,
    system_prompt: str | None,
    max_length: int,
    append_eos: bool = False,
) -> Encoded:
    """The ids of ``prompt + response``, cut at ``max_length`` from the right (response first)."""
    if record.status == INVALID:
        return _invalid(record)
    if max_length < 1:
        raise ValueError(f"prompt.max_length must be >= 1, not {max_length}")

    prompt_text = render_prompt(record, tokenizer, template, system_prompt)
    prompt = _prompt_ids(prompt_text, tokenizer)
    response = tokenizer.encode(record.output, add_special_tokens=False)
    if response and append_eos:
        response.append(end_of_turn_id(tokenizer, template))

    ids = (prompt + response)[:max_length]
    n_prompt = min(len(prompt), max_length)
    n_response = len(ids) - n_prompt
    truncated = len(prompt) + len(response) > max_length

    if not response:
        status, reason = EMPTY_RESPONSE, "output is empty"
    elif n_response == 0:
        status = RESPONSE_TRUNCATED
        reason = f"the prompt takes {len(prompt)} of max_length={max_length} tokens"
    else:
        status, reason = OK, ""
    return Encoded(ids, n_prompt, n_response, len(response), truncated, status, reason, prompt_text)
