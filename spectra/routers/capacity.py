"""Hard expert capacity, processed in priority order (never exceeded)."""

from __future__ import annotations

import torch


def capacity_keep(expert_index: torch.Tensor, capacity: int, num_experts: int,
                  priority: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask over assignments: True for those within their expert's capacity.

    Assignments are processed in priority order — descending `priority` if given, else list order
    (slot-major token-choice lists give GShard's "all first choices first"). An assignment is kept iff
    its cumulative position among the assignments of its expert is < `capacity`, so no expert ever
    receives more than `capacity` tokens.
    """
    m = expert_index.numel()
    if m == 0:
        return torch.zeros(0, dtype=torch.bool, device=expert_index.device)
    order = (torch.argsort(priority, descending=True, stable=True) if priority is not None
             else torch.arange(m, device=expert_index.device))
    ordered = expert_index[order]
    by_expert = torch.argsort(ordered, stable=True)  # groups by expert, keeps priority order within
    counts = torch.bincount(ordered, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(ordered)
    position[by_expert] = torch.arange(m, device=expert_index.device) - starts[ordered[by_expert]]
    keep = torch.empty(m, dtype=torch.bool, device=expert_index.device)
    keep[order] = position < capacity
    return keep
