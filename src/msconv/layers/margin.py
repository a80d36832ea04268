"""Additive-margin softmax heads for face-recognition training: ArcFace and CosFace.

- ArcFace: Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
  CVPR 2019 (arXiv 1801.07698). Target logit ``s * cos(theta + m)``.
- CosFace: Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018
  (arXiv 1801.09414). Target logit ``s * (cos(theta) - m)``.

Both hold a class-centre matrix ``weight`` of shape (num_classes, embedding_size) and map (embeddings, labels)
to logits for ``nn.CrossEntropyLoss``; every non-target logit is ``s * cos(theta)``. In eval (no labels needed),
``cosine(embeddings)`` gives the plain cosine similarities.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['ArcFace', 'CosFace']


class _MarginHead(nn.Module):
    def __init__(self, embedding_size: int, num_classes: int, s: float, m: float) -> None:
        super().__init__()
        if not isinstance(embedding_size, int) or embedding_size <= 0:
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        if not isinstance(num_classes, int) or num_classes <= 1:
            raise ValueError(f"num_classes must be an int > 1, got {num_classes!r}")
        if not s > 0:
            raise ValueError(f"s (the logit scale) must be > 0, got {s!r}")
        if not 0 <= m < math.pi / 2:
            raise ValueError(f"m (the margin) must be in [0, pi/2), got {m!r}")
        self.embedding_size, self.num_classes, self.s, self.m = embedding_size, num_classes, float(s), float(m)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each embedding with each class centre, (B, num_classes)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must have shape (B, {self.embedding_size}), got {tuple(embeddings.shape)}")
        return F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float())).clamp(-1.0, 1.0)

    def _check_labels(self, labels: torch.Tensor, batch: int) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor) or labels.shape != (batch,) or labels.is_floating_point():
            raise ValueError(f"labels must be an integer tensor of shape ({batch},), got {labels!r:.80}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), got range [{labels.min().item()}, {labels.max().item()}]"
            )
        return labels.long()

    def target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) with the margin applied to each sample's target class."""
        cos = self.cosine(embeddings)
        labels = self._check_labels(labels, cos.shape[0])
        idx = labels.unsqueeze(1)
        target = self.target_logit(cos.gather(1, idx))
        return self.s * cos.scatter(1, idx, target)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, s={self.s}, m={self.m}"


class ArcFace(_MarginHead):
    """ArcFace head: target logit ``s * cos(theta + m)``.

    Where ``theta + m`` would pass pi (cos(theta + m) would rise again), the target logit continues with the
    linear penalty ``cos(theta) - m * sin(m)``, the usual ArcFace convention that keeps it monotone in theta.
    """

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__(embedding_size, num_classes, s, m)

    def target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        sin_t = torch.sqrt((1.0 - cos_t * cos_t).clamp_min(1e-12))
        phi = cos_t * math.cos(self.m) - sin_t * math.sin(self.m)
        return torch.where(cos_t > math.cos(math.pi - self.m), phi, cos_t - math.sin(math.pi - self.m) * self.m)


class CosFace(_MarginHead):
    """CosFace head: target logit ``s * (cos(theta) - m)``."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.35) -> None:
        super().__init__(embedding_size, num_classes, s, m)

    def target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        return cos_t - self.m
