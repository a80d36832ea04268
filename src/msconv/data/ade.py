"""ADE20K-format semantic segmentation folders with the official UperNet configs' augmentations.

Layout (as ADEChallengeData2016): ``ROOT/images/{training,validation}/NAME.jpg`` (or .png) and
``ROOT/annotations/{training,validation}/NAME.png``, one 8-bit label PNG per image. With ``reduce_zero_label``
(ADE20K: label 0 is "other"), 0 becomes the ignore index 255 and labels 1..150 become classes 0..149, as
mmsegmentation does; any other value above ``num_classes`` is an error naming the file.

* :class:`ADESegmentation` -> ``(image, mask)``: ``tv_tensors.Image`` (3, H, W) and ``tv_tensors.Mask`` (1, H, W)
  before the transforms; after :func:`segmentation_train_transforms` / :func:`segmentation_eval_transforms`, a
  float image in [0, 1] and an int64 (H, W) mask.
* Images are read by :func:`msconv.data.images.load_image` (EXIF orientation, 16-bit samples, the
  decompression-bomb limit); label PNGs as stored.
* Bad data: an image without annotation PNG (or the reverse), an unreadable file, a size mismatch or an
  out-of-range label raises a ``ValueError`` naming the file, or with ``on_error='skip'`` is skipped with a warning
  naming it and counted once in ``dataset.skips`` (:class:`msconv.data.skips.SkippedFiles`): unpaired files when
  the folder is read, a pair that fails when it is first loaded (marked in shared memory, so DataLoader workers
  count it too; the item is replaced by the next usable pair).
* :func:`segmentation_train_transforms`: random rescale of the (2048, 512) scale by a ratio in [0.5, 2.0] (keep
  aspect), random 512x512 crop in which no class covers more than 75% (10 tries), flip 0.5, photometric
  distortion, padding to 512 (image 0, label 255).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .coco import _check_on_error
from .images import BAD_ANNOTATION, UnusableFile, load_image
from .skips import DataError, SkippedFiles

__all__ = [
    'ADESegmentation',
    'RandomRescale',
    'RandomCropCatMax',
    'PadTo',
    'PhotometricDistortion',
    'segmentation_train_transforms',
    'segmentation_eval_transforms',
    'collate_segmentation',
    'IGNORE_INDEX',
    'rescale_size',
]

IGNORE_INDEX = 255
_IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')


class ADESegmentation(Dataset):
    """An ADE20K-format folder (see the module docstring).

    Args:
        root: the dataset folder (holding ``images/`` and ``annotations/``).
        split: sub-folder name, ``'training'`` or ``'validation'``.
        transforms: called as ``transforms(image, mask)``.
        num_classes: classes after ``reduce_zero_label`` (150 for ADE20K).
        reduce_zero_label: map 0 to 255 and shift the others down by one.
        on_error: ``'raise'`` or ``'skip'``.
        exclude: the stand-in of an unusable image (the next usable one) gets a label of ``IGNORE_INDEX`` only, so
            that evaluation counts every usable image once and an unusable one not at all (as a classification
            val set's label -1).
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        split: str = 'training',
        transforms: Optional[Callable] = None,
        num_classes: int = 150,
        reduce_zero_label: bool = True,
        on_error: str = 'raise',
        exclude: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.exclude = exclude
        self.transforms = transforms
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.on_error = _check_on_error(on_error)
        if not isinstance(num_classes, int) or not 0 < num_classes < IGNORE_INDEX:
            raise ValueError(f"num_classes must be an int in [1, {IGNORE_INDEX}), got {num_classes!r}")
        img_dir, ann_dir = self.root / 'images' / split, self.root / 'annotations' / split
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise ValueError(
                    f"root must hold images/{split}/ and annotations/{split}/ (ADE20K layout); {d} is not a directory"
                )
        problems: List[Tuple[str, str]] = []
        images = self._files(img_dir, _IMAGE_SUFFIXES, problems)
        labels = self._files(ann_dir, ('.png',), problems)
        problems += [
            (str(images[s]), f"no annotation {ann_dir / (s + '.png')}") for s in sorted(set(images) - set(labels))
        ]
        problems += [
            (str(labels[s]), f"an annotation without an image in {img_dir}") for s in sorted(set(labels) - set(images))
        ]
        if problems and on_error == 'raise':
            raise ValueError(f"{problems[0][0]}: {problems[0][1]} (pass on_error='skip' to skip such files)")
        self.samples = [(images[s], labels[s]) for s in sorted(set(images) & set(labels))]
        if not self.samples:
            raise ValueError(f"{img_dir}: no image with an annotation PNG found")
        self.skips = SkippedFiles(img_dir, [f"{img} (label {ann.name})" for img, ann in self.samples], root=self.root)
        for name, reason in problems:
            self.skips.add(name, reason)

    @staticmethod
    def _files(folder: Path, suffixes: Tuple[str, ...], problems: List[Tuple[str, str]]) -> Dict[str, Path]:
        """The files of ``folder`` by stem; other files, and files sharing a stem (which image goes with which
        label?), are added to ``problems``. Hidden files are left out."""
        by_stem: Dict[str, List[Path]] = {}
        for p in sorted(folder.iterdir()):
            if p.name.startswith('.'):
                continue
            if p.suffix.lower() in suffixes and p.is_file():
                by_stem.setdefault(p.stem, []).append(p)
            else:
                problems.append((str(p), f"not a {'/'.join(suffixes)} file"))
        for paths in by_stem.values():
            if len(paths) > 1:
                problems += [(str(p), f"{len(paths)} files share the name {p.stem!r}") for p in paths]
        return {stem: paths[0] for stem, paths in by_stem.items() if len(paths) == 1}

    @property
    def unreadable(self) -> int:
        """Files and annotations this dataset could not use (``self.skips``), so far."""
        return self.skips.count()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Tuple[Image.Image, np.ndarray]:
        """The RGB image and label array (after ``reduce_zero_label``) of item ``index``; ``UnusableFile`` (a
        ``ValueError``) naming the file if it cannot be used."""
        img_path, ann_path = self.samples[index]
        image = load_image(img_path)
        try:
            with Image.open(ann_path) as an:
                if an.mode not in ('L', 'P'):
                    raise ValueError(f"expected an 8-bit single-channel PNG, got mode {an.mode}")
                label = np.array(an, dtype=np.uint8)
        except Exception as e:
            raise UnusableFile(ann_path, BAD_ANNOTATION, f"unreadable annotation ({type(e).__name__}: {e})") from None
        if label.shape != (image.height, image.width):
            raise UnusableFile(
                ann_path,
                BAD_ANNOTATION,
                f"the annotation is {label.shape[1]}x{label.shape[0]} but the image {img_path.name} is "
                f"{image.width}x{image.height}",
            )
        if self.reduce_zero_label:
            label = label.astype(np.int16) - 1
            label[label < 0] = IGNORE_INDEX
            label = label.astype(np.uint8)
        bad = (label >= self.num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            raise UnusableFile(
                ann_path,
                BAD_ANNOTATION,
                f"label value {int(label[bad].max()) + int(self.reduce_zero_label)} is out of range for "
                f"{self.num_classes} classes",
            )
        return image, label

    def __getitem__(self, index: int):
        n = len(self.samples)
        for attempt in range(n):
            i = (index + attempt) % n
            if self.skips.is_marked(i):
                continue
            try:
                image, label = self.load(i)
            except UnusableFile as e:
                if self.on_error == 'raise':
                    raise
                self.skips.mark(i, e)
                continue
            if self.exclude and attempt:
                label = np.full_like(label, IGNORE_INDEX)
            image = tv_tensors.Image(TF.pil_to_tensor(image))
            mask = tv_tensors.Mask(torch.from_numpy(label)[None])  # (1, H, W) uint8
            if self.transforms is not None:
                image, mask = self.transforms(image, mask)
            return image, mask
        raise DataError(f"{self.root}: no usable image left in the dataset")


def rescale_size(h: int, w: int, scale: Tuple[int, int]) -> Tuple[int, int]:
    """mmcv ``rescale`` with keep_ratio: the largest size with long side <= max(scale), short <= min(scale)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _image_size(flat_inputs: List[Any]) -> Tuple[int, int]:
    return next(TF.get_size(x) for x in flat_inputs if isinstance(x, tv_tensors.Image))


class RandomRescale(v2.Transform):
    """mmseg ``Resize(img_scale=scale, ratio_range=ratio_range, keep_ratio=True)``: the scale times a random ratio,
    then :func:`rescale_size`. Labels are resized with nearest neighbours."""

    def __init__(self, scale: Tuple[int, int] = (2048, 512), ratio_range: Tuple[float, float] = (0.5, 2.0)) -> None:
        super().__init__()
        if not (len(ratio_range) == 2 and 0 < ratio_range[0] <= ratio_range[1]):
            raise ValueError(f"ratio_range must be (lo, hi) with 0 < lo <= hi, got {ratio_range!r}")
        self.scale, self.ratio_range = tuple(scale), tuple(ratio_range)

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        r = random.uniform(*self.ratio_range)
        h, w = _image_size(flat_inputs)
        return dict(size=list(rescale_size(h, w, (int(self.scale[0] * r), int(self.scale[1] * r)))))

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        return TF.resize(inpt, params['size'], antialias=True)


class RandomCropCatMax(v2.Transform):
    """mmseg ``RandomCrop(crop_size, cat_max_ratio)``: a random crop, redrawn up to 10 times while one class
    (ignore excluded) covers more than ``cat_max_ratio`` of it."""

    def __init__(
        self, size: Tuple[int, int] = (512, 512), cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX
    ) -> None:
        super().__init__()
        self.size, self.cat_max_ratio, self.ignore_index = tuple(size), cat_max_ratio, ignore_index

    def _draw(self, h: int, w: int) -> Dict[str, int]:
        ch, cw = min(self.size[0], h), min(self.size[1], w)
        return dict(top=random.randint(0, h - ch), left=random.randint(0, w - cw), height=ch, width=cw)

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        h, w = _image_size(flat_inputs)
        params = self._draw(h, w)
        mask = next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask)), None)
        if mask is None or self.cat_max_ratio >= 1.0:
            return params
        for _ in range(10):
            crop = mask[
                ..., params['top'] : params['top'] + params['height'], params['left'] : params['left'] + params['width']
            ]
            _, counts = torch.unique(crop[crop != self.ignore_index], return_counts=True)
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                break
            params = self._draw(h, w)
        return params

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        return TF.crop(inpt, **params)


class PadTo(v2.Transform):
    """Pad right/bottom to at least ``size``: images with 0, masks with the ignore index (mmseg ``Pad``)."""

    def __init__(self, size: Tuple[int, int] = (512, 512), ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.size, self.ignore_index = tuple(size), ignore_index

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        h, w = _image_size(flat_inputs)
        return dict(padding=[0, 0, max(self.size[1] - w, 0), max(self.size[0] - h, 0)])

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        fill = self.ignore_index if isinstance(inpt, tv_tensors.Mask) else 0
        return TF.pad(inpt, params['padding'], fill=fill)


class PhotometricDistortion(v2.RandomPhotometricDistort):
    """torchvision's ``RandomPhotometricDistort`` without its random channel permutation, which mmseg's
    ``PhotoMetricDistortion`` does not do (the random draws are the same as torchvision's)."""

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        params = super().make_params(flat_inputs)
        params['channel_permutation'] = None
        return params


class _FinishSegmentation(v2.Transform):
    """Float image in [0, 1], int64 (H, W) mask."""

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return inpt.as_subclass(torch.Tensor).long().squeeze(0)
        if isinstance(inpt, tv_tensors.Image):
            return TF.to_dtype(inpt, torch.float32, scale=True)
        return inpt


def segmentation_train_transforms(
    scale: Tuple[int, int] = (2048, 512),
    ratio_range: Tuple[float, float] = (0.5, 2.0),
    crop_size: Tuple[int, int] = (512, 512),
    cat_max_ratio: float = 0.75,
    flip: float = 0.5,
) -> v2.Compose:
    """The ADE20K configs' training pipeline (module docstring); ``flip``: the horizontal flip probability (the
    configs' 0.5; 0 for classes that are not mirror-symmetric, such as digits). Photometric distortion: torchvision's
    ``RandomPhotometricDistort`` with mmseg's ranges (contrast and saturation 0.5-1.5, hue +-18/180 of the
    circle, each with probability 0.5) and, as mmseg, no channel permutation (:class:`PhotometricDistortion`);
    brightness is multiplicative 0.875-1.125 where mmseg adds +-32 levels."""
    if isinstance(flip, bool) or not isinstance(flip, (int, float)) or not 0 <= flip <= 1:
        raise ValueError(f"flip must be a probability in [0, 1], got {flip!r}")
    return v2.Compose(
        [
            RandomRescale(scale, ratio_range),
            RandomCropCatMax(crop_size, cat_max_ratio),
            v2.RandomHorizontalFlip(flip),
            PhotometricDistortion(
                brightness=(0.875, 1.125), contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=(-0.1, 0.1), p=0.5
            ),
            PadTo(crop_size),
            _FinishSegmentation(),
        ]
    )


def segmentation_eval_transforms() -> v2.Compose:
    """Images at their own size (inference rescales to the test scale and maps the logits back)."""
    return v2.Compose([_FinishSegmentation()])


def collate_segmentation(batch: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack equally sized ``(image, mask)`` pairs (training crops); evaluation uses batch size 1."""
    sizes = {tuple(img.shape[-2:]) for img, _ in batch}
    if len(sizes) != 1:
        raise ValueError(
            f"collate_segmentation needs images of one size (train crops), got sizes {sorted(sizes)}; "
            f"use batch_size=1 for evaluation"
        )
    return (
        torch.stack([img.as_subclass(torch.Tensor) for img, _ in batch]),
        torch.stack([m.as_subclass(torch.Tensor) for _, m in batch]),
    )
