"""The bit-width router's training losses.

``router_loss`` (D²MoE, "Dynamic Bit-Width Selection Loss", objective ``kl``)::

    loss = mean_x [ task(x) + (alpha / L) * sum_l sum_k p_k^l(x) * b_k ]

``task`` is KL(teacher || model) of the next-token distributions, the teacher
being the unquantized model (or the widest stored width); ``p^l(x)`` the
router probabilities of layer ``l`` for the pairs of token ``x``, so the
second term is the expected width, averaged over layers, weighed by ``alpha``.

``allocation_loss`` (objective ``error``): each pair's measured cost ``c_k``
of width k (its predicted share of the KL, in units where a typical pair's
narrowest-to-widest difference is 1) defines the error-aware allocation at a
global shift ``s``: width ``argmin_k c_k + s * b_k``, the Lagrangian optimum of
"least total error for this many bits". Serving picks ``argmax_k logit_k -
s * b_k``, so the router is fitted to ``softmax(-c - s b)`` at shifts spread
over the range where pairs change width; its logits then approximate ``-c``
and one shift serves every target.
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


def allocation_loss(logits: torch.Tensor, costs: torch.Tensor, widths: Sequence[int],
                    shifts: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of KL(softmax(-costs - s b) || softmax(logits - s b)).

    ``logits, costs [pairs, K]``, ``shifts [pairs]`` (one shift per pair).
    """
    bits = torch.tensor(widths, dtype=torch.float32, device=logits.device)
    penalty = shifts.float().unsqueeze(-1) * bits
    target = (-costs.float() - penalty).log_softmax(-1)
    model = (logits.float() - penalty).log_softmax(-1)
    return F.kl_div(model, target, log_target=True, reduction="batchmean")
