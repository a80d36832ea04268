"""Datasets and loaders for training: an ImageFolder tree or the bundled digits, with timm's transforms.

Determinism (what makes ``--resume`` bit-exact and a torchrun run equal to a single-process one):
- the order of an epoch is a permutation drawn from ``seed + epoch`` (``ResumableDistributedSampler``, a
  ``DistributedSampler`` that can start mid-epoch);
- every sample's augmentation is drawn from its own seed ``(seed, epoch, index)`` (``SeededDataset``), so it
  does not depend on which worker, which rank or which resumed process loads it.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from .images import UnusableFile, load_image
from .skips import DEFAULT_THRESHOLD, DataError, SkippedFiles, skipped_files

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
    'scan_image_folder',
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
    classes = _class_folders(folder)
    if len(classes) < 2:
        raise ValueError(
            f"data {str(folder)!r} has {len(classes)} class subfolder(s) {classes}; classification needs at least "
            f"2 classes, each a subfolder of images."
        )
    empty = [c for c in classes if not any(_images(files) for _, files in _walk_class(str(folder / c), _no, _no))]
    if empty:
        raise ValueError(f"data {str(folder)!r}: class folder(s) {empty} contain no images ({IMAGE_EXTENSIONS})")
    return classes


def _class_folders(folder: Union[str, Path]) -> List[str]:
    """The class folders of a split: its sub-folders (or links to folders), hidden ones (``.name``) left out."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith('.'))


def _images(paths: List[str]) -> List[str]:
    return [p for p in paths if p.lower().endswith(IMAGE_EXTENSIONS)]


def _no(*_) -> None:
    pass


def _walk_class(top: str, skip, note) -> Iterator[Tuple[str, List[str]]]:
    """``(folder, its files sorted)`` under ``top``, following links to folders but reading each real folder
    once: a link back into what was read (``ln -s . loop``) or a second link to the same folder is not followed,
    and ``note``-d. Hidden entries (``.name``) are left out; an entry that is not a regular file (a broken link, a
    pipe) is passed to ``skip``. Sorting the pairs gives torchvision's order (``sorted(os.walk(...))``)."""
    seen = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
        except OSError as e:
            skip(folder, f"folder cannot be read ({type(e).__name__}: {e.strerror or e})")
            continue
        if (st.st_dev, st.st_ino) in seen:
            note(
                f"{folder}: a link to {os.path.realpath(folder)}, a folder already read for this class, is not "
                f"followed (each file is read once)"
            )
            continue
        seen.add((st.st_dev, st.st_ino))
        files, folders = [], []
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            skip(folder, f"folder cannot be listed ({type(e).__name__}: {e.strerror or e})")
            continue
        for entry in entries:
            if entry.name.startswith('.'):
                continue
            if entry.is_dir():
                folders.append(entry.path)
            elif entry.is_file():
                files.append(entry.path)
            else:
                skip(entry.path, 'not a regular file (a broken link, a pipe or a device)')
        yield folder, sorted(files)
        stack.extend(reversed(folders))  # the first name is read first: which of two links is followed is fixed


def scan_image_folder(
    folder: Union[str, Path],
) -> Tuple[List[str], List[Tuple[str, int]], List[Tuple[str, str]], List[str]]:
    """``(classes, samples, skipped, notes)`` of an ImageFolder tree: what torchvision's ``ImageFolder`` finds
    (same classes, files and order) except that each real folder is read once per class (torchvision follows a
    link loop until the path is too long: ``ln -s . train/a/loop`` read class a 41 times), hidden files and
    folders are left out, and what it would pass over is named: entries that look like images but are not
    regular files (broken links, pipes) in ``skipped`` with the reason (counted against the threshold); files
    without an image extension (a README, a .gif: torchvision leaves them out too) in one of the ``notes``,
    announced by name but not counted, so a folder with a text file beside its images is not refused."""
    folder = str(folder)
    classes = _class_folders(folder)
    samples: List[Tuple[str, int]] = []
    skipped: List[Tuple[str, str]] = []
    notes: List[str] = []
    other: List[str] = []
    for index, name in enumerate(classes):
        walk = _walk_class(os.path.join(folder, name), lambda p, r: skipped.append((p, r)), notes.append)
        for path in (path for _, files in sorted(walk) for path in files):
            if path.lower().endswith(IMAGE_EXTENSIONS):
                samples.append((path, index))
            else:
                other.append(os.path.relpath(path, folder))
    if other:
        more = f" and {len(other) - 5} more" if len(other) > 5 else ''
        notes.append(
            f"data {folder!r}: left out {len(other)} file(s) without an image extension, as torchvision's "
            f"ImageFolder does (extensions read: {' '.join(IMAGE_EXTENSIONS)}): {', '.join(other[:5])}{more}"
        )
    found = {t for _, t in samples}
    empty = [c for i, c in enumerate(classes) if i not in found]
    if empty:
        raise ValueError(f"data {folder!r}: class folder(s) {empty} contain no images ({IMAGE_EXTENSIONS})")
    return classes, samples, skipped, notes


class CheckedImageFolder(Dataset):
    """An ImageFolder (``root/<class>/**/<image>``) that names what it cannot use.

    The files are those torchvision's ``ImageFolder`` finds, in its order (see ``scan_image_folder`` for what
    differs: link loops, hidden files). Images are read by ``msconv.data.images.load_image`` (EXIF orientation,
    16-bit samples, the decompression-bomb limit, ``short_side``). What cannot be used is recorded in
    ``self.skips`` (``msconv.data.skips.SkippedFiles``): files that are not images when the folder is read, and a
    file that fails to load when it is first met; that item is then replaced by the next usable one, so batches
    keep their size. With ``exclude=True`` (evaluation) the stand-in carries the label -1 so that accuracy
    counts every usable image once and nothing else. ``unreadable`` counts the entries found so far, in this
    process and its DataLoader worker processes.
    """

    def __init__(
        self,
        root: Union[str, Path],
        transform: Optional[Callable] = None,
        exclude: bool = False,
        short_side: Optional[int] = None,
        threshold: float = DEFAULT_THRESHOLD,
    ):
        if not Path(root).is_dir():
            raise ValueError(f"data {str(root)!r} is not a folder of class sub-folders")
        self.root = str(root)
        self.classes, self.samples, skipped, notes = scan_image_folder(root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.exclude = exclude
        self.short_side = short_side
        self.skips = SkippedFiles(self.root, [p for p, _ in self.samples], threshold=threshold, root=self.root)
        for message in notes:
            self.skips.note(message)
        for path, reason in skipped:
            self.skips.add(path, reason)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def unreadable(self) -> int:
        return self.skips.count()

    def __getitem__(self, index: int):
        n = len(self.samples)
        for attempt in range(n):
            i = (index + attempt) % n
            if self.skips.is_marked(i):
                continue
            path, target = self.samples[i]
            try:
                img = load_image(path, self.short_side)
            except UnusableFile as e:
                self.skips.mark(i, e)
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, (-1 if self.exclude and attempt else target)
        raise DataError(f"data {self.root!r}: none of its {n} images can be used")


def count_unreadable(dataset) -> Optional[int]:
    """Files and annotations ``dataset`` could not use so far (its ``SkippedFiles``); None for a dataset without an
    account (the bundled digits)."""
    skips = skipped_files(dataset)
    return None if skips is None else skips.count()


def unreadable_message(dataset, split: str, threshold: float) -> Optional[str]:
    """The refusal when more than ``threshold`` (a fraction) of one kind of ``split``'s entries could not be used
    (``SkippedFiles.message``), else None."""
    skips = skipped_files(dataset)
    return None if skips is None else skips.message(split, threshold)


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
        crop_mode=getattr(cfg, 'crop_mode', 'center'),
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
    # the eval transform resizes the shorter side to input_size / crop_pct first (timm): an image whose aspect ratio
    # makes that a decompression bomb is skipped, in both splits
    short_side = math.floor(input_size / (cfg.crop_pct or 0.875))
    threshold = getattr(cfg, 'bad_image_threshold', DEFAULT_THRESHOLD)
    return CheckedImageFolder(
        root / split, transform=transform, exclude=not is_training, short_side=short_side, threshold=threshold
    )


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
