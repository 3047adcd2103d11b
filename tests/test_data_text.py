"""Streamed text sources: sharding, packing, mixture, exact resume in a new process, bad data."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from training.data import (DataConfig, DataSourceError, DataStateError, SourceConfig,
                           build_pipeline, build_tokenizer)
from training.data.tokenization import train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
S = 8


def write_jsonl(path, texts, field="text"):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({field: t, "id": 0}) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    alpha = [f"alpha {i} " + "lorem ipsum " * (i % 7) for i in range(120)]
    beta = [f"beta {i} " + "dolor sit amet " * (i % 5) for i in range(60)]
    for k in range(3):  # three files: not divisible by two ranks, datasets splits by example
        write_jsonl(root / f"alpha_{k}.jsonl", alpha[k::3])
    write_jsonl(root / "beta.jsonl", beta)
    tok = train_bpe_tokenizer(alpha + beta, 300, str(root / "tok"))
    return {"root": root, "alpha": alpha, "beta": beta, "tok_dir": str(root / "tok"), "tok": tok}


def text_cfg(corpus, **kw):
    sources = kw.pop("sources", [SourceConfig(str(corpus["root"] / "alpha_*.jsonl"))])
    return DataConfig(source="text", sources=sources, tokenizer=corpus["tok_dir"], **kw)


def doc_of(tok, ids):
    """First words of a sample ("alpha 17") identify its document."""
    return " ".join(tok.decode([i for i in ids if i != tok.pad_token_id]).split()[:2])


def test_two_ranks_read_every_document_once_per_epoch(corpus):
    """Acceptance 1: one sample per document (document packing with padding), counted by id."""
    cfg = text_cfg(corpus, packing="document", short_documents="pad", shuffle_buffer=16)
    tok = build_tokenizer(cfg)
    seen, sample_ids = Counter(), []
    for rank in range(2):
        with build_pipeline(cfg, tok, segment_size=S, micro_batch_size=1, rank=rank, world_size=2,
                            seed=3) as pipe:
            while True:
                batch = pipe.next_batch(4)
                if pipe.stats()["epoch"] > 0:
                    break
                seen[doc_of(tok, batch["input_ids"][0])] += 1
                sample_ids += batch["sample_ids"].tolist()
    assert sorted(seen) == sorted(" ".join(t.split()[:2]) for t in corpus["alpha"])
    assert set(seen.values()) == {1}
    assert len(sample_ids) == len(set(sample_ids)) == 120


def test_concat_packing_reproduces_the_stream_joined_with_eos(corpus):
    cfg = text_cfg(corpus, shuffle_buffer=0,
                   sources=[SourceConfig(str(corpus["root"] / "beta.jsonl"))])
    tok = build_tokenizer(cfg)
    with build_pipeline(cfg, tok, segment_size=S, micro_batch_size=3, seed=0) as pipe:
        got = torch.cat([pipe.next_batch(n)["input_ids"].reshape(-1) for n in (1, 4, 2, 3)])
        assert pipe.stats()["tokens"] == got.numel()
    expected = []
    for text in corpus["beta"]:  # independent: the tokenizer on each document, EOS after each
        expected += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert got.tolist() == expected[:got.numel()]


def test_mixture_follows_the_weights(corpus):
    sources = [SourceConfig(str(corpus["root"] / "alpha_*.jsonl"), weight=3.0),
               SourceConfig(str(corpus["root"] / "beta.jsonl"), weight=1.0)]
    cfg = text_cfg(corpus, sources=sources, packing="document", short_documents="pad")
    tok = build_tokenizer(cfg)
    with build_pipeline(cfg, tok, segment_size=S, micro_batch_size=400, seed=0) as pipe:
        batch = pipe.next_batch(4)
    share = sum(doc_of(tok, r).startswith("alpha") for r in batch["input_ids"]) / 400
    assert 0.70 <= share <= 0.80  # 0.75 expected; binomial sd 0.022


RESUME_SCRIPT = """
import json, sys
from training.data import DataConfig, SourceConfig, build_pipeline, build_tokenizer
args = json.loads(sys.argv[1])
cfg = DataConfig(**{**args["cfg"], "sources": [SourceConfig(**s) for s in args["cfg"]["sources"]]})
pipe = build_pipeline(cfg, build_tokenizer(cfg), segment_size=8, micro_batch_size=2,
                      rank=args["rank"], world_size=2, seed=9)
pipe.load_state_dict(json.loads(open(args["state"]).read()))
print(json.dumps([pipe.next_batch(n)["input_ids"].tolist() for n in args["segments"]]))
pipe.close()
"""


@pytest.mark.parametrize("packing,short", [("concat", "drop"), ("document", "pad")])
def test_resume_in_a_new_process_gives_the_same_batches(corpus, tmp_path, packing, short):
    """Acceptance 2: shuffle + weighted mixture + a changing number of segments."""
    sources = [SourceConfig(str(corpus["root"] / "alpha_*.jsonl"), weight=2.0),
               SourceConfig(str(corpus["root"] / "beta.jsonl"), weight=1.0)]
    cfg = text_cfg(corpus, sources=sources, packing=packing, short_documents=short,
                   shuffle_buffer=8)
    tok = build_tokenizer(cfg)
    after = [3, 1, 4, 2, 2, 5]
    rank = 1
    with build_pipeline(cfg, tok, segment_size=S, micro_batch_size=2, rank=rank, world_size=2,
                        seed=9) as pipe:
        for n in [1, 2, 3, 3, 2, 4, 4, 1, 2, 3, 4]:  # crosses shuffle windows and source epochs
            pipe.next_batch(n)
        state = pipe.state_dict()
        expected = [pipe.next_batch(n)["input_ids"].tolist() for n in after]
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps(state))
    cfg_json = {**cfg.__dict__, "sources": [s.__dict__ for s in sources],
                "memory_tasks": cfg.memory_tasks.__dict__}
    # The other sources' sections are defaults the subprocess rebuilds itself.
    del cfg_json["eval_sources"], cfg_json["memory_tasks"], cfg_json["babilong"]
    out = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, json.dumps(
        {"cfg": cfg_json, "rank": rank, "state": str(state_file), "segments": after})],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


def test_a_state_saved_before_the_first_batch_restarts_the_stream(corpus):
    cfg = text_cfg(corpus, shuffle_buffer=8)
    tok = build_tokenizer(cfg)
    with build_pipeline(cfg, tok, segment_size=S, micro_batch_size=2, seed=4) as pipe:
        start = pipe.state_dict()
        first = [pipe.next_batch(n)["input_ids"] for n in (2, 3)]
        for _ in range(5):
            pipe.next_batch(4)
        pipe.load_state_dict(start)
        again = [pipe.next_batch(n)["input_ids"] for n in (2, 3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_eval_fraction_holds_out_a_disjoint_part(corpus):
    cfg = text_cfg(corpus, packing="document", short_documents="pad", eval_fraction=0.25)
    tok = build_tokenizer(cfg)
    docs = {}
    for split in ("train", "eval"):
        with build_pipeline(cfg, tok, segment_size=S, micro_batch_size=1, split=split) as pipe:
            seen = []
            while True:
                row = pipe.next_batch(4)["input_ids"][0]
                if pipe.stats()["epoch"] > 0:
                    break
                seen.append(doc_of(tok, row))
            docs[split] = seen
    assert not set(docs["train"]) & set(docs["eval"])
    assert len(docs["train"]) + len(docs["eval"]) == 120
    assert 10 <= len(docs["eval"]) <= 50


def test_document_packing_drops_and_counts_short_documents(corpus):
    cfg = text_cfg(corpus, packing="document", shuffle_buffer=0)
    tok = build_tokenizer(cfg)
    length = 2 * S
    # Independent count over the stream order (shuffle off: file alpha_0 first, 40 documents).
    lengths = [len(tok(t)["input_ids"]) + 1 for t in corpus["alpha"][0::3]]
    with build_pipeline(cfg, tok, segment_size=S, micro_batch_size=1, seed=0) as pipe:
        rows = []
        while pipe.stats().get("short_documents_dropped", 0) + len(rows) < 30:
            rows.append(pipe.next_batch(2)["input_ids"][0])
        stats = pipe.stats()
    consumed = lengths[:len(rows) + stats["short_documents_dropped"]]
    assert 30 <= len(consumed) < 40 and 0 < len(rows) < len(consumed)
    assert stats["short_documents_dropped"] == sum(n < length for n in consumed)
    assert stats["truncated_tokens"] == sum(n - length for n in consumed if n >= length)


def test_document_packing_without_long_enough_documents_is_an_error(corpus):
    cfg = text_cfg(corpus, packing="document")
    with build_pipeline(cfg, build_tokenizer(cfg), segment_size=S, micro_batch_size=1) as pipe:
        with pytest.raises(DataSourceError, match="no document is 800 tokens long.*pad"):
            pipe.next_batch(100)


# --- bad data (acceptance 3) --------------------------------------------------------------

def test_missing_text_field_names_field_and_file(corpus, tmp_path):
    good = tmp_path / "a.jsonl"
    bad = tmp_path / "b.jsonl"
    write_jsonl(good, ["hello world"])
    write_jsonl(bad, ["hello world"], field="content")
    cfg = text_cfg(corpus, sources=[SourceConfig(str(tmp_path / "*.jsonl"))])
    with pytest.raises(DataSourceError, match=r"'text' is not a field of the records in .*b\.jsonl"):
        build_pipeline(cfg, build_tokenizer(cfg), segment_size=S, micro_batch_size=1)


def test_empty_documents_and_invalid_utf8_are_skipped_or_replaced_and_counted(corpus, tmp_path):
    (tmp_path / "ok.txt").write_bytes("first document, fine\n".encode())
    (tmp_path / "bad.txt").write_bytes(b"broken \xff\xfe bytes here\n")
    (tmp_path / "blank.txt").write_bytes(b"   \n\n\t\n")
    cfg = text_cfg(corpus, sources=[SourceConfig(str(tmp_path / "*.txt"))], shuffle_buffer=0,
                   packing="document", short_documents="pad")
    tok = build_tokenizer(cfg)
    with build_pipeline(cfg, tok, segment_size=S, micro_batch_size=2, seed=0) as pipe:
        batch = pipe.next_batch(8)
        stats = pipe.stats()
    texts = [tok.decode(r, skip_special_tokens=True) for r in batch["input_ids"]]
    assert texts == ["broken \ufffd\ufffd bytes here\n", "first document, fine\n"]
    assert stats["empty_documents"] == 1 and stats["replaced_utf8"] == 1
    assert stats["short_documents_padded"] == 2


def test_a_source_without_any_usable_document_is_a_clear_error(corpus, tmp_path):
    write_jsonl(tmp_path / "e.jsonl", ["", "   ", "\n"])
    cfg = text_cfg(corpus, sources=[SourceConfig(str(tmp_path / "e.jsonl"))])
    with build_pipeline(cfg, build_tokenizer(cfg), segment_size=S, micro_batch_size=1) as pipe:
        with pytest.raises(DataSourceError, match=r"e\.jsonl.*no usable document.*"
                                                  r"'empty_documents': 3"):
            pipe.next_batch(1)


def test_config_problems_are_reported_before_any_work(corpus, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    cfg = DataConfig(source="text", tokenizer="builtin", shuffle_buffer=-1, eval_fraction=1.5,
                     sources=[SourceConfig(str(tmp_path / "nothing_*.jsonl")),
                              SourceConfig(str(tmp_path / "empty.jsonl"), weight=0)])
    problems = "\n".join(cfg.problems())
    for expected in [r"data.sources\[0\].path_or_name: '.*nothing_\*.jsonl' matches no file",
                     r"data.sources\[1\].path_or_name: .* matches only empty files",
                     r"data.sources\[1\].weight: 0 must be > 0",
                     r"data.tokenizer: builtin only covers the memory tasks",
                     r"data.shuffle_buffer: -1 must be >= 0",
                     r"data.eval_fraction: 1.5 must be in \[0, 1\)"]:
        assert __import__("re").search(expected, problems), expected
    assert DataConfig().problems() == []
    with pytest.raises(ValueError, match="no file"):
        build_pipeline(cfg, None, segment_size=S, micro_batch_size=1)
