"""The facts the model owns and training code reads from it (issue 18): which targets count,
positions per segment, training FLOPs, and the torch-free conventions the data pipeline imports."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig

from model import IGNORE_INDEX, RMTConfig, count_targets, positions_per_segment
from model.flops import backbone_training_flops
from model.zero_params import full_shape, is_partitioned, is_released
from test_model_common import BACKBONES, random_tokens, tiny_rmt

torch.set_num_threads(1)


def hand_count(labels, mask, segment_size, loss_from_segment):
    """Position i predicts labels[i + 1], belongs to segment i // S, needs both tokens real."""
    count = 0
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1] - 1):
            if i // segment_size < loss_from_segment:
                continue
            if mask is not None and not (mask[b, i] and mask[b, i + 1]):
                continue
            count += int(labels[b, i + 1] != -100)
    return count


@pytest.mark.parametrize("loss_from_segment", [0, 1, 2, 5])
@pytest.mark.parametrize("padded", [False, True])
def test_count_targets_is_a_hand_count_and_the_models_num_tokens(loss_from_segment, padded):
    ids = random_tokens(3, 13, seed=loss_from_segment)
    labels = ids.clone()
    labels[0, 4:9] = -100  # an ignored span across a segment border
    labels[2, 5] = -100  # the first token of segment 1
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0  # right padding; its labels stay real tokens: only the mask drops them
        mask[2, :3] = 0  # left padding
    counted = count_targets(labels, 5, loss_from_segment, attention_mask=mask)
    assert counted.dtype == torch.int64 and counted.dim() == 0 and counted.device == labels.device
    assert int(counted) == hand_count(labels, mask, 5, loss_from_segment)

    model = tiny_rmt(segment_size=5, loss_from_segment=loss_from_segment).eval()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)
    assert int(out.num_tokens) == int(counted)


def test_ignore_index_and_positions_per_segment():
    assert IGNORE_INDEX == -100  # what the data pipeline writes and cross-entropy ignores
    config = RMTConfig(backbone=BACKBONES["llama"], num_mem_tokens=3, segment_size=5)
    assert config.positions_per_segment == positions_per_segment(5, 3) == 5 + 3 + 3
    assert "positions_per_segment" not in config.to_dict()  # derived, not saved


def hand_flops(d, d_q, d_kv, mlp_weights, layers, vocab, calls):
    """The documented count (docs/benchmarks.md), multiply-add by multiply-add: 6 FLOPs for each
    (2 per multiply-add, x3 for forward + backward); attention as d_q per causal query-key pair."""
    total = 0
    for n, s in calls:
        weights_per_layer = d * d_q + d * d_kv + d * d_kv + d_q * d + mlp_weights  # q, k, v, o, MLP
        linear = layers * n * weights_per_layer
        pairs = sum(i + 1 for i in range(n))  # query i sees keys 0..i
        attention = layers * pairs * d_q
        head = s * d * vocab
        total += 6 * (linear + attention + head)
    return total


@pytest.mark.parametrize("backbone", ["llama", "gpt2"])
def test_training_flops_match_a_hand_count(backbone):
    config = RMTConfig(backbone=BACKBONES[backbone], num_mem_tokens=3, segment_size=5)
    if backbone == "llama":  # d 32, 4 heads of 8, 2 KV heads, SwiGLU 64: gate, up, down
        shape = dict(d=32, d_q=32, d_kv=16, mlp_weights=3 * 32 * 64, layers=2, vocab=48)
    else:  # d 32, 4 heads, n_inner None = 4d: up, down
        shape = dict(d=32, d_q=32, d_kv=32, mlp_weights=2 * 32 * 128, layers=2, vocab=48)
    # 12 tokens: segments of 5, 5 and 2 tokens, each with 3 + 3 memory positions.
    assert config.training_flops(12) == hand_flops(**shape, calls=[(11, 5), (11, 5), (8, 2)])
    assert config.training_flops(12, num_mem_tokens=0) == hand_flops(**shape, calls=[(5, 5), (5, 5), (2, 2)])
    backbone_config = AutoConfig.for_model(**BACKBONES[backbone])
    assert backbone_training_flops(backbone_config, 12, 12) == hand_flops(**shape, calls=[(12, 12)])


def test_zero3_attribute_probes():
    param = torch.nn.Parameter(torch.zeros(4, 3))
    assert not is_partitioned(param) and full_shape(param) is None and not is_released(param)

    class Status:
        name = "NOT_AVAILABLE"

    param.ds_id, param.ds_shape, param.ds_status = 7, torch.Size([4, 3]), Status()  # as zero.Init sets them
    assert is_partitioned(param) and full_shape(param) == (4, 3) and is_released(param)


def test_conventions_import_neither_torch_nor_transformers(repo_root):
    """training.data takes IGNORE_INDEX from model.conventions: the package stays cheap to import."""
    from training.data import memory_tasks, packing

    assert memory_tasks.IGNORE is IGNORE_INDEX and packing.IGNORE is IGNORE_INDEX
    code = ("import sys; import model.conventions; "
            "loaded = [m for m in ('torch', 'transformers', 'model.modeling_rmt') if m in sys.modules]; "
            "assert not loaded, loaded")
    run = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
