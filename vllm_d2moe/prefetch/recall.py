"""Recall and precision of predicted expert sets against the experts a layer routed.

Prefetch loads per batch, so sets are compared per group of ``batch`` rows
(one decode step of ``batch`` requests; 1 = one token): the union of the
group's predicted experts against the union of its routed ones, summed over
groups. With widths, an expert counts as covered only when predicted at no
less than the widest width the group needs of it (MWQ nesting: a wider
prefix serves every narrower width); without them, presence is enough.
"""

from dataclasses import dataclass

import torch


@dataclass
class SetCounts:
    """Summed over groups: routed experts, predicted experts, and routed ones predicted (covered)."""

    routed: int = 0
    predicted: int = 0
    covered: int = 0
    groups: int = 0

    def __iadd__(self, other: "SetCounts") -> "SetCounts":
        self.routed += other.routed
        self.predicted += other.predicted
        self.covered += other.covered
        self.groups += other.groups
        return self

    @property
    def recall(self) -> float:
        return self.covered / self.routed if self.routed else float("nan")

    @property
    def precision(self) -> float:
        return self.covered / self.predicted if self.predicted else float("nan")

    @property
    def extra_per_group(self) -> float:
        """Experts predicted beyond those routed, per group (spare reads; negative when fewer)."""
        return (self.predicted - self.routed) / max(1, self.groups)


def group_sets(ids: torch.Tensor, num_experts: int, batch: int, widths: torch.Tensor | None = None) -> torch.Tensor:
    """``[groups, num_experts]`` int: per group of ``batch`` rows of ``ids [rows, k]``, each expert's
    widest width (1 for every listed expert without ``widths``), 0 where not listed."""
    rows = ids.shape[0]
    if rows % batch:
        raise ValueError(f"{rows} rows do not split into groups of {batch}")
    values = torch.ones_like(ids, dtype=torch.long) if widths is None else widths.long()
    grouped_ids = ids.long().reshape(rows // batch, -1)
    table = torch.zeros(rows // batch, num_experts, dtype=torch.long)
    return table.scatter_reduce_(1, grouped_ids, values.reshape(rows // batch, -1), reduce="amax")


def set_counts(
    predicted_ids: torch.Tensor,
    routed_ids: torch.Tensor,
    num_experts: int,
    batch: int = 1,
    predicted_widths: torch.Tensor | None = None,
    routed_widths: torch.Tensor | None = None,
) -> SetCounts:
    """:class:`SetCounts` of predicted against routed experts (rows aligned), per group of ``batch`` rows."""
    if predicted_ids.shape[0] != routed_ids.shape[0]:
        raise ValueError(f"{predicted_ids.shape[0]} predicted rows for {routed_ids.shape[0]} routed rows")
    if (predicted_widths is None) != (routed_widths is None):
        raise ValueError("give widths for both the predicted and the routed experts, or for neither")
    predicted = group_sets(predicted_ids, num_experts, batch, predicted_widths)
    routed = group_sets(routed_ids, num_experts, batch, routed_widths)
    covered = (routed > 0) & (predicted >= routed)
    return SetCounts(
        routed=int((routed > 0).sum()),
        predicted=int((predicted > 0).sum()),
        covered=int(covered.sum()),
        groups=predicted.shape[0],
    )
