"""Offline dense-prediction sets from the bundled MNIST digits (:mod:`msconv.data.digits`), written as real files
in the COCO and ADE20K formats so that they go through the real loaders (:mod:`msconv.data.coco`,
:mod:`msconv.data.ade`).

Each image is a dark canvas (low grey noise) with 1-3 digits pasted at random sizes (default 36-72 px square,
from the 28x28 originals, bilinear), in random colours, without overlapping boxes. Keep digits large against the
detectors' anchors: RetinaNet's smallest anchors are 32-50 px (stride 8), and at IoU 0.5 digits pasted under
~32 px get a single low-quality positive anchor each (a micro RetinaNet then barely learns to classify them).
A digit's instance mask is its resized pixels above half intensity; its box is the tight box of that mask.

* :func:`build_digits_coco` -> ``ROOT/{split}/NNNNNN.png`` and ``ROOT/annotations/instances_{split}.json`` with
  10 categories (ids 1-10, names '0'-'9'), boxes, areas and RLE masks.
* :func:`build_digits_ade` -> ``ROOT/images/{split}/NNNNNN.jpg`` and ``ROOT/annotations/{split}/NNNNNN.png``:
  label 1 background, 2-11 the digits 0-9, 0 (ignored) on the soft edge of each digit (intensity 48-127), so
  that with ``reduce_zero_label`` there are 11 classes (0 background, 1-10 digits 0-9) and an ignore band.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Tuple, Union

import numpy as np
from PIL import Image, ImageFilter

from .._extras import require
from .digits import load_digits

__all__ = ['build_digits_coco', 'build_digits_ade', 'DIGITS_DENSE_CLASSES']

DIGITS_DENSE_CLASSES = tuple(str(i) for i in range(10))
_SPLIT_OF = {'train': 'train', 'val': 'val', 'training': 'train', 'validation': 'val'}


def _check(n_images: int, canvas: Tuple[int, int], digit_size: Tuple[int, int], max_digits: int) -> None:
    if not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be a positive int, got {n_images!r}")
    if len(canvas) != 2 or not all(isinstance(v, int) and v >= 32 for v in canvas):
        raise ValueError(f"canvas must be (height, width) ints >= 32, got {canvas!r}")
    lo, hi = digit_size
    if not (isinstance(lo, int) and isinstance(hi, int) and 8 <= lo <= hi <= min(canvas)):
        raise ValueError(f"digit_size must be (lo, hi) ints with 8 <= lo <= hi <= min(canvas), got {digit_size!r}")
    if not isinstance(max_digits, int) or max_digits < 1:
        raise ValueError(f"max_digits must be a positive int, got {max_digits!r}")


def _compose(
    rng: np.random.RandomState,
    digits: np.ndarray,
    labels: np.ndarray,
    canvas: Tuple[int, int],
    digit_size: Tuple[int, int],
    max_digits: int,
):
    """One canvas: (RGB uint8 (H, W, 3), [(class, alpha float (H, W) in [0, 1])])."""
    h, w = canvas
    image = rng.randint(0, 24, size=(h, w, 3)).astype(np.float32)
    placed: List[Tuple[int, int, int, int]] = []
    objects = []
    for _ in range(rng.randint(1, max_digits + 1)):
        for _try in range(30):
            s = rng.randint(digit_size[0], digit_size[1] + 1)
            y, x = rng.randint(0, h - s + 1), rng.randint(0, w - s + 1)
            if all(x + s <= a or a2 <= x or y + s <= b or b2 <= y for a, b, a2, b2 in placed):
                break
        else:
            continue
        k = rng.randint(len(digits))
        patch = np.asarray(Image.fromarray(digits[k]).resize((s, s), Image.BILINEAR), dtype=np.float32) / 255.0
        if (patch > 0.5).sum() < 4:
            continue
        placed.append((x, y, x + s, y + s))
        alpha = np.zeros((h, w), np.float32)
        alpha[y : y + s, x : x + s] = patch
        color = rng.randint(140, 256, size=3).astype(np.float32)
        image = image * (1 - alpha[..., None]) + color * alpha[..., None]
        objects.append((int(labels[k]), alpha))
    return image.round().clip(0, 255).astype(np.uint8), objects


def build_digits_coco(
    root: Union[str, os.PathLike],
    split: str = 'train',
    n_images: int = 200,
    canvas: Tuple[int, int] = (128, 128),
    digit_size: Tuple[int, int] = (36, 72),
    max_digits: int = 3,
    seed: int = 0,
) -> Tuple[Path, Path]:
    """Write a COCO-format digits detection set; returns ``(image_folder, instances_json)``.

    ``split`` 'train' or 'val' also picks the digits' own split (so val digits are unseen), ``seed`` the layout.
    """
    mask_utils = require('pycocotools.mask', 'the dense digits (COCO-format masks)')
    if split not in ('train', 'val'):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    _check(n_images, canvas, digit_size, max_digits)
    root = Path(root)
    img_dir, ann_dir = root / split, root / 'annotations'
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    digits, labels = load_digits(split)
    rng = np.random.RandomState(seed)
    images, annotations = [], []
    for i in range(n_images):
        image, objects = _compose(rng, digits, labels, canvas, digit_size, max_digits)
        name = f"{i:06d}.png"
        Image.fromarray(image).save(img_dir / name)
        images.append(dict(id=i + 1, file_name=name, height=canvas[0], width=canvas[1]))
        for cls, alpha in objects:
            m = alpha > 0.5
            ys, xs = np.nonzero(m)
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle['counts'] = rle['counts'].decode('ascii')
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=i + 1,
                    category_id=cls + 1,
                    bbox=[x0, y0, x1 - x0, y1 - y0],
                    area=int(m.sum()),
                    iscrowd=0,
                    segmentation=rle,
                )
            )
    categories = [dict(id=c + 1, name=DIGITS_DENSE_CLASSES[c], supercategory='digit') for c in range(10)]
    ann_file = ann_dir / f"instances_{split}.json"
    ann_file.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    return img_dir, ann_file


def build_digits_ade(
    root: Union[str, os.PathLike],
    split: str = 'training',
    n_images: int = 200,
    canvas: Tuple[int, int] = (128, 128),
    digit_size: Tuple[int, int] = (36, 72),
    max_digits: int = 3,
    seed: int = 0,
    label_dilation: int = 0,
) -> Path:
    """Write an ADE20K-format digits segmentation set (11 classes after ``reduce_zero_label``); returns ``root``.

    ``split`` 'training' or 'validation' (the digits' train / val split). ``label_dilation`` > 0 labels each digit's
    strokes dilated by that many pixels (a square max filter; the ignore band then lies outside the dilated
    strokes): thin strokes, one stride-4 feature cell wide, bound the IoU of any model that upsamples its logits.
    """
    if split not in ('training', 'validation'):
        raise ValueError(f"split must be 'training' or 'validation', got {split!r}")
    _check(n_images, canvas, digit_size, max_digits)
    if not isinstance(label_dilation, int) or isinstance(label_dilation, bool) or label_dilation < 0:
        raise ValueError(f"label_dilation must be an int >= 0, got {label_dilation!r}")
    root = Path(root)
    img_dir, ann_dir = root / 'images' / split, root / 'annotations' / split
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    digits, labels = load_digits(_SPLIT_OF[split])
    rng = np.random.RandomState(seed)
    for i in range(n_images):
        image, objects = _compose(rng, digits, labels, canvas, digit_size, max_digits)
        label = np.ones(canvas, np.uint8)  # 1: background
        for cls, alpha in objects:
            ink, edge = alpha > 0.5, alpha > 48 / 255
            if label_dilation > 0:
                k = 2 * label_dilation + 1
                ink = np.asarray(Image.fromarray(ink.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(k))) > 0
                edge = np.asarray(Image.fromarray(edge.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(k))) > 0
            label[ink] = cls + 2
            label[edge & ~ink] = 0  # soft edge: ignored
        Image.fromarray(image).save(img_dir / f"{i:06d}.jpg", quality=95)
        Image.fromarray(label).save(ann_dir / f"{i:06d}.png")
    return root
