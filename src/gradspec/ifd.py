"""Instruction-Following Difficulty of each record under the analysis model (no gradients).

IFD (Li et al. 2024, "From Quantity to Quality: Boosting LLM Performance with Self-Guided Data
Selection for Instruction Tuning", NAACL) compares how well the model predicts a response with
and without its instruction:

    IFD = PPL(response | instruction) / PPL(response)
    PPL(...) = exp( mean over the scored response tokens of -log p(token | preceding tokens) )

A value near 1 says the instruction hardly helps the model produce the response (a hard
instruction, the kind that paper selects); a value near 0 says the response follows almost
deterministically from the instruction. Above 1 the instruction makes the response less likely.

The two contexts:

- conditioned: the record as :func:`gradspec.prompts.encode_record` encodes it for the gradients
  (same template, system prompt and ``prompt.max_length``); every kept response token is scored,
  the first one predicted from the prompt's last token;
- response alone: the same kept response tokens, preceded by BOS where the tokenizer puts one in
  front of a text (Gemma) and by nothing where it does not (SmolLM2). Without BOS the first
  response token has no context, so it is not scored there: the unconditioned mean is over tokens
  2..n, as a causal LM's shifted loss on the response alone gives.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from gradspec import prompts
from gradspec.data import Record

log = logging.getLogger(__name__)

COLUMNS = (
    "record_index",
    "sample_id",
    "ifd",
    "ppl_conditioned",
    "ppl_unconditioned",
    "n_response_tokens",
    "status",
    "reason",
)
# Logit entries computed at a time: Gemma-3's 262k vocabulary makes logits the largest tensor.
_LOGIT_CHUNK_ENTRIES = 1 << 24


@dataclass(frozen=True)
class Pair:
    """The two encodings of one record: ids and the position where scored targets start."""

    conditioned: list[int]
    conditioned_start: int
    alone: list[int]
    alone_start: int


def response_alone(response_ids: list[int], tokenizer) -> tuple[list[int], int]:
    """The response's ids with BOS in front where the tokenizer uses one, and the first scored
    position: 0 after BOS, else 1 (the first token has nothing to be predicted from)."""
    if prompts.adds_bos(tokenizer):
        return [tokenizer.bos_token_id, *response_ids], 1
    return list(response_ids), 1 if response_ids else 0


def encode_pair(record: Record, tokenizer, template: str, system_prompt, max_length: int):
    """The conditioned and response-alone encodings of a record, or its non-ok status."""
    encoded = prompts.encode_record(record, tokenizer, template, system_prompt, max_length)
    if encoded.status != prompts.OK:
        return encoded, None
    response = encoded.input_ids[encoded.n_prompt_tokens :]
    alone, alone_start = response_alone(response, tokenizer)
    pair = Pair(encoded.input_ids, encoded.n_prompt_tokens, alone, alone_start)
    return encoded, pair


def _logits(head: nn.Module, hidden: torch.Tensor, cap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def mean_token_losses(model, sequences: list[list[int]], starts: list[int], pad_id: int):
    """Mean cross-entropy of tokens ``starts[i] ..`` of each sequence given the tokens before.

    One right-padded forward pass for the batch; logits only for the scored positions, in
    chunks. A sequence with nothing to score gets NaN.
    """
    device = model.device
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device))
    hidden = hidden.last_hidden_state

    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    chunk = max(1, _LOGIT_CHUNK_ENTRIES // head.weight.shape[0])
    means = []
    for row, (sequence, start) in enumerate(zip(sequences, starts, strict=True)):
        first = max(start, 1)
        if first >= len(sequence):
            means.append(math.nan)
            continue
        positions = torch.arange(first - 1, len(sequence) - 1, device=device)
        targets = ids[row, first:].to(device)[: positions.numel()]
        total = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(0, positions.numel(), chunk):
            logits = _logits(head, hidden[row, positions[i : i + chunk]], cap)
            losses = nn.functional.cross_entropy(logits, targets[i : i + chunk], reduction="sum")
            total += losses.double()
        means.append((total / positions.numel()).item())
    return means


def _row(record: Record, status: str, reason: str, n_tokens: int = 0, **values) -> dict:
    nan = math.nan
    return {
        "record_index": record.index,
        "sample_id": record.sample_id,
        "ifd": values.get("ifd", nan),
        "ppl_conditioned": values.get("ppl_conditioned", nan),
        "ppl_unconditioned": values.get("ppl_unconditioned", nan),
        "n_response_tokens": n_tokens,
        "status": status,
        "reason": reason,
    }


def ifd_from_losses(conditioned: float, alone: float) -> dict[str, float]:
    """PPLs as exp of the mean losses and their ratio, IFD = exp(conditioned - alone)."""
    return {
        "ifd": math.exp(conditioned - alone),
        "ppl_conditioned": math.exp(conditioned),
        "ppl_unconditioned": math.exp(alone),
    }


def ifd_scores(
    model,
    tokenizer,
    records: list[Record],
    template: str,
    system_prompt: str | None,
    max_length: int,
    batch_size: int = 4,
) -> pd.DataFrame:
    """One row per record (see :data:`COLUMNS`); non-ok records keep their status, NaN scores."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows: dict[int, dict] = {}
    todo: list[tuple[int, Record, Pair, int]] = []
    for position, record in enumerate(records):
        if not record.ok:
            rows[position] = _row(record, record.status, record.reason)
            continue
        encoded, pair = encode_pair(record, tokenizer, template, system_prompt, max_length)
        if pair is None:
            rows[position] = _row(record, encoded.status, encoded.reason)
            continue
        todo.append((position, record, pair, encoded.n_response_tokens))

    # Similar lengths together waste less on padding; the scores do not depend on the batch.
    todo.sort(key=lambda item: len(item[2].conditioned))
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        pairs = [item[2] for item in batch]
        conditioned = mean_token_losses(
            model, [p.conditioned for p in pairs], [p.conditioned_start for p in pairs], pad or 0
        )
        alone = mean_token_losses(
            model, [p.alone for p in pairs], [p.alone_start for p in pairs], pad or 0
        )
        for item, cond, solo in zip(batch, conditioned, alone, strict=True):
            position, record, _, n_tokens = item
            if math.isfinite(cond) and math.isfinite(solo):
                values = ifd_from_losses(cond, solo)
                rows[position] = _row(record, prompts.OK, "", n_tokens, **values)
            else:
                reason = "a one-token response has no token to score without its instruction"
                rows[position] = _row(record, "ifd_undefined", reason, n_tokens)
    log.info("IFD of %d records, %d scored", len(records), len(todo))
    return pd.DataFrame([rows[i] for i in range(len(records))], columns=list(COLUMNS))
