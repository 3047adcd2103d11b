"""Export of a 2-rank ZeRO-3 checkpoint to a Hugging Face folder (issue 7, acceptance 1-2).

Reference logits come from the training side itself: the trainer resumes the checkpoint on
2 ranks under ZeRO-3 and runs the probe through the DeepSpeed engine (no zero_to_fp32, no
export code). The exported folder is loaded by a fresh `python -I` that cannot import this
repository.
"""

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_export_helpers import REPO_ROOT, TINY_RUN_STEPS, repo_env, tiny_run

from training import export

PROBE_LENGTH = 40  # 2.5 segments of 16: memory carried twice, short last segment

ENGINE_REFERENCE = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file, save_file
    from training.run_dir import CHECKPOINTS_DIR, resolve_resume
    from training.config import load_config
    from training.distributed import init_distributed
    from training.trainer import Trainer

    run, probe_path, out_path = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist = init_distributed()
    where = [f"run.runs_dir={run.parent}", f"run.name={run.name}"]  # wherever the run folder is now
    cfg = load_config(run / "config.yaml", where, world_size=dist.world_size)
    trainer = Trainer(cfg, dist)
    trainer.setup()
    # The one resolution of checkpoint.resume, as training.pretrain does it.
    resumed = trainer.resume(resolve_resume(cfg.run_dir / CHECKPOINTS_DIR, cfg.checkpoint.resume))
    trainer.engine.eval()
    with torch.no_grad():
        logits = trainer.engine(input_ids=load_file(probe_path)["input_ids"]).logits
    if dist.rank == 0:
        save_file({"logits": logits.float().contiguous()}, out_path)
        print("RESUMED", resumed.name, flush=True)
    # Both ranks are done; leave without interpreter teardown. This helper only produces the
    # reference logits, and gloo/DeepSpeed thread teardown once aborted a rank here
    # ("terminate called without an active exception", exit -6) after the work was done.
    torch.distributed.barrier()
    os._exit(0)
""")

FRESH_LOAD = textwrap.dedent("""
    import contextlib, importlib.util, io, json, re, sys
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, probe_path, out_path = sys.argv[1:4]
    leaked = [m for m in ("model", "training") if importlib.util.find_spec(m) is not None]
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    ids = load_file(probe_path)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        prompt = ids[:1, :20]
        # The random prompt holds the pad id (0); without an explicit mask generate() would mask it
        # out while the unmasked replay below reads it.
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                   min_new_tokens=24, do_sample=False)
        replay = model(input_ids=generated).logits  # teacher-forced over prompt + generated
    # Greedy means every generated token is the argmax of the teacher-forced logits before it.
    eos = tok.eos_token_id
    argmax = replay[0, 19:-1].clone()
    argmax[:, eos] = float("-inf")  # min_new_tokens bans EOS while generating
    save_file({"logits": logits, "generated": generated, "replay_argmax": argmax.argmax(-1)}, out_path)

    # The model card's load-and-generate snippet, as written, with the repo pointed at the folder.
    card = open(folder + "/README.md").read()
    snippet = re.sub(r'repo = ".*"', "repo = " + repr(folder), card.split("```python\\n")[1].split("```")[0])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet, {})
    print(json.dumps({"leaked": leaked, "class": type(model).__module__, "tokenizer": type(tok).__name__,
                      "decoded": tok.decode(generated[0, 20:]), "snippet_output": printed.getvalue().strip(),
                      "card_expected": card.split("Expected continuation: `")[1].split("`")[0]}))
""")


def expected_model_code() -> set[str]:
    # Every file of the model package except __init__ is imported by the modeling code.
    return {p.name for p in (REPO_ROOT / "model").glob("*.py")} - {"__init__.py"}


HUB_FILES = {"README.md", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("probe") / "probe.safetensors"
    save_file({"input_ids": torch.randint(0, 64, (2, PROBE_LENGTH))}, str(path))
    return path


def test_zero3_export_reloads_in_fresh_process_with_engine_logits(run, probe, tmp_path):
    """Acceptance 1: the trainer's end-of-run export, reloaded without the repo, equals the engine."""
    reference = tmp_path / "engine.safetensors"
    (tmp_path / "engine_reference.py").write_text(ENGINE_REFERENCE)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "engine_reference.py"), str(run), str(probe), str(reference)],
        cwd=REPO_ROOT, env=repo_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"RESUMED step_{TINY_RUN_STEPS:08d}" in proc.stdout

    scratch = tmp_path / "elsewhere"
    scratch.mkdir()
    (scratch / "load.py").write_text(FRESH_LOAD)
    out = tmp_path / "fresh.safetensors"
    env = repo_env()
    del env["PYTHONPATH"]
    proc = subprocess.run([sys.executable, "-I", str(scratch / "load.py"), str(run / "export"), str(probe), str(out)],
                          cwd=scratch, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["leaked"] == []
    assert report["class"].startswith("transformers_modules.")

    fresh, engine = load_file(str(out)), load_file(str(reference))
    assert fresh["logits"].shape == (2, PROBE_LENGTH, 64)
    assert (fresh["logits"] - engine["logits"]).abs().max().item() <= 1e-5
    assert fresh["generated"].shape == (1, 44)
    assert torch.equal(fresh["generated"][0, 20:], fresh["replay_argmax"])
    assert len(report["decoded"].split()) == 24
    # The card's example is a 2-segment copy sample; the trained model answers it.
    assert report["snippet_output"].startswith(report["card_expected"])
    assert {p.name for p in (run / "export").iterdir()} == HUB_FILES | expected_model_code() | {"model.safetensors"}
    # The remote code users run with trust_remote_code is exactly the project's model files.
    for name in expected_model_code():
        assert (run / "export" / name).read_bytes() == (REPO_ROOT / "model" / name).read_bytes(), name


def test_older_step_sharded_over_an_old_export_with_true_card(run, tmp_path):
    """Acceptance 2, and what the trainer does at the end of a resumed run (overwrite=True); in
    bf16 (issue 21, acceptance 5: export can write bf16 weights; its reload check runs in bf16)."""
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")
    result = export.export_run(run, out, step=125, max_shard_size="100KB", overwrite=True, dtype="bf16")
    assert result.step == 125 and result.dtype == "bf16"
    assert result.max_abs_logit_diff <= export.RELOAD_ATOL["bf16"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging or set-aside folder left

    files = {p.name for p in out.iterdir()}
    shards = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1 and all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s) for s in shards)
    assert files == HUB_FILES | expected_model_code() | shards | {"model.safetensors.index.json"}
    assert result.files == sorted(files)

    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_rmt.RMTConfig",
                                  "AutoModelForCausalLM": "modeling_rmt.RMTForCausalLM"}
    assert config["dtype"] == "bfloat16"
    # The shards hold exactly the step-125 weights (consolidated independently by DeepSpeed's own
    # tool), rounded to bf16.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    expected = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step_00000125")
    written = {}
    for shard in sorted(shards):
        written.update(load_file(str(out / shard)))
    assert written.keys() == expected.keys()
    assert all(written[k].dtype == torch.bfloat16 and torch.equal(written[k], expected[k].bfloat16()) for k in expected)
    later = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=f"step_{TINY_RUN_STEPS:08d}")
    assert not torch.equal(later["memory"].bfloat16(), written["memory"])

    state = json.loads((run / "checkpoints" / "step_00000125" / "client_state.json").read_text())
    card = (out / "README.md").read_text()
    assert state["step"] == 125
    assert "- steps: 125\n" in card
    assert f"- tokens seen: {state['tokens_seen']:,}\n" in card
    assert f"| train/loss | {state['metrics']['train/loss']:.4f} |" in card
    for line in ("| memory tokens (m) | 8 |", "| segment size (S) | 16 |", "| layers | 2 |",
                 "| hidden size (d) | 64 |", "| BPTT depth (k) | full |", "- `memory_tasks.tasks`: [copy]",
                 "- `memory_tasks.span_length`: 3", f'repo = "{out}"', "dtype=torch.bfloat16)"):
        assert line in card, line
    assert f"| parameters | {sum(t.numel() for t in expected.values()):,} |" in card


def test_occupied_out_is_refused_before_any_work(run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export.main(["--run", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "not an empty directory" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("args, message", [
    (["--step", "7"], "--step 7: no complete checkpoint at that step; complete steps are [125, 250]"),
    (["--push-to-hub", "not a repo id"], "--push-to-hub 'not a repo id': not a valid repo id"),
    (["--device", "gpu"], "--device 'gpu': valid values are auto, cpu, cuda or cuda:N"),
    (["--dtype", "fp64"], "--dtype 'fp64': valid values are auto, fp32, bf16, fp16"),
    pytest.param(["--device", "cuda:0"], "--device cuda:0: no CUDA GPU is visible here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
    pytest.param(["--dtype", "fp16", "--device", "cpu"], "--dtype fp16: not supported on the CPU"),
])
def test_bad_arguments_exit_2_naming_the_flag(run, tmp_path, capsys, args, message):
    assert export.main(["--run", str(run), "--out", str(tmp_path / "x"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bad_export_section_in_the_run_config_is_refused_before_any_work(run, tmp_path, capsys):
    import shutil

    import yaml

    copy = tmp_path / "runs" / "tiny"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export"))
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["export"] = {"license": "Apache License 2.0", "tags": []}
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    assert export.main(["--run", str(copy), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{copy / 'config.yaml'}: export.license: 'Apache License 2.0' is not a hub license identifier" in err
    assert not (tmp_path / "x").exists()


def test_missing_run_and_incomplete_checkpoint(tmp_path, capsys):
    assert export.main(["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "r" / "checkpoints" / "step_00000010").mkdir(parents=True)  # no COMPLETE marker
    assert export.main(["--run", str(tmp_path / "r"), "--out", str(tmp_path / "x")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_failed_verification_leaves_nothing_behind(run, tmp_path, monkeypatch):
    def broken(model, folder):
        raise export.ExportVerificationError("injected mismatch")

    monkeypatch.setattr(export, "verify_in_fresh_process", broken)
    with pytest.raises(export.ExportVerificationError):
        export.export_run(run, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
