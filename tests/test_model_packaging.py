"""from_backbone, save/load, and loading as remote code without this repo (issue 2, acceptance 7)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from model import RMTForCausalLM
from test_model_common import BACKBONES, VOCAB, random_tokens, tiny_rmt

torch.set_num_threads(1)  # tiny models: one thread is as fast and immune to oversubscription


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB words, built offline: <pad>=0, <bos>=1, <eos>=2."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def test_from_backbone_keeps_pretrained_weights_and_initialises_memory(tmp_path):
    settings = {k: v for k, v in BACKBONES["llama"].items() if k != "model_type"}
    torch.manual_seed(3)
    pretrained = LlamaForCausalLM(LlamaConfig(**settings, initializer_range=0.05))
    pretrained.save_pretrained(tmp_path / "backbone")
    reference = {k: v.clone() for k, v in pretrained.state_dict().items()}

    for source in (str(tmp_path / "backbone"), pretrained):
        model = RMTForCausalLM.from_backbone(source, num_mem_tokens=4, segment_size=8)
        for name, value in model.backbone.state_dict().items():
            assert torch.equal(value, reference[name]), name
        std = float(model.memory.detach().std())
        assert 0.03 < std < 0.07  # N(0, initializer_range = 0.05)
        assert model.config.backbone["model_type"] == "llama"


@pytest.mark.parametrize("backbone", ["llama", "gpt2"])
def test_save_and_reload_in_process_gives_identical_logits(tmp_path, backbone):
    model = tiny_rmt(backbone).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, RMTForCausalLM)
    ids = random_tokens(2, 13)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    if backbone == "gpt2":  # tied LM head stays tied
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    assert importlib.util.find_spec("model") is None, "this repository must not be importable here"
    folder = sys.argv[1]
    torch.set_num_threads(int(sys.argv[2]))  # same reduction order as the parent: bitwise-equal logits
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.load(folder + "/../ids.pt")
    with torch.no_grad():
        torch.save(model(ids).logits, folder + "/../remote_logits.pt")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    result = generator("w5 w6 w7 w8 w9 w10 w11", max_new_tokens=12, do_sample=False, return_full_text=False)
    print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__,
                      "text": result[0]["generated_text"]}))
    """
)


def test_saved_folder_loads_as_remote_code_in_a_process_without_this_repo(tmp_path):
    model = tiny_rmt("llama").eval()
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    word_tokenizer().save_pretrained(saved)
    for name in ("configuration_rmt.py", "modeling_rmt.py", "generation_rmt.py", "segments.py"):
        assert (saved / name).is_file(), name
    auto_map = json.loads((saved / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"].endswith("modeling_rmt.RMTForCausalLM")

    # A fresh folder and process: isolated mode (-I) ignores PYTHONPATH, cwd and user site.
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(saved, elsewhere / "model_dir")
    ids = random_tokens(2, 13)
    torch.save(ids, elsewhere / "ids.pt")
    (elsewhere / "run.py").write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, "-I", "run.py", str(elsewhere / "model_dir"), str(torch.get_num_threads())],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["class"].startswith("transformers_modules.") and report["class"].endswith("RMTForCausalLM")
    words = report["text"].split()  # 12 new tokens, crossing two segment borders (S = 5)
    assert len(words) == 12 and all(w.startswith("w") for w in words), words
    with torch.no_grad():
        assert torch.equal(torch.load(elsewhere / "remote_logits.pt"), model(ids).logits)
