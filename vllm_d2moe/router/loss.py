"""The bit-width router's training loss (D²MoE, "Dynamic Bit-Width Selection Loss")::

    loss = mean_x [ task(x) + (alpha / L) * sum_l sum_k p_k^l(x) * b_k ]

``task`` is KL(teacher || model) of the next-token distributions, the teacher
being the unquantized model (or the widest stored width); ``p^l(x)`` the
router probabilities of layer ``l`` for the pairs of token ``x``, so the
second term is the expected width, averaged over layers, weighed by ``alpha``.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossParts:
    total: torch.Tensor
    task: float
    expected_bits: float


def task_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student); logits ``[..., vocab]``."""
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.reshape(-1, vocab).float(), dim=-1)
    teacher = F.log_softmax(teacher_logits.reshape(-1, vocab).float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def expected_bits(layer_probs: Sequence[torch.Tensor], widths: Sequence[int]) -> torch.Tensor:
    """``(1/L) sum_l mean_pairs sum_k p_k b_k`` for per-layer probabilities ``[pairs, K]``."""
    bits = torch.tensor(widths, dtype=torch.float32, device=layer_probs[0].device)
    return torch.stack([(p.float() @ bits).mean() for p in layer_probs]).mean()


def router_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    layer_probs: Sequence[torch.Tensor],
    widths: Sequence[int],
    alpha: float,
) -> LossParts:
    task = task_kl(student_logits, teacher_logits)
    bits = expected_bits(layer_probs, widths)
    return LossParts(task + alpha * bits, float(task), float(bits))
