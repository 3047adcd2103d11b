"""generate(): logits while generating equal one teacher-forced forward (issue 2, acceptance 6)."""

import pytest
import torch

from test_model_common import random_tokens, tiny_rmt

torch.set_num_threads(1)  # tiny models: one thread is as fast and immune to oversubscription

SEG = 5  # segment_size of tiny_rmt
PAD = 0


def generate_and_teacher_force(model, prompt, mask=None, **generate_kwargs):
    """(logits seen while generating [B, n, V], teacher-forced logits of the same positions, sequences)."""
    out = model.generate(
        prompt, attention_mask=mask, output_logits=True, return_dict_in_generate=True,
        pad_token_id=PAD, eos_token_id=None, **generate_kwargs,
    )
    generated = torch.stack(out.logits, dim=1)
    full_mask = None
    if mask is not None:
        full_mask = torch.cat([mask, torch.ones_like(out.sequences[:, prompt.shape[1] :])], dim=1)
    with torch.no_grad():
        forced = model(out.sequences, attention_mask=full_mask).logits
    start = prompt.shape[1] - 1
    return generated, forced[:, start : start + generated.shape[1]], out.sequences


@pytest.mark.parametrize("backbone", ["llama", "gpt2"])
@pytest.mark.parametrize("prompt_length", [3, SEG, 3 * SEG + 2])  # shorter, equal, several segments
def test_greedy_logits_equal_teacher_forced_forward(backbone, prompt_length):
    model = tiny_rmt(backbone).eval()
    prompt = random_tokens(2, prompt_length, seed=20)
    new = 2 * SEG + 3  # crosses at least two segment boundaries
    generated, forced, sequences = generate_and_teacher_force(model, prompt, max_new_tokens=new, do_sample=False)
    assert sequences.shape == (2, prompt_length + new)
    assert (generated - forced).abs().max() <= 1e-4
    assert torch.equal(sequences[:, prompt_length:], generated.argmax(-1))


def test_sampled_generation_with_fixed_seed_matches_teacher_forcing_and_repeats():
    model = tiny_rmt("llama").eval()
    prompt = random_tokens(2, 7, seed=21)
    kwargs = dict(max_new_tokens=3 * SEG, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    torch.manual_seed(1)
    generated, forced, sequences = generate_and_teacher_force(model, prompt, **kwargs)
    torch.manual_seed(1)
    _, _, again = generate_and_teacher_force(model, prompt, **kwargs)
    assert (generated - forced).abs().max() <= 1e-4
    assert torch.equal(sequences, again)
    greedy = model.generate(prompt, max_new_tokens=3 * SEG, do_sample=False, pad_token_id=PAD)
    assert not torch.equal(sequences, greedy)  # sampling really sampled


def test_left_padded_batch_of_different_prompt_lengths():
    model = tiny_rmt("llama").eval()
    lengths = [13, 4, 8]
    width = max(lengths)
    prompt = torch.full((3, width), PAD)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        prompt[row, width - n :] = random_tokens(1, n, seed=30 + row)
        mask[row, width - n :] = 1
    generated, forced, _ = generate_and_teacher_force(model, prompt, mask, max_new_tokens=2 * SEG + 2)
    assert (generated - forced).abs().max() <= 1e-4


def test_right_padded_row_equals_its_unpadded_self_in_forward():
    """Padding only ever hides tokens: positions and memory ignore pads (same math as no pads)."""
    model = tiny_rmt("llama").eval()
    ids = random_tokens(1, 12, seed=31)
    padded = torch.cat([ids, torch.full((1, 3), PAD)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        plain = model(ids, return_memory=True)
        pad = model(padded, attention_mask=mask, return_memory=True)
    torch.testing.assert_close(pad.logits[:, :12], plain.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(pad.memory, plain.memory, rtol=0, atol=1e-5)


def test_eos_stops_a_row_and_pads_it():
    model = tiny_rmt("llama").eval()
    prompt = random_tokens(2, 6, seed=22)
    free = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    eos = int(free[0, 6 + 2])  # row 0's third generated token
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=PAD, eos_token_id=eos)
    row = out[0, 6:].tolist()
    first = row.index(eos)
    assert first <= 2 and all(t == PAD for t in row[first + 1 :])


def test_beam_search_scores_equal_teacher_forced_log_probabilities():
    model = tiny_rmt("llama").eval()
    prompt = random_tokens(1, 4, seed=23)
    new = 2 * SEG
    out = model.generate(
        prompt, max_new_tokens=new, num_beams=3, num_return_sequences=3, do_sample=False,
        output_scores=True, return_dict_in_generate=True, pad_token_id=PAD, eos_token_id=None, length_penalty=1.0,
    )
    with torch.no_grad():
        logp = model(out.sequences).logits.log_softmax(-1)
    chosen = logp[:, 3:-1].gather(-1, out.sequences[:, 4:, None]).squeeze(-1)  # [beams, new]
    torch.testing.assert_close(out.sequences_scores, chosen.sum(-1) / new, rtol=0, atol=1e-4)


def test_generation_continues_from_a_given_memory():
    model = tiny_rmt("llama").eval()
    prompt = random_tokens(2, 6, seed=24)
    memory = torch.randn(2, model.config.num_mem_tokens, model.config.hidden_size) * 0.5
    out = model.generate(prompt, memory=memory, max_new_tokens=2 * SEG, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=PAD, eos_token_id=None)
    with torch.no_grad():
        forced = model(out.sequences, memory=memory).logits[:, 5:-1]
        default = model(out.sequences).logits[:, 5:-1]
    generated = torch.stack(out.logits, dim=1)
    assert (generated - forced).abs().max() <= 1e-4
    assert (generated - default).abs().max() > 1e-3  # the given memory was used
