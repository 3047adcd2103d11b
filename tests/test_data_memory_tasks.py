"""Built-in memory-task corpus: layout, determinism, cross-rank layout, no-memory chance level."""

from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from training.data import (DataConfig, DataStateError, MemoryTaskConfig, build_pipeline,
                           build_tokenizer)
from training.data import memory_tasks as mt

S = 16


def words(tok, ids):
    return tok.convert_ids_to_tokens([int(i) for i in ids])


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(DataConfig())


def parse_sample(tokens):
    """Independent reading of a sample as words: (task marker, remembered items, answer span)."""
    sep = tokens.index("<sep>")
    ans = len(tokens) - 1 - tokens[::-1].index("<ans>")
    assert tokens[-1] == "<eos>"
    return tokens[0], tokens[1:sep], tokens[ans + 1:-1], sep, ans


@pytest.mark.parametrize("distractors", ["fillers", "symbols"])
@pytest.mark.parametrize("num_segments", [1, 2, 5])
def test_layout_answers_follow_from_the_first_segment_only(tok, num_segments, distractors):
    cfg = MemoryTaskConfig(tasks=["copy", "reverse", "associative_retrieval"], span_length=3,
                           distractors=distractors)
    arrays = mt.generate(np.arange(60), num_segments, S, cfg, seed=3)
    seen = Counter()
    for ids, labels in zip(arrays["input_ids"], arrays["labels"]):
        tokens = words(tok, ids)
        marker, source, answer, sep, ans = parse_sample(tokens)
        seen[marker] += 1
        if marker == "<copy>":
            expected, supervised = source, answer
        elif marker == "<reverse>":
            expected, supervised = source[::-1], answer
        else:
            pairs = dict(zip(source[0::2], source[1::2]))
            assert len(pairs) == 3 and sorted(answer[0::2]) == sorted(pairs)  # every key asked once
            expected, supervised = [pairs[k] for k in answer[0::2]], answer[1::2]
        assert supervised == expected
        if num_segments > 1:
            assert sep < S and ans >= (num_segments - 1) * S  # source in segment 0, answer in last
        noise = "f" if distractors == "fillers" else "s"
        assert all(t.startswith(noise) for t in tokens[sep + 1:ans])  # only distractors between
        labelled = [i for i, v in enumerate(labels) if v != mt.IGNORE]
        assert words(tok, labels[labelled]) == supervised
        assert all(tokens[i] == w for i, w in zip(labelled, supervised))
    assert set(seen) == {"<copy>", "<reverse>", "<assoc>"}


def test_segment_too_small_is_a_clear_error():
    cfg = MemoryTaskConfig(tasks=["associative_retrieval"], span_length=6)
    with pytest.raises(ValueError, match=r"segment_size >= 28 at num_segments=1"):
        mt.generate([0], 1, 16, cfg, seed=0)
    assert mt.required_segment_size(cfg, 2) == 14


def test_deterministic_per_index_and_seed():
    cfg = MemoryTaskConfig()
    a = mt.generate(np.arange(10, 20), 3, S, cfg, seed=7)
    b = mt.generate(np.arange(15, 20), 3, S, cfg, seed=7)
    c = mt.generate(np.arange(10, 20), 3, S, cfg, seed=8)
    assert np.array_equal(a["input_ids"][5:], b["input_ids"])
    assert not np.array_equal(a["input_ids"], c["input_ids"])
    assert len({tuple(r) for r in a["input_ids"]}) == 10


def test_union_over_ranks_equals_one_rank_with_the_whole_step(tok):
    cfg = DataConfig()
    one = build_pipeline(cfg, tok, segment_size=S, micro_batch_size=6, rank=0, world_size=1, seed=5)
    ranks = [build_pipeline(cfg, tok, segment_size=S, micro_batch_size=3, rank=r, world_size=2,
                            seed=5) for r in range(2)]
    for step, n in enumerate([2, 2, 3]):
        whole = one.next_batch(n)
        parts = [p.next_batch(n) for p in ranks]
        for key in whole:
            assert torch.equal(whole[key], torch.cat([p[key] for p in parts])), (step, key)
        assert whole["sample_ids"].tolist() == list(range(6 * step, 6 * step + 6))
        assert torch.equal(whole["attention_mask"], torch.ones_like(whole["input_ids"]))


def test_pipeline_state_resumes_and_refuses_other_world_size(tok):
    cfg = DataConfig()
    pipe = build_pipeline(cfg, tok, segment_size=S, micro_batch_size=4, rank=1, world_size=2, seed=1)
    for _ in range(3):
        pipe.next_batch(2)
    state = pipe.state_dict()
    expected = pipe.next_batch(3)
    again = build_pipeline(cfg, tok, segment_size=S, micro_batch_size=4, rank=1, world_size=2, seed=1)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch(3)["input_ids"], expected["input_ids"])
    other = build_pipeline(cfg, tok, segment_size=S, micro_batch_size=4, rank=0, world_size=4, seed=1)
    with pytest.raises(DataStateError, match=r"world_size=2 \(now 4\).*data.reshard=true"):
        other.load_state_dict(state)
    # With reshard the new layout continues after the 3 * 2 * 4 = 24 samples already consumed.
    reshard = DataConfig(reshard=True)
    other = build_pipeline(reshard, tok, segment_size=S, micro_batch_size=2, rank=0, world_size=4,
                           seed=1)
    other.load_state_dict(state)
    assert other.next_batch(2)["sample_ids"].tolist() == [24, 25]


def final_segment_view(arrays, num_segments):
    """(non-answer tokens of the final segment, answer tokens) per sample."""
    last = slice((num_segments - 1) * S, num_segments * S)
    ids, labels = arrays["input_ids"][:, last], arrays["labels"][:, last]
    answer = labels != mt.IGNORE
    return np.where(answer, -1, ids), np.where(answer, labels, -1)


@pytest.mark.parametrize("distractors", ["fillers", "symbols"])
def test_final_segment_carries_no_information_about_its_answer(distractors):
    """Acceptance 5: by construction a model without memory is at chance on the answers."""
    cfg = MemoryTaskConfig(span_length=6, alphabet_size=8, distractors=distractors)
    idx, n_seg = np.arange(400), 3
    base = mt.generate(idx, n_seg, S, cfg, seed=11, secret_seed=100)
    other = mt.generate(idx, n_seg, S, cfg, seed=11, secret_seed=200)
    visible_a, answers_a = final_segment_view(base, n_seg)
    visible_b, answers_b = final_segment_view(other, n_seg)
    # Other remembered content, byte-identical final segment apart from the answers ...
    assert np.array_equal(visible_a, visible_b)
    assert not np.array_equal(base["input_ids"][:, :S], other["input_ids"][:, :S])
    # ... and the answers change with it: they come from the earlier segments only.
    changed = (answers_a != answers_b)[answers_a >= 0].mean()
    assert changed > 0.8  # 7/8 expected for independent uniform symbols


@pytest.mark.parametrize("distractors", ["fillers", "symbols"])
def test_no_memory_predictor_stays_at_chance(distractors):
    """The best count-based predictor that sees the final segment (task, position, the two
    previous tokens, which include earlier answers) scores chance; the same predictor
    given the first segment scores 1, so the test can tell the difference."""
    cfg = MemoryTaskConfig(span_length=6, alphabet_size=8, distractors=distractors)
    n_seg = 2

    def contexts(arrays, with_memory):
        ids, labels = arrays["input_ids"], arrays["labels"]
        out = []
        for b, t in zip(*np.nonzero(labels != mt.IGNORE)):
            key = (arrays["task_ids"][b], t, ids[b, t - 1], ids[b, t - 2])
            if with_memory:
                key += tuple(ids[b, :S])
            out.append((key, labels[b, t]))
        return out

    train = mt.generate(np.arange(20000), n_seg, S, cfg, seed=1)
    test = mt.generate(np.arange(20000, 24000), n_seg, S, cfg, seed=1)
    for with_memory, lo, hi in ((False, 0.10, 0.15), (True, 0.99, 1.0)):
        table = defaultdict(Counter)
        for key, y in contexts(train, with_memory):
            table[key][y] += 1
        if with_memory:  # memorising whole first segments: score on the training samples
            scored = contexts(train, True)
        else:
            scored = contexts(test, False)
        hits = [table[k].most_common(1)[0][0] == y if table[k] else False for k, y in scored]
        assert lo <= np.mean(hits) <= hi, (with_memory, np.mean(hits))


def test_eval_batch_is_fixed_per_seed_and_independent_of_length(tok):
    cfg = MemoryTaskConfig()
    short = mt.make_eval_batch("copy", 2, S, 8, seed=3, cfg=cfg)
    long = mt.make_eval_batch("copy", 6, S, 8, seed=3, cfg=cfg)
    assert short["input_ids"].shape == (8, 2 * S) and long["input_ids"].shape == (8, 6 * S)
    assert torch.equal(short["answer_mask"], short["labels"] != mt.IGNORE)
    assert torch.equal(short["labels"][short["answer_mask"]], long["labels"][long["answer_mask"]])
    assert (short["task_ids"] == cfg.tasks.index("copy")).all()
    # Eval samples are not training samples of the same seed.
    train = mt.generate(np.arange(8), 2, S, MemoryTaskConfig(tasks=["copy"]), seed=3)
    assert not np.array_equal(train["input_ids"], short["input_ids"].numpy())
    mix = mt.make_eval_batch("mixture", 2, S, 64, seed=3, cfg=cfg)
    assert set(mix["task_ids"].tolist()) == {0, 1, 2}


def test_answer_accuracy_matches_a_hand_count():
    batch = mt.make_eval_batch("reverse", 2, S, 4, seed=0)
    labels, ids = batch["labels"], batch["input_ids"]
    V = len(mt.VOCAB)
    logits = torch.zeros(4, 2 * S, V)
    logits[:, :-1].scatter_(2, ids[:, 1:, None], 1.0)  # predicts every next token
    assert mt.answer_accuracy(logits, labels) == (1.0, 1.0)
    pos = batch["answer_mask"][2].nonzero()[0, 0].item()
    logits[2, pos - 1] = 0
    logits[2, pos - 1, mt.FILLER0] = 1.0  # one wrong answer token in sample 2
    n_answers = batch["answer_mask"].sum().item()
    assert mt.answer_accuracy(logits, labels) == ((n_answers - 1) / n_answers, 3 / 4)


def test_builtin_tokenizer_saves_and_loads_with_autotokenizer(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    batch = mt.make_eval_batch("associative_retrieval", 2, S, 2, seed=0)
    text = loaded.decode(batch["input_ids"][0])
    assert loaded(text, add_special_tokens=False)["input_ids"] == batch["input_ids"][0].tolist()
    assert (loaded.eos_token, loaded.bos_token, loaded.pad_token) == ("<eos>", "<bos>", "<pad>")
    assert len(loaded) == len(mt.VOCAB) == DataConfig().required_vocab_size()
