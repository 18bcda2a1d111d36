"""Token windows cut from one token stream, and a model's perplexity on them.

Shared by the reference-model trainer, the router trainer (seeded training
batches, :class:`WindowSampler`) and the accuracy harness (the held-out
windows, :func:`eval_windows`, scored by :func:`perplexity`).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F


class WindowSampler:
    """Batches of ``seq_len + 1``-token windows cut from one token stream.

    Each epoch visits every non-overlapping window once in a seeded random
    order, so the batch for a step is a pure function of ``(seed, step)`` and
    resuming needs no loader state.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < batch_size:
            raise ValueError(f"{len(tokens)} tokens are too few for one batch of {batch_size}x{seq_len}")
        self._epoch, self._order = -1, None

    def batch(self, step: int) -> torch.Tensor:
        rows = []
        for index in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, position = divmod(index, self.num_windows)
            start = int(self._epoch_order(epoch)[position]) * self.seq_len
            rows.append(self.tokens[start : start + self.seq_len + 1])
        return torch.stack(rows)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_windows, generator=generator)
        return self._order


def eval_windows(tokens: np.ndarray, seq_len: int, num_tokens: int) -> torch.Tensor:
    """``num_tokens // seq_len`` windows spread evenly over the whole stream.

    Spreading them (rather than taking a prefix) samples every part of the
    split, which is ordered by document id.
    """
    count = num_tokens // seq_len
    last_start = len(tokens) - seq_len - 1
    if count < 1 or last_start < 0:
        raise ValueError(f"cannot cut {num_tokens} eval tokens from a {len(tokens)}-token stream")
    starts = np.linspace(0, last_start, count).astype(np.int64)
    return torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Perplexity of a causal LM (a transformers model: ``model(input_ids=...).logits``) on each
    window's last ``seq_len`` tokens."""
    was_training = model.training
    model.eval()
    total_nll = 0.0
    for chunk in windows.split(batch_size):
        logits = model(input_ids=chunk[:, :-1]).logits
        total_nll += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum").item()
    model.train(was_training)
    return math.exp(total_nll / windows[:, 1:].numel())
