"""Classification losses: focal (paper default), BCE and CE, with optional class weights."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import FocalLoss


def classification_loss(logits: torch.Tensor, target: torch.Tensor, task_type: str, kind: str = "focal",
                        gamma: float = 2.0, alpha: float = 0.25, class_weights: torch.Tensor | None = None,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """logits (B, K); target: (B,) class index for multiclass, (B, K) {0,1} otherwise.

    ``label_smoothing`` ε: multiclass targets become (1 - ε) one-hot + ε / K (torch's ``cross_entropy``
    smoothing); binary and multilabel {0,1} targets become ε / 2 and 1 - ε / 2.

    Binary/multilabel focal is MONAI's sigmoid ``FocalLoss`` (alpha weights positives).
    Multiclass focal is (1 - p_t)^gamma * CE, with ``class_weights`` as the per-class alpha.
    ``class_weights`` for binary/multilabel are positive-class weights (pos_weight) in BCE mode.
    """
    if task_type == "multiclass":
        target = target.long().view(-1)
        ce = F.cross_entropy(logits, target, weight=class_weights, reduction="none", label_smoothing=label_smoothing)
        if kind == "ce":
            return ce.mean()
        if kind != "focal":
            raise ValueError(f"loss {kind!r} is not defined for multiclass (use focal or ce)")
        pt = torch.exp(-F.cross_entropy(logits, target, reduction="none"))
        return ((1 - pt) ** gamma * ce).mean()
    hard = target.float().view_as(logits)
    target = hard * (1.0 - label_smoothing) + 0.5 * label_smoothing if label_smoothing else hard
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=class_weights)
    if kind != "focal":
        raise ValueError(f"loss {kind!r} is not defined for {task_type} (use focal or bce)")
    loss = FocalLoss(gamma=gamma, alpha=alpha if alpha >= 0 else None, use_softmax=False, reduction="none")(logits, target)
    if class_weights is not None:
        loss = loss * torch.where(hard > 0, class_weights.to(loss.dtype), torch.ones_like(loss))
    return loss.mean()
