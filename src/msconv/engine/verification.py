"""Face verification on insightface pair sets (LFW, CFP-FP, AgeDB-30 ``.bin`` files, see ``msconv.data.face``).

Protocol (the insightface ``verification.py`` convention):
1. Embed every image and its horizontal flip, add the two embeddings, L2-normalise.
2. Pair distance = squared Euclidean distance between the two normalised embeddings (in [0, 4]).
3. 10-fold accuracy: split the pairs into 10 consecutive folds; for each fold pick the threshold (grid 0..4,
   step 0.01) with the best accuracy on the other 9 folds and report the accuracy on the held-out fold. Mean and
   standard deviation over folds; ``best_threshold`` is the mean of the chosen thresholds.
4. TAR at FAR = 1e-3 over all pairs: the largest threshold whose false-accept rate (impostor pairs with distance
   below it) is <= 1e-3, and the fraction of genuine pairs accepted at it. With fewer than 1,000 impostor pairs
   this means zero false accepts.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['evaluate_verification', 'embed_images', 'verification_metrics']


@torch.no_grad()
def embed_images(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 64,
    device: Union[str, torch.device] = 'cpu',
    flip: bool = True,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """L2-normalised embeddings (N, D) of uint8 images (N, 3, H, W); flip-augmented (sum) when ``flip``."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a (N, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    mean = torch.tensor(mean if mean is not None else cfg.get('mean', (0.5, 0.5, 0.5)), device=device).view(1, 3, 1, 1)
    std = torch.tensor(std if std is not None else cfg.get('std', (0.5, 0.5, 0.5)), device=device).view(1, 3, 1, 1)
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size].to(device)
            x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
            x = (x - mean) / std
            e = model(x).float()
            if flip:
                e = e + model(torch.flip(x, dims=(3,))).float()
            out.append(F.normalize(e, dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def verification_metrics(
    distances: np.ndarray, issame: np.ndarray, nfolds: int = 10, far_target: float = 1e-3
) -> Dict[str, float]:
    """Metrics from pair distances (smaller = more similar) and ground truth (see the module docstring)."""
    distances, issame = np.asarray(distances, dtype=np.float64), np.asarray(issame, dtype=bool)
    n = distances.shape[0]
    if issame.shape != (n,) or n < nfolds:
        raise ValueError(f"need issame of shape ({n},) and at least nfolds={nfolds} pairs, got {issame.shape}")
    thresholds = np.arange(0, 4.0001, 0.01)
    # (T, N) accept matrix, correct where accept == issame
    correct = (distances[None, :] < thresholds[:, None]) == issame[None, :]
    folds = np.array_split(np.arange(n), nfolds)
    accs, best = [], []
    for test in folds:
        train = np.setdiff1d(np.arange(n), test)
        t = int(np.argmax(correct[:, train].mean(1)))
        best.append(thresholds[t])
        accs.append(correct[t, test].mean())
    neg, pos = distances[~issame], distances[issame]
    # accept iff distance < thr; the largest thr with FAR <= target is just above the k-th smallest impostor
    k = int(np.floor(far_target * neg.size))
    thr = np.sort(neg)[k] if k < neg.size else np.inf
    tar = float((pos < thr).mean()) if pos.size else float('nan')
    far = float((neg < thr).mean()) if neg.size else float('nan')
    return {
        'accuracy': float(np.mean(accs)),
        'accuracy_std': float(np.std(accs)),
        'best_threshold': float(np.mean(best)),
        'tar_at_far': tar,
        'far': far,
        'far_target': far_target,
        'far_threshold': float(thr),
        'num_pairs': n,
    }


def evaluate_verification(
    model: nn.Module,
    images: torch.Tensor,
    issame: torch.Tensor,
    batch_size: int = 64,
    device: Union[str, torch.device] = 'cpu',
    flip: bool = True,
    nfolds: int = 10,
    far_target: float = 1e-3,
) -> Dict[str, float]:
    """Embed ``images`` (uint8 (2N, 3, H, W), pairs 2i/2i+1) with ``model`` and score the pairs.

    Returns a dict with ``accuracy`` and ``accuracy_std`` (10-fold, best threshold per fold), ``best_threshold``,
    ``tar_at_far`` (TAR at FAR = ``far_target``, 1e-3 by default), ``far``, ``far_threshold`` and ``num_pairs``.
    """
    if not isinstance(issame, torch.Tensor) or issame.dim() != 1:
        raise ValueError(f"issame must be a 1-D bool tensor, got {getattr(issame, 'shape', type(issame))}")
    if images.shape[0] != 2 * issame.shape[0]:
        raise ValueError(f"images must hold 2 images per pair: {images.shape[0]} images for {issame.shape[0]} pairs")
    emb = embed_images(model, images, batch_size=batch_size, device=device, flip=flip)
    dist = (emb[0::2] - emb[1::2]).pow(2).sum(1).numpy()
    return verification_metrics(dist, issame.numpy(), nfolds=nfolds, far_target=far_target)
