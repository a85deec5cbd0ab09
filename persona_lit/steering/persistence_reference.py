"""The slow reference of the persistence pass (tests and bench/persistence.py): for every generated token
the whole sequence so far is run again from scratch (a fresh cache each time), one row alone, no padding.

It keeps the fast pass's steering schedule without sharing its code: the positions fed in forwards
k < n_steer of the fast pass (the prompt and everything up to generated token n_steer - 2 with its Continue
turn) are run with the mechanism on, the rest inside mechanism.disabled(), as two chunks of one forward
over the sequence (the second chunk reads the first's fresh cache). The projection is read by a plain
block hook at the last position. Ids are kept as ids (the original experiment decoded and re-tokenised
the text every step, which added a <bos> each time); this is the original loop with that fixed.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from transformers import DynamicCache

from persona_lit.models.backbones import input_device
from persona_lit.steering.persistence import ArmTrace, Decoding, Sampler, continue_ids
from persona_lit.steering.vectors import block_hooks


def _forward(model, ids: list[int], generated: list[bool], start: int, cache, masked: bool):
    device = input_device(model)
    chunk = torch.tensor([ids[start:]], device=device)
    positions = torch.arange(start, len(ids), device=device)[None]
    extra = {"assistant_mask": torch.tensor([generated[start:]], device=device)} if masked else {}
    return model(input_ids=chunk, attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                 position_ids=positions, past_key_values=cache, use_cache=cache is not None, logits_to_keep=1,
                 **extra)


def _off(mechanism):
    return mechanism.disabled() if mechanism is not None else contextlib.nullcontext()


@torch.no_grad()
def reference_arm(model, chat, prompt: Sequence[int], seed: int, n_steer: int, n_release: int, mechanism,
                  measure_layer: int, units: torch.Tensor, decoding: Decoding, steered: bool = True,
                  continue_text: str = "Continue.") -> ArmTrace:
    """One run (one row) of run_arm, recomputing the whole prefix for every generated token."""
    ids, total, boundary = list(prompt), n_steer + n_release, 0
    generated, masked = [False] * len(ids), bool(getattr(mechanism, "uses_assistant_mask", False))
    sampler, after_end = Sampler([seed], decoding), continue_ids(chat, continue_text)
    tokens, seen = [], []
    if mechanism is not None:
        mechanism.begin_conversation(None)

    def record(hidden, kwargs):
        seen.append((hidden[:, -1].float() @ units.to(hidden.device, torch.float32).T).double().cpu())

    with block_hooks(model, {measure_layer: record}):
        for k in range(total):
            if k == n_steer - 1:
                boundary = len(ids)  # positions [0, boundary) are the ones fed by steered forwards
            if not steered:
                with _off(mechanism):
                    out = _forward(model, ids, generated, 0, None, masked)
            elif k < n_steer:
                out = _forward(model, ids, generated, 0, None, masked)
            else:
                cache = DynamicCache()
                if boundary:
                    _forward(model, ids[:boundary], generated[:boundary], 0, cache, masked)
                    seen.pop()  # the first chunk's state is not a recorded one
                with _off(mechanism):
                    out = _forward(model, ids, generated, boundary, cache, masked)
            tokens.append(int(sampler.pick(out.logits[:, -1].float().cpu())[0]))
            if k + 1 < total:
                insert = after_end if tokens[-1] == chat.end_id else []
                ids += [tokens[-1]] + insert
                generated += [True] + [False] * len(insert)
    tokens_t = torch.tensor([tokens])
    return ArmTrace(tokens_t, torch.stack(seen, 1), tokens_t == chat.end_id, [ids])
