"""Where each (token, expert) pair's bit-width is chosen.

The expert router picks experts; this module makes the second routing decision
of D²MoE's dual routing, the width. For now the policy is one fixed serving
width for every pair.
"""

import torch


def select_widths(topk_ids: torch.Tensor, serving_bits: int) -> torch.Tensor:
    """Width (bits) for every entry of ``topk_ids [tokens, top_k]``."""
    return torch.full_like(topk_ids, serving_bits, dtype=torch.int8)
