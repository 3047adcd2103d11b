"""Hub datasets (here: a local dataset folder, which `datasets` resolves like a hub repository)
are resolved by rank 0 first while the other ranks wait; a real 2-rank run shows the order in its
console log. The same run checks that a run without logging.wandb never imports wandb."""

import json
import re
from datetime import datetime

import pytest

from tests.test_trainer_runs import REPO, pretrain_command
from training.data import DataConfig, SourceConfig
from training.data.errors import DataSourceError
from training.data.rank0_first import resolve_rank0_first, sources_to_resolve
from training.data.tokenization import train_bpe_tokenizer

DOCS = [f"document {i} " + "the quick brown fox jumps over the lazy dog " * (1 + i % 4)
        for i in range(64)]


def dataset_folder(root):
    """A folder `datasets.load_dataset(folder)` reads as a dataset repo: data/train-*.jsonl."""
    (root / "data").mkdir(parents=True)
    for shard in range(2):
        with open(root / "data" / f"train-{shard:05d}-of-00002.jsonl", "w") as f:
            for text in DOCS[shard::2]:
                f.write(json.dumps({"text": text}) + "\n")
    return root


def test_only_folders_and_hub_names_are_resolved_each_once(tmp_path):
    folder = dataset_folder(tmp_path / "corpus")
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    data = DataConfig(source="text", tokenizer=str(tmp_path), sources=[
        SourceConfig(str(folder)), SourceConfig(str(tmp_path / "a.jsonl")),
        SourceConfig("owner/name", config_name="en")],
        eval_sources=[SourceConfig(str(folder)), SourceConfig(str(folder), split="test")])
    found = [(where, s.path_or_name, s.split) for where, s in sources_to_resolve(data)]
    assert found == [("data.sources[0]", str(folder), "train"),
                     ("data.sources[2]", "owner/name", "train"),
                     ("data.eval_sources[1]", str(folder), "test")]
    assert sources_to_resolve(DataConfig()) == []  # memory tasks: nothing to resolve


def test_a_directory_is_a_source_only_when_it_holds_data(tmp_path):
    from training.data.config import dataset_folder_problem

    where = "data.sources[0].path_or_name"
    empty = tmp_path / "empty"
    (empty / ".cache").mkdir(parents=True)
    (empty / ".cache" / "x.jsonl").write_text('{"text": "x"}\n')  # hidden: datasets skips it
    (empty / "notes.md").write_text("no data here")
    assert dataset_folder_problem(str(empty), where) == (
        f"{where}: {str(empty)!r} is a directory whose tree matches no file `datasets` could "
        f"load (a dataset folder has a README.md or data files such as data/train-*.jsonl); "
        f"give a dataset folder, a file, or a glob such as {empty}/*.jsonl")
    cfg = DataConfig(source="text", tokenizer=str(tmp_path), sources=[SourceConfig(str(empty))])
    assert cfg.problems() == [dataset_folder_problem(str(empty), where)]
    (tmp_path / "packed" / "data").mkdir(parents=True)
    (tmp_path / "packed" / "data" / "train-0.jsonl.gz").write_bytes(b"")
    (tmp_path / "card").mkdir()
    (tmp_path / "card" / "README.md").write_text("---\nconfigs: []\n---\n")
    for ok in (dataset_folder(tmp_path / "corpus"), tmp_path / "packed", tmp_path / "card"):
        assert dataset_folder_problem(str(ok), where) is None
        assert DataConfig(source="text", tokenizer=str(tmp_path),
                          sources=[SourceConfig(str(ok))]).problems() == []


def test_a_source_rank0_cannot_resolve_fails_every_rank_without_loading(tmp_path):
    folder = dataset_folder(tmp_path / "corpus")
    data = DataConfig(source="text", tokenizer=str(tmp_path),
                      sources=[SourceConfig(str(folder), config_name="nosuch")])
    shared = []
    with pytest.raises(DataSourceError, match=r"data.sources\[0\].path_or_name: cannot resolve "
                       r"dataset .*corpus.* \(config 'nosuch'.*BuilderConfig 'nosuch' not found"):
        resolve_rank0_first(data, 0, share=lambda err: shared.append(err) or err)
    # Rank 1 gets rank 0's error from the broadcast and fails alike, before loading anything:
    # its own copy of the config names a folder that does not exist.
    other = DataConfig(source="text", tokenizer=str(tmp_path),
                       sources=[SourceConfig(str(tmp_path / "gone"), config_name="nosuch")])
    with pytest.raises(DataSourceError, match="BuilderConfig 'nosuch' not found"):
        resolve_rank0_first(other, 1, share=lambda err: shared[0])


def test_two_ranks_resolve_a_dataset_folder_rank0_first(tmp_path):
    import subprocess

    folder = dataset_folder(tmp_path / "corpus")
    train_bpe_tokenizer(DOCS, 300, str(tmp_path / "tok"))
    run_dir = tmp_path / "runs" / "hubfirst"
    cmd, env = pretrain_command(run_dir, 2, [
        "data.source=text", f"data.tokenizer={tmp_path / 'tok'}",
        f"data.sources=[{{path_or_name: {folder}}}]", "model.backbone.vocab_size=320",
        "run.max_steps=2", "eval.batches=0", "checkpoint.every=0", "deepspeed.zero_stage=0",
        "batch.micro_batch_size=2", "data.shuffle_buffer=8", "data.prefetch_documents=16"])
    # Every import of every rank, listed by the interpreter itself (logging.wandb is off).
    env["PYTHONPROFILEIMPORTTIME"] = "1"
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    lines = proc.stdout.splitlines()
    imports = [ln.rsplit("|", 1)[-1].strip() for ln in lines if ln.startswith("import time:")]
    assert "training.monitor" in imports and "torch.utils.tensorboard" in imports
    assert not [m for m in imports if m.split(".")[0] == "wandb"]

    pattern = re.compile(r"^(\S+ \S+) \[rank (\d)\] INFO rank (\d) resolved data source (\S+) "
                         r"\(data.sources\[0\]\)( after rank 0,)? in (\d+\.\d\d) s$")
    found = [m for m in map(pattern.search, lines) if m]
    assert [(m[2], m[3], m[4], m[5]) for m in found] == [
        ("0", "0", str(folder), None),
        ("1", "1", str(folder), " after rank 0,")]
    # Rank 1 started resolving (its line's time less its duration) only after rank 0 had logged
    # its own line; without the wait both start together, about rank 0's duration earlier.
    when = [datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() for m in found]
    rank0_done, rank1_started = when[0], when[1] - float(found[1][6])
    assert float(found[0][6]) > 0.05  # a wait of this size would show
    assert rank1_started >= rank0_done - 0.01, (rank0_done, rank1_started)
    # Rank 1's data came from the folder too: the run trained (two train records).
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").open()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == [1, 2]
