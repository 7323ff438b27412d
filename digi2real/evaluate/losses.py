"""Additive margin softmax heads (ArcFace, CosFace) with their own class-centre weights.

The margin arithmetic follows insightface arcface_torch ``losses.CombinedMarginLoss``:
ArcFace replaces the target cosine cos(theta) by cos(theta + m) while theta + m < pi and,
past that point (cos(theta) <= cos(pi - m)), by the linear continuation
cos(theta) - m * sin(pi - m), so the target logit stays monotonic in theta; the
"easy margin" variant applies the margin only where cos(theta) > 0. CosFace subtracts m
from the target cosine. Both scale every logit by s before cross-entropy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from digi2real.evaluate.choices import DEFAULT_MARGINS, DEFAULT_SCALE, LOSSES


def arcface_target(cosine: torch.Tensor, margin: float, easy_margin: bool = False) -> torch.Tensor:
    """cos(theta + margin) with arcface_torch's threshold (or easy-margin) handling."""
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    # Clamp before the square root: rounding can push |cos| a hair past 1 and give NaN.
    sine = torch.sqrt((1.0 - cosine * cosine).clamp(min=0.0, max=1.0))
    with_margin = cosine * cos_m - sine * sin_m
    if easy_margin:
        return torch.where(cosine > 0, with_margin, cosine)
    threshold = math.cos(math.pi - margin)
    linear_fallback = cosine - math.sin(math.pi - margin) * margin
    return torch.where(cosine > threshold, with_margin, linear_fallback)


class MarginHead(nn.Module):
    """Normalised linear classifier + margin + scaled cross-entropy; returns the mean loss.

    The class centres are this module's trainable ``weight`` (num_classes, embedding_size).
    Logits are computed in float32 even under autocast: s=64 times a cosine near 1 loses
    the margin's effect in half precision.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        loss: str = "arcface",
        scale: float = DEFAULT_SCALE,
        margin: float | None = None,
        easy_margin: bool = False,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid choices: {list(LOSSES)}")
        if num_classes < 2:
            raise ValueError(f"a margin loss needs >= 2 classes, got {num_classes}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        margin = DEFAULT_MARGINS[loss] if margin is None else float(margin)
        if not 0.0 <= margin < (math.pi / 2 if loss == "arcface" else 2.0):
            raise ValueError(f"{loss} margin out of range: {margin}")
        self.loss = loss
        self.scale = float(scale)
        self.margin = margin
        self.easy_margin = easy_margin
        # Same initialisation as arcface_torch's PartialFC class centres.
        self.weight = nn.Parameter(torch.normal(0, 0.01, (num_classes, embedding_size)))

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits with the margin applied to each row's target class."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cosine = F.linear(
                F.normalize(embeddings.float(), dim=1), F.normalize(self.weight.float(), dim=1)
            ).clamp(-1.0, 1.0)
            rows = torch.arange(labels.shape[0], device=labels.device)
            target = cosine[rows, labels]
            if self.loss == "arcface":
                new_target = arcface_target(target, self.margin, self.easy_margin)
            else:
                new_target = target - self.margin
            # index_put instead of in-place assignment keeps autograd's view of ``cosine``.
            cosine = cosine.index_put((rows, labels), new_target)
            return cosine * self.scale

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.dtype != torch.long:
            labels = labels.long()
        logits = self.logits(embeddings, labels)
        return F.cross_entropy(logits, labels)
