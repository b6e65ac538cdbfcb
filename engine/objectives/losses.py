"""Per-sample soft-target cross-entropy: what the example level weights and scores."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def smoothed_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot targets with label smoothing, as timm's Mixup builds them (off value smoothing / K)."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.unsqueeze(1), 1.0 - smoothing + off)


def per_sample_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each sample against soft ``targets`` (B, K); timm's SoftTargetCrossEntropy before its mean."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
