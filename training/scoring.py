"""Memory-task answer scoring: the one definition of exact match and token accuracy, shared by the
trainer's eval (`Trainer._eval_memory_tasks`) and `python -m training.evaluate`.

Teacher-forced: position i predicts labels[i+1]; the answer is every target that is not
IGNORE_INDEX. A sample is an exact match when every answer token is predicted right (equal to
greedy decoding's exact match: while every earlier answer token is right, both see the same
prefix); a sample without any answer token is never one.
"""

from __future__ import annotations

import torch

from model.conventions import IGNORE_INDEX


def answer_scores(predicted: torch.Tensor, labels: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: (exact match bool [B], correct answer tokens [B], answer tokens [B]).

    `predicted` [B, L] holds the predicted next token at every position, `labels` [B, L]."""
    target = labels[:, 1:]
    answer = target != IGNORE_INDEX
    correct = ((predicted[:, :-1] == target) & answer).sum(1)
    count = answer.sum(1)
    return (correct == count) & (count > 0), correct, count


def answer_totals(predicted: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 [correct answer tokens, answer tokens, exact matches, samples with an answer] of a
    batch: sums that add up across batches and ranks (see `accuracies`)."""
    exact, correct, count = answer_scores(predicted, labels)
    return torch.tensor([correct.sum().item(), count.sum().item(), exact.sum().item(),
                         (count > 0).sum().item()], dtype=torch.float64)


def accuracies(totals: torch.Tensor) -> tuple[float, float]:
    """(token accuracy, exact-match rate) from summed `answer_totals`; 0 where nothing was scored."""
    return (totals[0].item() / max(totals[1].item(), 1),
            totals[2].item() / max(totals[3].item(), 1))
