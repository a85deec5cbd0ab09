"""Distillation toward the base model with the persona fresh: for every turn k of a long training
conversation, the teacher sees only [persona ; turn k] (what the persona looks like at turn 1), the
student sees the whole conversation through its mechanism. KL on turn k's labelled tokens.

Gemma has no system role: its persona opens the first user turn and leaves it open, so turn 1 continues it
and every later turn opens a new user turn with its header. The teacher view of a later turn drops that
header (`reopen`: its ids), so the teacher reads [persona ; turn k] exactly as a conversation whose first turn
is turn k (one user header), as the answers were generated."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from persona_lit.data.dialogues import IGNORE


def fresh_persona_views(batch: dict[str, torch.Tensor], pad_id: int, reopen: Sequence[int] = ()):
    """Teacher inputs [persona ; turn k] for every (row, turn k) with labels, right-padded, and the
    matching (row, position) pairs: teacher token j of view v is student token `index[v, j]` of `rows[v]`.
    `reopen`: the user-turn header ids (ChatTokenizer.reopen_ids(); empty for formats with a system role)."""
    seg, valid, labels = batch["segment_ids"], batch["attention_mask"].bool(), batch["labels"]
    ids_all = batch["input_ids"]
    head = torch.tensor(list(reopen), dtype=ids_all.dtype, device=ids_all.device)

    def opens_with_header(positions: torch.Tensor) -> bool:
        return len(head) > 0 and len(positions) >= len(head) and bool((ids_all[r, positions[: len(head)]] == head).all())

    views, rows = [], []
    for r in range(seg.shape[0]):
        turns = sorted(set(seg[r][valid[r]].tolist()) - {0, -1})
        first = torch.nonzero((seg[r] == turns[0]) & valid[r]).squeeze(1) if turns else None
        left_open = first is not None and len(head) > 0 and not opens_with_header(first)  # persona kept turn 1 open
        for k in sorted(set(seg[r][labels[r] != IGNORE].tolist()) - {0, -1}):
            turn = torch.nonzero((seg[r] == k) & valid[r]).squeeze(1)
            if left_open and opens_with_header(turn):
                turn = turn[len(head):]
            views.append(torch.cat([torch.nonzero((seg[r] == 0) & valid[r]).squeeze(1), turn]))
            rows.append(r)
    width = max(len(v) for v in views)
    index = torch.stack([F.pad(v, (0, width - len(v)), value=-1) for v in views])
    rows_t = torch.tensor(rows, device=seg.device)
    ids = torch.where(index >= 0, batch["input_ids"][rows_t[:, None], index.clamp(min=0)], pad_id)
    return ids, (index >= 0).long(), rows_t, index


def fresh_persona_kl(model, mechanism, batch: dict[str, torch.Tensor], student_logits: torch.Tensor,
                     pad_id: int, reopen: Sequence[int] = ()) -> torch.Tensor:
    ids, mask, rows, index = fresh_persona_views(batch, pad_id, reopen)
    with torch.no_grad(), mechanism.disabled():
        teacher = model(input_ids=ids, attention_mask=mask).logits
    # position p predicts token p+1: compare where the *next* token is a label of that view's turn
    nxt = index[:, 1:]
    pos = index[:, :-1]
    has_label = (nxt >= 0) & (batch["labels"][rows[:, None], nxt.clamp(min=0)] != IGNORE)
    t = F.log_softmax(teacher[:, :-1][has_label].float(), -1)
    s = F.log_softmax(student_logits[rows[:, None].expand_as(pos)[has_label], pos[has_label]].float(), -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")
