"""The runner's in-place KV cache (models/kv_cache.py) gives the logits of transformers' own cache and of a full
forward, through reallocations, crops, row selection and forks."""

import copy

import pytest
import torch
from transformers import DynamicCache

from persona_lit.evaluation.conversation import roll_back, rollback_point
from persona_lit.models.kv_cache import GrowingLayer, growing_cache

CHUNKS = [20, 1, 1, 7, 1, 260, 1, 1, 3, 1]  # 296 slots: the 276-slot first buffer is outgrown once


def feed(model, tokens, mask, cache, chunks):
    """Feeds `tokens` [rows, S] in `chunks` through `cache`; the logits of every chunk, joined."""
    out, start = [], 0
    for width in chunks:
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)[:, start:start + width]
        res = model(input_ids=tokens[:, start:start + width], attention_mask=mask[:, :start + width].long(),
                    position_ids=positions, past_key_values=cache, use_cache=True)
        out.append(res.logits)
        start += width
    return torch.cat(out, 1)


def batch(rows, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 200, (rows, width), generator=g)
    mask = torch.ones(rows, width, dtype=torch.bool)
    for r in range(1, rows):  # left padding of different widths, as the runner makes
        mask[r, : 2 * r] = False
    return tokens, mask


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("rows", [1, 3])
def test_growing_cache_equals_transformers_cache_and_a_full_forward(backbone_factory, name, rows):
    model = backbone_factory(name).model
    tokens, mask = batch(rows, sum(CHUNKS))
    with torch.no_grad():
        ours = feed(model, tokens, mask, growing_cache(model.config), CHUNKS)
        theirs = feed(model, tokens, mask, DynamicCache(config=model.config), CHUNKS)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        full = model(input_ids=tokens, attention_mask=mask.long(), position_ids=positions).logits
    real = mask[..., None].expand_as(ours)
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[real], full[real], rtol=1e-4, atol=1e-4)


def test_decoding_writes_into_free_slots_without_reallocating(backbone_factory):
    model = backbone_factory("tiny-llama").model
    tokens, mask = batch(2, 40)
    cache = growing_cache(model.config)
    assert all(type(layer) is GrowingLayer for layer in cache.layers)
    with torch.no_grad():
        feed(model, tokens, mask, cache, [30])
        buffers = [layer._buffers[0].data_ptr() for layer in cache.layers]
        for start in range(30, 40):  # one token at a time: the same buffers, the views grow
            feed_from(model, tokens, mask, cache, start, 1)
    assert [layer._buffers[0].data_ptr() for layer in cache.layers] == buffers
    assert all(layer.keys.data_ptr() == layer._buffers[0].data_ptr() for layer in cache.layers)
    assert cache.get_seq_length() == 40


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_crops_row_selection_and_forks_are_adopted(backbone_factory, name):
    """What the runner does to a cache between turns (roll back a turn, select rows for probes, fork by deep copy)
    followed by more tokens equals a fresh cache fed the same tokens, and a fork never writes into its parent."""
    model = backbone_factory(name).model
    tokens, mask = batch(3, 60, seed=1)
    other, _ = batch(3, 60, seed=2)
    with torch.no_grad():
        cache = growing_cache(model.config)
        feed(model, tokens, mask, cache, [30])
        parent_keys = [layer.keys.clone() for layer in cache.layers]

        fork = copy.deepcopy(cache)  # a probe's fork writes other tokens on rows 2, 0
        fork.batch_select_indices(torch.tensor([2, 0]))
        forked = torch.cat([tokens[[2, 0], :30], other[[2, 0], 30:]], 1)
        got = feed_from(model, forked, mask[[2, 0]], fork, 30, 10)  # the fork already holds the first 30
        want = feed(model, forked, mask[[2, 0]], DynamicCache(config=model.config), [30, 10])[:, 30:]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        for layer, keys in zip(cache.layers, parent_keys):
            assert torch.equal(layer.keys, keys)

        if name == "tiny-llama":  # a rolled-back turn (history=clean): only full-attention layers roll back
            mark = rollback_point(cache)
            feed_from(model, torch.cat([tokens[:, :30], other[:, 30:]], 1), mask, cache, 30, 12)
            cache = roll_back(cache, mark)
            assert cache.get_seq_length() == 30
            got = feed_from(model, tokens, mask, cache, 30, 20)
            want = feed(model, tokens, mask, DynamicCache(config=model.config), [30, 20])[:, 30:]
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def feed_from(model, tokens, mask, cache, start, width):
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)[:, start:start + width]
    return model(input_ids=tokens[:, start:start + width], attention_mask=mask[:, :start + width].long(),
                 position_ids=positions, past_key_values=cache, use_cache=True).logits
