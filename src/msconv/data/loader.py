"""Datasets and loaders for training: an ImageFolder tree or the bundled digits, with timm's transforms.

Determinism (what makes ``--resume`` bit-exact and a torchrun run equal to a single-process one):
- the order of an epoch is a permutation drawn from ``seed + epoch`` (``ResumableDistributedSampler``, a
  ``DistributedSampler`` that can start mid-epoch);
- every sample's augmentation is drawn from its own seed ``(seed, epoch, index)`` (``SeededDataset``), so it
  does not depend on which worker, which rank or which resumed process loads it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

__all__ = [
    'SeededDataset',
    'ResumableDistributedSampler',
    'check_image_folder',
    'build_dataset',
    'build_transform',
    'build_loader',
    'IMAGE_EXTENSIONS',
    'CheckedImageFolder',
    'DataError',
    'count_unreadable',
    'unreadable_message',
]

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    # A fixed mixing of the three integers (SplitMix-like); stable across processes and Python versions.
    x = (seed * 0x9E3779B1 + epoch * 0x85EBCA77 + index * 0xC2B2AE3D + 0x27D4EB2F) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 29
    return x & 0x7FFFFFFF


class SeededDataset(Dataset):
    """Wraps a dataset so that sample ``i`` of epoch ``e`` is augmented from the seed ``(seed, e, i)``.

    ``seed=None`` passes samples through (evaluation). With ``restore_rng=True`` the global ``random``, ``numpy``
    and ``torch`` generators are put back after each sample (costs ~0.5 ms a sample, mostly numpy's state copy);
    the trainer does not need it because it reseeds every optimizer step.
    """

    def __init__(self, dataset: Dataset, seed: Optional[int], restore_rng: bool = False):
        self.dataset = dataset
        self.seed = None if seed is None else int(seed)
        self.restore_rng = restore_rng
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if self.seed is None:  # evaluation: deterministic transforms, nothing to seed
            return self.dataset[index]
        s = _sample_seed(self.seed, self.epoch, int(index))
        gen = torch.default_generator  # CPU generator only: transforms run on CPU
        if not self.restore_rng:
            random.seed(s)
            np.random.seed(s)
            gen.manual_seed(s)
            return self.dataset[index]
        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), gen.get_state()
        random.seed(s)
        np.random.seed(s)
        gen.manual_seed(s)
        try:
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            gen.set_state(torch_state)


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` whose epoch can start at a given batch (for mid-epoch resume).

    With ``num_replicas=1`` it is a plain seeded shuffler; with N ranks, the union of the N local batches of
    step ``s`` is exactly the global batch ``s`` of a single-process run with N times the batch size.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0

    def set_start(self, num_samples_to_skip: int) -> None:
        """Skip the first ``num_samples_to_skip`` local samples of the current epoch (reset by ``set_epoch``)."""
        self.start = int(num_samples_to_skip)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


def check_image_folder(root: Path, split: str) -> List[str]:
    """Validate ``root/split`` as an ImageFolder tree before any work; returns its class names."""
    folder = root / split
    if not folder.is_dir():
        raise ValueError(
            f"data {str(root)!r}: missing the {split!r} subfolder {str(folder)!r}. An image-folder dataset needs "
            f"train/ and val/ subfolders, each with one subfolder of images per class (or pass --data digits)."
        )
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith('.'))
    if len(classes) < 2:
        raise ValueError(
            f"data {str(folder)!r} has {len(classes)} class subfolder(s) {classes}; classification needs at least "
            f"2 classes, each a subfolder of images."
        )
    empty = [
        c
        for c in classes
        if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in (folder / c).rglob('*') if p.is_file())
    ]
    if empty:
        raise ValueError(f"data {str(folder)!r}: class folder(s) {empty} contain no images ({IMAGE_EXTENSIONS})")
    return classes


class DataError(ValueError):
    """Too many unreadable samples in a split (the message names the split and the threshold)."""


_SLOTS = 64  # one counter per DataLoader worker (+ the main process); ids beyond wrap around


class CheckedImageFolder:
    """An ``ImageFolder`` that survives unreadable images (truncated, corrupt, not an image).

    A file that fails to load is reported with a warning naming it and counted; the sample is replaced by the next
    readable one, so batches keep their size. With ``exclude=True`` (evaluation) the replacement carries the label
    -1 so that accuracy counts every readable image once and nothing else. ``unreadable`` counts failures since the
    last ``reset_unreadable()``, across DataLoader worker processes (a shared-memory counter per worker).
    """

    def __init__(self, root: Union[str, Path], transform: Optional[Callable] = None, exclude: bool = False):
        from torchvision.datasets import ImageFolder

        self._folder = ImageFolder(str(root), transform=transform)
        self.root = str(root)
        self.classes, self.class_to_idx = self._folder.classes, self._folder.class_to_idx
        self.samples, self.targets = self._folder.samples, self._folder.targets
        self.transform = transform
        self.exclude = exclude
        self._bad = torch.zeros(_SLOTS, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def unreadable(self) -> int:
        return int(self._bad.sum())

    def reset_unreadable(self) -> None:
        self._bad.zero_()

    def _record(self, path: str, error: BaseException) -> None:
        import warnings

        info = torch.utils.data.get_worker_info()
        self._bad[(0 if info is None else info.id + 1) % _SLOTS] += 1
        warnings.warn(f"skipping unreadable image {path!r}: {type(error).__name__}: {error}", stacklevel=3)

    def __getitem__(self, index: int):
        n = len(self.samples)
        for attempt in range(n):
            path, target = self.samples[(index + attempt) % n]
            try:
                img = self._folder.loader(path)
            except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for truncated / corrupt / foreign files
                self._record(path, e)
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, (-1 if self.exclude and attempt else target)
        raise DataError(f"data {self.root!r}: none of its {n} images can be read")


def count_unreadable(dataset) -> Optional[int]:
    """Unreadable images met since the last reset, for a ``CheckedImageFolder`` (None for other datasets)."""
    return dataset.unreadable if isinstance(dataset, CheckedImageFolder) else None


def unreadable_message(dataset, split: str, threshold: float, share: int = 1) -> Optional[str]:
    """The error message when more than ``threshold`` (a fraction) of ``split`` could not be read, else None.

    ``share``: the number of processes the split is divided among (each counts only what it loads)."""
    bad = count_unreadable(dataset)
    if not bad or bad * share <= threshold * len(dataset):
        return None
    return (
        f"data {getattr(dataset, 'root', '?')!r}: {bad} images could not be read in this process's "
        f"{len(dataset) // share} of {split}/, more than bad_image_threshold={threshold:g} of the split; the "
        f"warnings above name each file. Fix or remove them, or raise the threshold (--set "
        f"bad_image_threshold=...)."
    )


def _posterize_keep_zero_bits(img, bits_to_keep, **_):
    """timm's posterize with the pre-Pillow-11 meaning of 0 bits kept (a black image).

    RandAugment 'rand-m9-mstd0.5-inc1' (the papers' recipe) draws magnitude 10 now and then, which maps to
    PosterizeIncreasing with 0 bits; recent Pillow raises "bits must be between or equal to 1 and 8" there, which
    would crash a training run after hours.
    """
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    from timm.data import auto_augment

    for name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
        if auto_augment.NAME_TO_OP.get(name) is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize_keep_zero_bits


def build_transform(cfg, is_training: bool, input_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """timm's train/eval transform from the augmentation fields of a ``TrainConfig``."""
    from timm.data import create_transform

    _patch_timm_posterize()
    if is_training:
        return create_transform(
            input_size,
            is_training=True,
            scale=tuple(cfg.scale),
            ratio=tuple(cfg.ratio),
            hflip=cfg.hflip,
            color_jitter=cfg.color_jitter if cfg.color_jitter > 0 else None,
            auto_augment=cfg.auto_augment or None,
            interpolation=cfg.interpolation,
            mean=tuple(mean),
            std=tuple(std),
            re_prob=cfg.re_prob,
            re_mode=cfg.re_mode,
            re_count=cfg.re_count,
        )
    return create_transform(
        input_size,
        is_training=False,
        interpolation=cfg.interpolation,
        mean=tuple(mean),
        std=tuple(std),
        crop_pct=cfg.crop_pct,
    )


def build_dataset(cfg, split: str, input_size: int, mean, std, is_training: Optional[bool] = None) -> Dataset:
    """The ``split`` ('train' or 'val') of ``cfg.data`` (a folder path or 'digits') with its transform."""
    is_training = (split == 'train') if is_training is None else is_training
    transform = build_transform(cfg, is_training, input_size, mean, std)
    if cfg.data == 'digits':
        from .digits import DigitsDataset

        return DigitsDataset(split, image_size=input_size, transform=transform)
    root = Path(cfg.data)
    check_image_folder(root, split)
    return CheckedImageFolder(root / split, transform=transform, exclude=not is_training)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int,
    world_size: int = 1,
    rank: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    collate_fn: Optional[Callable] = None,
) -> Tuple[DataLoader, ResumableDistributedSampler]:
    """A loader over ``dataset`` (wrapped in ``SeededDataset``) with a ``ResumableDistributedSampler``.

    ``batch_size`` is the per-process batch. Training loaders (``shuffle=True``) seed every sample's augmentation.
    Evaluation loaders (``shuffle=False``) pad the last rank's share as DistributedSampler does; the caller
    de-duplicates by counting only ``len(dataset)`` samples.
    """
    seeded = SeededDataset(dataset, seed if shuffle else None)
    sampler = ResumableDistributedSampler(seeded, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    loader = DataLoader(
        seeded,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=False,
        collate_fn=collate_fn,  # None: torch's default (stacked tensors); the dense tasks pass theirs
    )
    return loader, sampler
