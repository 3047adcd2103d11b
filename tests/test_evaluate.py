"""`python -m training.evaluate` (issue 7, acceptance 4) and its numbers against independent math."""

import json
from pathlib import Path

import matplotlib.image
import pytest
import torch

from test_export_helpers import tiny_run

from model import RMTConfig, RMTForCausalLM
from training import evaluate
from training.data.memory_tasks import answer_accuracy, make_eval_batch

VOCAB = 64


def tiny_model(segment_size=8, num_mem_tokens=2, vocab_size=VOCAB, seed=0) -> RMTForCausalLM:
    torch.manual_seed(seed)
    backbone = {"model_type": "llama", "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                "max_position_embeddings": 64, "tie_word_embeddings": False}
    config = RMTConfig(backbone=backbone, num_mem_tokens=num_mem_tokens, segment_size=segment_size)
    return RMTForCausalLM(config).eval()


def text_model(tmp_path: Path, lines: list[str]):
    """(text file of `lines`, exported folder, its BPE tokenizer trained on them, the tiny model)."""
    from training.data.tokenization import train_bpe_tokenizer

    text_file = tmp_path / "corpus.txt"
    text_file.write_text("\n".join(lines))
    folder = tmp_path / "model"
    tokenizer = train_bpe_tokenizer(lines, vocab_size=300, out_dir=str(folder))
    model = tiny_model(vocab_size=len(tokenizer))
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModelForCausalLM")
    model.save_pretrained(folder)
    return text_file, folder, tokenizer, model


def assert_png(path: Path, min_width: int):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(path))
    assert image.shape[1] >= min_width and image.std() > 0  # something was drawn


# --------------------------------------------------------------------------- acceptance 4


def test_trained_rmt_beats_its_no_memory_controls_by_a_wide_margin(tmp_path_factory, tmp_path, capsys):
    run = tiny_run(tmp_path_factory)  # trained on copy (3 symbols of 4) across 2 segments
    out = tmp_path / "eval"
    code = evaluate.main(["--model", str(run), "--task", "copy", "--segments", "2,4", "--samples", "64",
                          "--generate-checks", "4", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "memory_reset" in printed and "8/8 samples agree" in printed  # 2 segment counts x 4 checks
    report = json.loads((out / "copy.json").read_text())
    if not torch.cuda.is_available():  # the defaults: the CPU in fp32
        assert (report["device"], report["dtype"]) == ("cpu", "fp32")
    two = report["results"][0]
    assert two["num_segments"] == 2 and two["samples"] == 64
    # Chance for the whole answer is (1/4)^3 = 0.016: memory solves it, the controls cannot.
    assert two["rmt"]["exact_match"] >= 0.9
    assert two["no_memory"]["exact_match"] <= 0.1
    assert two["memory_reset"]["exact_match"] <= 0.1
    assert two["rmt"]["token_accuracy"] - two["no_memory"]["token_accuracy"] >= 0.5
    assert report["generate_check"] == {"samples": 8, "agree": 8}
    assert_png(out / "copy.png", min_width=400)

    # The exported folder (remote code, no training package involved) scores the same samples alike,
    # on the CPU in fp32 said explicitly.
    folder_report, json_path, _ = evaluate.evaluate(evaluate.EvalSettings(
        model=run / "export", task="copy", segments=[2], samples=64, generate_checks=0,
        data=str(run / "config.yaml"), out=tmp_path / "export_eval", device="cpu", dtype="fp32"))
    assert folder_report["model"]["kind"] == "export"
    assert folder_report["results"][0]["rmt"] == two["rmt"]
    assert folder_report["results"][0]["no_memory"] == two["no_memory"]


# --------------------------------------------------------------------------- independent math


def test_segmentwise_conditions_equal_whole_sequence_computations():
    model = tiny_model()
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 24))  # 3 full segments of 8
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        rows = ids.reshape(9, 8)  # every segment as its own sequence
        reset = model(input_ids=rows).logits.reshape(3, 24, VOCAB)
        alone = model.backbone(input_ids=rows).logits.reshape(3, 24, VOCAB)
        expected = {"rmt": full, "memory_reset": reset, "no_memory": alone}
        for condition, reference in expected.items():
            got = torch.cat([lg for _, _, lg in evaluate.segment_logits(model, condition, ids, mask)], dim=1)
            assert (got - reference).abs().max().item() <= 1e-5, condition
            assert torch.equal(evaluate.predictions(model, condition, ids, mask), reference.argmax(-1))
    # The conditions really differ (memory carries something even untrained).
    assert (full[:, 8:] - reset[:, 8:]).abs().max() > 1e-3


def test_segment_losses_equal_the_models_own_loss_with_padding():
    model = tiny_model()
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 21))  # 2 full segments and a short one
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # right padding
    labels = ids.masked_fill(torch.rand(ids.shape) < 0.2, -100)
    with torch.no_grad():
        sums, counts = evaluate.segment_token_losses(model, "rmt", ids, mask, labels)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(counts, out.segment_token_counts)
    assert torch.allclose(sums.float(), out.segment_losses * out.segment_token_counts, atol=1e-4)
    assert abs(sums.sum().item() - out.loss_sum.item()) <= 1e-4


def test_answer_scores_agree_with_the_data_modules_accuracy():
    batch = make_eval_batch("copy", 2, 16, 40, seed=3)
    labels = batch["labels"]
    perfect = torch.roll(torch.where(labels == -100, 0, labels), shifts=-1, dims=1)  # position i predicts i+1
    corrupt = perfect.clone()
    gen = torch.Generator().manual_seed(4)
    flips = (torch.rand(perfect.shape, generator=gen) < 0.15) & torch.roll(labels != -100, -1, 1)
    corrupt[flips] = (corrupt[flips] + 1) % VOCAB
    exact, correct, count = evaluate.answer_scores(corrupt, labels)
    logits = torch.nn.functional.one_hot(corrupt, VOCAB).float()
    token_acc, exact_rate = answer_accuracy(logits, labels)
    assert exact.float().mean().item() == pytest.approx(exact_rate)
    assert correct.sum().item() / count.sum().item() == pytest.approx(token_acc)
    assert 0 < exact_rate < 1


def test_answer_runs_split_interleaved_answers():
    assert evaluate.answer_runs([5, 6, 7]) == [(5, 8)]
    assert evaluate.answer_runs([3, 5, 7, 8]) == [(3, 4), (5, 6), (7, 9)]


def greedy_by_full_forward(model, prefix: torch.Tensor, n: int) -> torch.Tensor:
    """Reference greedy decoding: one whole teacher-forced forward per new token."""
    seq = prefix
    for _ in range(n):
        nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[:, prefix.shape[1]:]


def test_generated_exact_match_follows_real_greedy_decoding_across_runs():
    model = tiny_model(segment_size=8)
    torch.manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 30))
    labels = torch.full_like(ids, -100)
    # Associative-retrieval-like answer: value runs at 18-19, 22 and 26-28 with given tokens between.
    with torch.no_grad():
        for start, end in [(18, 20), (22, 23), (26, 29)]:
            ids[:, start:end] = greedy_by_full_forward(model, ids[:, :start], end - start)
            labels[:, start:end] = ids[:, start:end]
        assert evaluate.generated_exact_match(model, ids, labels, pad_token_id=0) == [True, True]
        exact, _, _ = evaluate.answer_scores(evaluate.predictions(model, "rmt", ids, torch.ones_like(ids)), labels)
        assert exact.tolist() == [True, True]
        labels[1, 27] = (labels[1, 27] + 1) % VOCAB  # the model does not produce this answer
        assert evaluate.generated_exact_match(model, ids, labels, pad_token_id=0) == [True, False]


def test_text_evaluation_by_segments_and_index(tmp_path):
    lines = [f"line {i}: the quick brown fox {i % 7} jumps over {i % 5} lazy dogs" for i in range(400)]
    text_file, folder, tokenizer, model = text_model(tmp_path, lines)

    settings = evaluate.EvalSettings(model=folder, task="text", segments=[1, 3], data=str(text_file),
                                     text_batches=2, batch_size=2, out=tmp_path / "eval")
    report, json_path, png_path = evaluate.evaluate(settings)
    assert json.loads(json_path.read_text()) == report
    assert_png(png_path, min_width=800)  # two panels
    one, three = report["results"]
    assert len(three["rmt"]["segment_losses"]) == 3 and len(one["no_memory"]["segment_losses"]) == 1

    # Independent: the same eval batches through the model's own loss.
    data_cfg = evaluate.load_data_config(settings, evaluate.find_model(folder))
    from training.data import build_pipeline

    pipe = build_pipeline(data_cfg, tokenizer, segment_size=8, micro_batch_size=2, seed=0, split="eval")
    loss_sum, targets = 0.0, 0
    with torch.no_grad():
        for _ in range(2):
            b = pipe.next_batch(3)
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
            loss_sum, targets = loss_sum + out.loss_sum.item(), targets + out.num_tokens.item()
    pipe.close()
    assert three["rmt"]["targets"] == targets
    assert three["rmt"]["loss"] == pytest.approx(loss_sum / targets, abs=1e-5)
    assert three["rmt"]["ppl"] == pytest.approx(torch.tensor(loss_sum / targets).exp().item(), rel=1e-5)

    # --baseline: a model reading the whole 3-segment sample at once (segment size 24), its losses
    # cut at the evaluated model's segment boundaries; independent: its own full forward, the
    # next-token losses bucketed by position by hand.
    baseline_dir = tmp_path / "baseline"
    baseline = tiny_model(segment_size=24, vocab_size=len(tokenizer), seed=1)
    baseline.save_pretrained(baseline_dir)
    tokenizer.save_pretrained(baseline_dir)
    with_base, _, _ = evaluate.evaluate(evaluate.EvalSettings(
        model=folder, task="text", segments=[1, 3], data=str(text_file), text_batches=2,
        batch_size=2, out=tmp_path / "eval_base", baseline=baseline_dir))
    assert "full_attention" in with_base["conditions"]
    assert with_base["results"][1]["rmt"] == three["rmt"]  # the model's own numbers unchanged
    pipe = build_pipeline(data_cfg, tokenizer, segment_size=8, micro_batch_size=2, seed=0, split="eval")
    per_segment, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3)
    with torch.no_grad():
        for _ in range(2):
            b = pipe.next_batch(3)
            logits = baseline(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                    b["labels"][:, 1:].flatten(), reduction="none")
            for pos in range(23):  # the target at pos + 1 belongs to the segment of pos
                per_segment[pos // 8] += nll.view(2, 23)[:, pos].sum()
                count[pos // 8] += 2
    pipe.close()
    got = with_base["results"][1]["full_attention"]
    assert got["segment_losses"] == pytest.approx((per_segment / count).tolist(), abs=1e-5)
    assert got["targets"] == three["rmt"]["targets"]
    with pytest.raises(evaluate.EvalError, match=r"--baseline .*reads segments of 8 tokens.*"
                                                 r"model.segment_size >= 24.*at most 1"):
        evaluate.evaluate(evaluate.EvalSettings(model=folder, task="text", segments=[1, 3],
                                                data=str(text_file), baseline=folder))
    with pytest.raises(evaluate.EvalError, match="only --task text"):
        evaluate.evaluate(evaluate.EvalSettings(model=folder, task="copy", segments=[2],
                                                baseline=baseline_dir))

    # --dtype bf16 really evaluates in bf16: the same batches, close to fp32 but not bit-equal.
    settings.dtype, settings.out = "bf16", tmp_path / "eval_bf16"
    half, _, _ = evaluate.evaluate(settings)
    assert (half["device"], half["dtype"]) == ("cpu", "bf16")
    for condition in evaluate.CONDITIONS:
        fp32_loss, bf16_loss = three[condition]["loss"], half["results"][1][condition]["loss"]
        assert half["results"][1][condition]["targets"] == three[condition]["targets"]
        assert bf16_loss == pytest.approx(fp32_loss, rel=2e-2) and bf16_loss != fp32_loss, condition


@pytest.mark.parametrize("args, message", [
    (["--task", "sort"], "invalid choice: 'sort'"),
    (["--task", "copy", "--segments", "2,x"], "give a comma-separated list of integers"),
    (["--task", "copy", "--segments", "0,2"], "--segments [0, 2]: give a comma-separated list of integers >= 1"),
    (["--task", "text"], "--data: required for --task text with an exported folder"),
    (["--task", "copy", "--dtype", "half"], "--dtype 'half': valid values are auto, fp32, bf16, fp16"),
    (["--task", "copy", "--device", "tpu"], "--device 'tpu': valid values are auto, cpu, cuda or cuda:N"),
    pytest.param(["--task", "copy", "--device", "cuda"], "--device cuda: no CUDA GPU is visible here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
])
def test_bad_input_is_reported_before_loading(tmp_path_factory, args, message, capsys):
    run = tiny_run(tmp_path_factory)
    model = run / "export" if "text" in args else run
    try:
        code = evaluate.main(["--model", str(model), *args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_shifted_windows_score_every_chunk_at_every_index(tmp_path):
    """--shifted-windows: index i scores stream chunks i .. i + K*N - 1 (module doc of
    training/eval_text.py). Independent: each chunk's memory-reset loss from the model's own
    forward on that chunk alone, its last position scored against the next chunk's first token
    (except at the last index, whose last target lies outside the window), summed by hand over
    the chunks each index should hold."""
    import yaml
    from training.data import build_pipeline
    lines = [f"entry {i}: {'abcdefg'[i % 7]} moves {i % 5} steps past {i % 3} gates" for i in range(300)]
    text_file, folder, tokenizer, model = text_model(tmp_path, lines)
    N, S, batches, B = 3, 8, 2, 2
    K = batches * B  # windows per cut
    settings = evaluate.EvalSettings(model=folder, task="text", segments=[N], data=str(text_file),
                                     text_batches=batches, batch_size=B, out=tmp_path / "eval",
                                     shifted_windows=True)
    report, _, _ = evaluate.evaluate(settings)
    assert report["shifted_windows"] is True
    row = report["results"][0]

    pipe = build_pipeline(evaluate.load_data_config(settings, evaluate.find_model(folder)), tokenizer,
                          segment_size=S, micro_batch_size=B, seed=0, split="eval")
    stream = torch.cat([pipe.next_batch(N)["input_ids"].reshape(-1) for _ in range(batches + 1)])
    pipe.close()
    # The rows of concat-packed batches are consecutive pieces of the file's own token stream.
    direct = tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"]
    assert stream.tolist() == direct[:len(stream)]
    chunks = K * N + N  # every chunk an index can reach, and one more for the last targets
    with torch.no_grad():
        logits = model(input_ids=stream[:chunks * S].view(chunks, S)).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:-1].flatten(0, 1), stream[1:(chunks - 1) * S + 1],
                                            reduction="none").view(chunks - 1, S).double()
    for i in range(N):
        held = nll[i:i + K * N, :S if i < N - 1 else S - 1]
        assert row["memory_reset"]["segment_losses"][i] == pytest.approx(held.mean().item(), abs=1e-5)
    # The three cuts score N times the targets of one cut; rmt and no_memory use the same windows.
    plain, _, _ = evaluate.evaluate(evaluate.EvalSettings(
        model=folder, task="text", segments=[N], data=str(text_file), text_batches=batches,
        batch_size=B, out=tmp_path / "plain"))
    for condition in evaluate.CONDITIONS:
        assert row[condition]["targets"] == N * plain["results"][0][condition]["targets"]

    with pytest.raises(evaluate.EvalError, match="--shifted-windows: only --task text"):
        evaluate.evaluate(evaluate.EvalSettings(model=folder, task="copy", segments=[2],
                                                shifted_windows=True))
    recipe = tmp_path / "document.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"source": "text", "packing": "document",
                                               "tokenizer": str(folder),
                                               "sources": [{"path_or_name": str(text_file)}]}}))
    with pytest.raises(evaluate.EvalError, match="--shifted-windows: the held-out text is packed "
                                                 "'document'"):
        evaluate.evaluate(evaluate.EvalSettings(model=folder, task="text", segments=[N],
                                                data=str(recipe), shifted_windows=True))
