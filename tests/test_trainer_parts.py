"""The trainer's parts that need no DeepSpeed: the step's statistics (one all-reduce), the metrics
logged from them, the memory-task scorer shared with training.evaluate, and the hook points."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from training import scoring
from training.data.memory_tasks import answer_accuracy, make_eval_batch
from training.hooks import Hooks
from training.step_stats import StepStats, StepSums, step_metrics


def stats(loss_sum, seg_sums, seg_counts, **flags) -> StepStats:
    return StepStats(loss_sum, flags.get("loss_nonfinite", 0.0), flags.get("stop", 0.0),
                     flags.get("grads_nonfinite", 0.0), flags.get("targets", 0.0),
                     flags.get("mismatch", 0.0), torch.tensor(seg_sums, dtype=torch.float64),
                     torch.tensor(seg_counts, dtype=torch.float64))


def test_pack_is_one_vector_and_sums_like_the_stats():
    a = stats(3.5, [1.0, 2.5], [2, 3], stop=1.0, targets=5.0)
    b = stats(0.0, [0.5, 0.0], [1, 0], grads_nonfinite=1.0, targets=1.0, mismatch=2.0)
    assert a.pack().shape == (10,) and a.pack().dtype == torch.float64
    total = StepStats.unpack(a.pack() + b.pack())  # what the all-reduce (a sum) hands back
    assert (total.loss_sum, total.loss_nonfinite, total.stop_requested, total.grads_nonfinite,
            total.targets, total.target_mismatch) == (3.5, 0.0, 1.0, 1.0, 6.0, 2.0)
    assert total.segment_loss_sums.tolist() == [1.5, 2.5]
    assert total.segment_counts.tolist() == [3, 3]
    back = StepStats.unpack(a.pack())
    assert back.loss_sum == a.loss_sum and torch.equal(back.pack(), a.pack())


def _out(seg_losses, seg_counts):
    counts = torch.tensor(seg_counts)
    return types.SimpleNamespace(segment_losses=torch.tensor(seg_losses),
                                 segment_token_counts=counts, num_tokens=counts.sum())


def test_device_sums_weight_segments_by_target_counts_and_pack_like_step_stats():
    s = StepSums(3, torch.device("cpu"))
    out = _out([2.0, math.nan, 1.0], [4, 0, 2])
    s.add(out, torch.tensor(10.0, dtype=torch.float32), expected_targets=6)
    s.add(out, torch.tensor(0.25, dtype=torch.float32), expected_targets=9)  # model says 6: off by 3
    packed = s.pack(torch.tensor(False), stop_requested=True, targets=15)
    back = StepStats.unpack(packed)
    assert (back.loss_sum, back.loss_nonfinite, back.stop_requested, back.grads_nonfinite,
            back.targets, back.target_mismatch) == (10.25, 0.0, 1.0, 0.0, 15.0, 3.0)
    assert back.segment_loss_sums.tolist() == [16.0, 0.0, 4.0]
    losses = back.segment_losses()
    assert losses[0] == 2.0 and math.isnan(losses[1]) and losses[2] == 1.0


def test_device_sums_zero_the_loss_of_a_nonfinite_rank_and_flag_it():
    # A NaN must not reach the other ranks' all-reduced loss sum; the flags say which kind.
    for loss, grads_bad, flags in ((math.nan, False, (1.0, 0.0)), (2.0, True, (0.0, 1.0)),
                                   (math.inf, True, (1.0, 1.0)), (2.0, False, (0.0, 0.0))):
        s = StepSums(1, torch.device("cpu"))
        s.add(_out([1.0], [2]), torch.tensor(loss))
        back = StepStats.unpack(s.pack(torch.tensor(grads_bad)))
        assert (back.loss_nonfinite, back.grads_nonfinite) == flags
        assert back.loss_sum == (0.0 if any(flags) else 2.0)


METRIC_ARGS = dict(total_targets=4, lr=1e-3, grad_norm=0.5, skipped_steps=2, samples_seen=16,
                   positions=64, step_time=0.5, memory_gb=1.25)


def test_step_metrics_names_and_values():
    m = step_metrics(stats(8.0, [6.0, 2.0], [0, 4]), skipped=False, **METRIC_ARGS)
    assert m == {"train/loss": 2.0, "train/ppl": math.exp(2.0), "train/lr": 1e-3,
                 "train/grad_norm": 0.5, "train/skipped_steps": 2.0, "train/tokens_per_s": 128.0,
                 "train/samples_seen": 16.0, "train/num_segments": 2.0,
                 "train/step_time_s": 0.5, "system/memory_gb": 1.25,
                 "train/loss_segment_1": 0.5}  # segment 0 had no target: not logged
    m = step_metrics(stats(8.0, [6.0], [4]), skipped=False, loss_scale=256.0, flops=1e12,
                     world_size=2, peak_flops=1e12, **METRIC_ARGS)
    assert m["train/loss_scale"] == 256.0 and m["train/mfu"] == 1e12 / (0.5 * 2 * 1e12)
    assert "train/mfu" not in step_metrics(stats(8.0, [6.0], [4]), skipped=False, flops=1e12,
                                           **METRIC_ARGS)


def test_a_skipped_step_logs_nan_loss_and_grad_norm():
    m = step_metrics(stats(0.0, [0.0], [4]), skipped=True, **METRIC_ARGS)
    assert all(math.isnan(m[k]) for k in ("train/loss", "train/ppl", "train/grad_norm"))


def test_scorer_agrees_with_evaluate_and_the_data_module():
    from training import evaluate

    labels = make_eval_batch("copy", 2, 16, 40, seed=3)["labels"]
    predicted = torch.roll(torch.where(labels == -100, 0, labels), shifts=-1, dims=1)
    flips = (torch.rand(predicted.shape, generator=torch.Generator().manual_seed(4)) < 0.15) \
        & torch.roll(labels != -100, -1, 1)
    predicted[flips] += 1
    totals = scoring.answer_totals(predicted, labels)
    token_acc, exact = scoring.accuracies(totals)
    assert (token_acc, exact) == pytest.approx(answer_accuracy(
        torch.nn.functional.one_hot(predicted).float(), labels))
    e, c, n = evaluate.answer_scores(predicted, labels)
    assert (e.sum().item(), c.sum().item(), n.sum().item()) == \
        (totals[2].item(), totals[0].item(), totals[1].item())
    assert 0 < exact < 1


def test_a_sample_without_answer_is_no_exact_match_and_evaluate_refuses_it():
    from training import evaluate

    labels = torch.full((2, 6), -100)
    labels[0, 3:5] = torch.tensor([7, 8])
    predicted = torch.zeros(2, 6, dtype=torch.long)
    predicted[0, 2:4] = torch.tensor([7, 8])
    assert scoring.answer_totals(predicted, labels).tolist() == [2.0, 2.0, 1.0, 1.0]
    assert scoring.accuracies(torch.zeros(4)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="no answer token"):
        evaluate.answer_scores(predicted, labels)


def test_hooks_from_plugin_modules_named_in_the_environment(monkeypatch):
    seen = []
    plugin = types.ModuleType("fake_rmt_plugin")
    plugin.register = lambda hooks: (
        hooks.register("after_forward", lambda step, rank, loss: loss * 2),
        hooks.register("checkpoint_phase", lambda **kw: seen.append(kw)))
    monkeypatch.setitem(sys.modules, "fake_rmt_plugin", plugin)
    hooks = Hooks.from_env({"RMT_PLUGINS": "fake_rmt_plugin"})
    assert hooks.after_forward(step=0, rank=1, loss=3.0) == 6.0
    hooks.checkpoint_phase(phase="model_files", rank=0, step=4)
    assert seen == [{"phase": "model_files", "rank": 0, "step": 4}]
    assert Hooks.from_env({}).after_forward(step=0, rank=0, loss=3.0) == 3.0
    with pytest.raises(ValueError, match="valid points"):
        hooks.register("before_everything", print)
    monkeypatch.setitem(sys.modules, "no_register", types.ModuleType("no_register"))
    with pytest.raises(ValueError, match="no register"):
        Hooks.from_env({"RMT_PLUGINS": "no_register"})
