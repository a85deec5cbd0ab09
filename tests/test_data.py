"""Chat formatting, the assistant mask, padding, bucketing, readers and the MT-bench turn stream."""

import json
from pathlib import Path

import pytest
import torch

from persona_lit.data import BucketBatchSampler, Collator, read_dialogues, read_mt_bench, turn_stream
from persona_lit.data.dialogues import IGNORE
from persona_lit.data.mt_bench import neutral_exchanges, references_fingerprint
from persona_lit.data.readers import default_mt_bench_path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DIALOGUE = [{"role": "system", "content": "You are Cato."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Greetings."}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Farewell."}]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_assistant_mask_covers_answers_and_their_end_token(backbone_factory, name):
    chat = backbone_factory(name).chat
    ids, mask = chat.encode(DIALOGUE)
    trained = chat.tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert trained == f"Greetings.{chat.fmt.end}Farewell.{chat.fmt.end}"
    text = chat.tokenizer.decode(ids)
    if name == "tiny-gemma3":  # no system role: the persona opens the first user turn
        assert text.startswith("<bos><start_of_turn>user\nYou are Cato.\n\nHi there<end_of_turn>")
        assert "<start_of_turn>model\nGreetings." in text
    else:
        assert text.startswith("<|im_start|>system\nYou are Cato.<|im_end|>\n<|im_start|>user\nHi there")


def test_incremental_turn_ids_match_the_full_encoding(backbone_factory):
    chat = backbone_factory("tiny-llama").chat
    ids = chat.turn_ids("Hi there", first=True, system="You are Cato.")
    ids += chat._ids("Greetings.") + chat.close_assistant()
    ids += chat.turn_ids("Bye")
    full, _ = chat.encode(DIALOGUE[:4], add_generation_prompt=True)
    assert ids == full


def test_padding_is_eos_safe(backbone_factory):
    chat = backbone_factory("tiny-llama").chat
    assert chat.pad_id == chat.end_id  # SmolLM2 pads with its end-of-turn token: the hard case
    short, long = chat.encode(DIALOGUE[:3]), chat.encode(DIALOGUE)
    batch = Collator(chat.pad_id)([short, long])
    n = len(short[0])
    row = batch["labels"][0]
    assert row[n - 2].item() == chat.end_id  # the real end token of the answer is trained...
    assert (row[n:] == IGNORE).all() and (batch["attention_mask"][0, n:] == 0).all()  # ...padding is not
    assert (batch["input_ids"][0, n:] == chat.pad_id).all()


def test_bucketing_is_deterministic_complete_and_tight():
    lengths = [int(x) for x in torch.randint(10, 400, (200,), generator=torch.Generator().manual_seed(0))]
    s = BucketBatchSampler(lengths, batch_size=8, seed=3)
    epoch0 = list(s)
    assert epoch0 == list(s) and sorted(i for b in epoch0 for i in b) == list(range(200))
    s.set_epoch(1)
    assert list(s) != epoch0
    padded = sum(len(b) * max(lengths[i] for i in b) for b in epoch0)
    assert padded < 1.15 * sum(lengths)  # random batches of 8 would pad to ~1.7x
    s.set_epoch(0)
    s.skip = 5
    assert list(s) == epoch0[5:] and list(s) == epoch0  # a resume skips once, then whole epochs


def test_bucketing_splits_disjointly_across_ranks(monkeypatch):
    parts, counts = [], []
    for rank in range(2):
        s = BucketBatchSampler(list(range(50)), batch_size=4, seed=0)
        monkeypatch.setattr(s, "_rank_world", lambda rank=rank: (rank, 2))
        parts.append({i for b in s for i in b})
        counts.append(len(list(s)))
    assert not parts[0] & parts[1]
    assert counts[0] == counts[1] == len(s)  # DDP ranks must step the same number of times


def test_readers_accept_alpaca_and_chat(tmp_path):
    f = tmp_path / "mix.jsonl"
    f.write_text(json.dumps({"instruction": "Sum", "input": "2+2", "output": "4"}) + "\n\n"
                 + json.dumps({"messages": DIALOGUE}) + "\n")
    a, b = read_dialogues(f)
    assert a == [{"role": "user", "content": "Sum\n\n2+2"}, {"role": "assistant", "content": "4"}]
    assert b == DIALOGUE


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not beside the repo")
def test_reads_the_tame_the_weights_persona_files():
    plain = read_dialogues(SHARED / "tame_the_weights_personas" / "zen_coder.jsonl")
    generated = read_dialogues(SHARED / "tame_the_weights_personas" / "zen_coder_generated.jsonl")
    assert len(plain) >= 5 and len(generated) > 100
    assert all(d[-1]["role"] == "assistant" and d[-1]["content"] for d in plain + generated)


def test_mt_bench_from_the_package_and_the_turn_stream():
    path = default_mt_bench_path()
    questions = read_mt_bench(path)
    assert len(questions) == 80 and all(len(q.turns) == 2 for q in questions)
    in_order = turn_stream(questions, 6, seed=None, exclude_categories=())
    assert [t.question_id for t in in_order] == [81, 81, 82, 82, 83, 83]
    assert [t.index_in_question for t in in_order] == [0, 1] * 3
    stream = turn_stream(questions, 200, seed=1, exclude_categories=["roleplay"])
    assert len(stream) == 200 and all(t.category != "roleplay" for t in stream)
    assert stream != turn_stream(questions, 200, seed=2, exclude_categories=["roleplay"])
    for a, b in zip(stream[::2], stream[1::2]):  # a question's two turns stay adjacent
        assert a.question_id == b.question_id and (a.index_in_question, b.index_in_question) == (0, 1)


def test_chained_dialogues_label_persona_answers_only(backbone_factory):
    from persona_lit.data import PersonaDialogueDataModule
    from persona_lit.personas.load import load_persona

    chat = backbone_factory("tiny-llama").chat
    dm = PersonaDialogueDataModule(chat, load_persona("stoic"), max_length=2048, chain_turns=3, filler_turns=1)
    dm.setup()
    ids, mask, segments = dm.train_examples[0]
    assert max(segments) == 6  # 3 filler turns + 3 persona turns, numbered in order
    labelled_turns = sorted({s for s, m in zip(segments, mask) if m})
    assert labelled_turns == [2, 4, 6]  # filler answers are history only


def test_capability_references_change_with_the_asked_questions():
    """The references are the unasked questions first, so more turns can mean other references: the fingerprint
    that results.json keeps (and compare checks) tells them apart, and is stable for the same ones."""
    questions = read_mt_bench(default_mt_bench_path())
    asked = lambda n: {t.question_id for t in turn_stream(questions, n, seed=0, exclude_categories=["roleplay"])}
    few, many = neutral_exchanges(8, asked(12)), neutral_exchanges(8, asked(112))
    assert len(few) == len(many) == 8 and few != many
    assert references_fingerprint(few, 64) == references_fingerprint(list(few), 64)
    assert len({references_fingerprint(few, 64), references_fingerprint(many, 64), references_fingerprint(few, 32)}) == 3
    assert references_fingerprint([], 64) is None


def test_every_persona_and_conversation_gets_its_own_question_stream():
    """Stream k of persona p is seeded from (seed, p, k): two personas' conversation 0 differ, a persona's
    conversations differ, the same (seed, p, k) gives the same stream, seed=None keeps file order."""
    from persona_lit.data.mt_bench import MTBenchDataModule

    dm = MTBenchDataModule(turns=12, conversations=3, seed=0)
    dm.setup("predict")
    ids = lambda stream: [t.question_id for t in stream]
    streams = dm.persona_streams(["role:pirate", "pack:stoic"])
    assert ids(streams["role:pirate"][0]) != ids(streams["pack:stoic"][0])
    assert len({tuple(ids(s)) for s in streams["role:pirate"]}) == 3
    assert ids(dm.stream("role:pirate", 1)) == ids(streams["role:pirate"][1])
    assert dm.persona_streams(["pack:stoic"], [2])["pack:stoic"][0] == streams["pack:stoic"][2]
    for stream in streams["pack:stoic"]:  # both turns of a question stay adjacent, in order
        assert all(t.index_in_question == 0 or stream[i - 1].question_id == t.question_id
                   for i, t in enumerate(stream) if i)
    fixed = MTBenchDataModule(turns=12, conversations=2, seed=None)
    fixed.setup("predict")
    assert ids(fixed.stream("a", 0)) == ids(fixed.stream("b", 1)) == ids(fixed.streams[0])
