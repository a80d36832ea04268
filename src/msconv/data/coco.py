"""COCO-format detection / instance-segmentation datasets (an ``instances_*.json`` + an image folder) with the
official configs' augmentations in ``torchvision.transforms.v2`` and ``tv_tensors``.

* :class:`CocoDetection` -> ``(image, target)``: ``image`` a ``tv_tensors.Image``; ``target`` a dict with
  ``boxes`` (``tv_tensors.BoundingBoxes``, XYXY pixels), ``labels`` (int64, 1..K: the json's category ids sorted
  and numbered from 1), ``masks`` (``tv_tensors.Mask`` (N, H, W) uint8, from polygons or RLE via pycocotools),
  ``image_id``. Images are read by :func:`msconv.data.images.load_image` (EXIF orientation, 16-bit samples, the
  decompression-bomb limit). Crowd annotations are left out of the targets (torchvision's detectors have no ignore
  regions) and boxes under 1 pixel wide or high are dropped, as mmdetection does: both announced once
  (``dataset.skips.notes``), not counted.
* Bad data: a missing image file, an image id given to two files, an unreadable image or one of another size than
  the json says, an annotation that names an unknown image or category, reuses an id or has a malformed box or
  segmentation (an RLE of another size than its image) raises a ``ValueError`` naming the file or annotation, or,
  with ``on_error='skip'``, is skipped with a warning naming it and counted once in ``dataset.skips``
  (:class:`msconv.data.skips.SkippedFiles`: kinds ``'file'`` and ``'annotation'``, one threshold). Images that fail
  when loaded are marked in shared memory (so DataLoader workers count them too) and replaced by the next usable
  one; with ``exclude=True`` (evaluation) that stand-in's target says ``excluded: True`` and the evaluation leaves
  it out, so every usable image is scored once and an unusable one not at all.
* :func:`detection_train_transforms`: flip 0.5, then one of (a) resize the shorter side to one of 480..800 (step
  32, longer side <= 1333) or (b) resize to 400/500/600, random crop of 384-600 px per side, resize to 480..800
  (the DETR-style ``AutoAugment`` of the 3x configs); :func:`detection_eval_transforms` keeps the image size (the
  detector resizes to its test scale).
* :func:`collate_detection`: lists of images and targets, as torchvision's detectors take them.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
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

from .._extras import require
from .images import BAD_ANNOTATION, UnusableFile, load_image
from .skips import DataError, SkippedFiles

__all__ = [
    'CocoDetection',
    'RandomSizeCrop',
    'detection_train_transforms',
    'detection_eval_transforms',
    'collate_detection',
    'TRAIN_SCALES',
]

TRAIN_SCALES = tuple(range(480, 801, 32))  # 480, 512, ..., 800


def _check_on_error(on_error: str) -> str:
    if on_error not in ('raise', 'skip'):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    return on_error


def _quiet(fn: Callable, *args):
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        return fn(*args)


class CocoDetection(Dataset):
    """A COCO-format instances dataset (see the module docstring).

    Args:
        root: folder holding the images (``file_name`` of each json image is relative to it).
        ann_file: the instances json.
        transforms: called as ``transforms(image, target)`` (a ``torchvision.transforms.v2`` pipeline).
        with_masks: decode instance masks (needed by the mask models).
        filter_empty: leave out images with no usable annotation (the configs do so for training).
        on_error: ``'raise'`` or ``'skip'`` for bad images and annotations.
        exclude: mark the stand-in of an unusable image (``target['excluded'] = True``) for evaluation to leave
            out (its image id is another image's: scoring it would count that image twice).
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        ann_file: Union[str, os.PathLike],
        transforms: Optional[Callable] = None,
        with_masks: bool = True,
        filter_empty: bool = False,
        on_error: str = 'raise',
        exclude: bool = False,
    ) -> None:
        COCO = require('pycocotools.coco', 'COCO datasets').COCO

        self.root = Path(root)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.with_masks = with_masks
        self.on_error = _check_on_error(on_error)
        self.exclude = exclude
        self._problems: List[Tuple[str, str, str]] = []  # (name, reason, kind) until self.skips exists
        if not self.root.is_dir():
            raise ValueError(f"root must be a folder of images, {str(self.root)!r} is not a directory")
        if not self.ann_file.is_file():
            raise ValueError(f"ann_file {str(self.ann_file)!r} does not exist or is not a file")
        try:
            data = json.loads(self.ann_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.ann_file}: not a readable COCO json ({e})") from e
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), list) for k in ('images', 'annotations', 'categories')
        ):
            raise ValueError(
                f"{self.ann_file}: a COCO instances json needs 'images', 'annotations' and 'categories' lists"
            )
        if not all(isinstance(c, dict) and isinstance(c.get('id'), int) for c in data['categories']):
            raise ValueError(f"{self.ann_file}: every entry of 'categories' needs an integer 'id'")
        self.cat_ids = sorted(int(c['id']) for c in data['categories'])
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}
        self.class_names = [c.get('name', str(c['id'])) for c in sorted(data['categories'], key=lambda c: c['id'])]
        images, ambiguous = self._read_images(data['images'])
        anns: Dict[Any, List[dict]] = {i: [] for i in images}
        good_anns, ann_ids, crowd, tiny = [], set(), 0, 0
        for k, ann in enumerate(data['annotations']):
            ann_id = ann.get('id') if isinstance(ann, dict) else None
            name = f"annotation {ann_id if ann_id is not None else f'#{k}'}"
            problem = self._check_annotation(ann, images, ambiguous)
            if not problem and ann_id in ann_ids:
                problem, name = f"id {ann_id!r} is used by an earlier annotation", f"{name} (entry {k})"
            if problem:
                self._bad(name, problem, 'annotation')
                continue
            ann_ids.add(ann_id)
            good_anns.append(ann)
            if ann.get('iscrowd', 0):
                crowd += 1
                continue
            if ann['bbox'][2] < 1 or ann['bbox'][3] < 1:
                tiny += 1
                continue
            anns[ann['image_id']].append(ann)
        self.ids = []
        for img_id, img in images.items():
            if not (self.root / img['file_name']).is_file():
                self._bad(str(self.root / img['file_name']), f"the image file of image id {img_id} is missing", 'file')
                continue
            if filter_empty and not anns[img_id]:
                continue
            self.ids.append(img_id)
        self.images = images
        self.anns = anns
        self.skips = SkippedFiles(
            self.ann_file,
            [str(self.root / images[i]['file_name']) for i in self.ids],
            totals={'file': len(data['images']), 'annotation': len(data['annotations'])},
            root=self.root,
        )
        for name, reason, kind in self._problems:
            self.skips.add(name, reason, kind)
        if crowd or tiny:
            self.skips.note(
                f"{self.ann_file}: {crowd} crowd annotation(s) left out of the training targets (torchvision's "
                f"detectors have no ignore regions) and {tiny} box(es) under 1 pixel wide or high (as mmdetection)"
            )
        self.coco = COCO()  # ground truth for COCOeval, holding only the annotations that passed the checks
        self.coco.dataset = dict(data, annotations=good_anns, images=[images[i] for i in images])
        _quiet(self.coco.createIndex)

    def _read_images(self, entries: List[Any]) -> Tuple[Dict[Any, dict], Dict[Any, List[str]]]:
        """The usable image entries by id, and the ids given to several files (all of those are left out: no
        annotation can say which file it belongs to)."""
        files: Dict[Any, List[str]] = {}
        images = {}
        for img in entries:
            ok = isinstance(img, dict) and {'id', 'file_name', 'height', 'width'} <= img.keys()
            if not ok or not all(isinstance(img[k], int) and img[k] > 0 for k in ('height', 'width')):
                self._bad(f"image entry {img!r:.80}", 'it lacks id/file_name or a positive height/width', 'file')
                continue
            files.setdefault(img['id'], []).append(img['file_name'])
            images[img['id']] = img
        ambiguous = {i: names for i, names in files.items() if len(names) > 1}
        for img_id, names in ambiguous.items():
            for name in names:
                self._bad(str(self.root / name), f"image id {img_id!r} is given to {len(names)} files {names}", 'file')
            del images[img_id]
        return images, ambiguous

    def _bad(self, name: str, reason: str, kind: str) -> None:
        if self.on_error == 'raise':
            where = '' if kind == 'file' and name.startswith(str(self.root)) else f"{self.ann_file}: "
            raise ValueError(f"{where}{name}: {reason} (pass on_error='skip' to skip such entries)")
        self._problems.append((name, reason, kind))

    def _check_annotation(self, ann: Any, images: Dict, ambiguous: Dict) -> str:
        if not isinstance(ann, dict):
            return 'not an object'
        if ann.get('image_id') in ambiguous:
            return f"image_id {ann.get('image_id')!r} is given to several files {ambiguous[ann['image_id']]}"
        if ann.get('image_id') not in images:
            return f"image_id {ann.get('image_id')!r} is not in 'images'"
        if ann.get('category_id') not in self.label_of:
            return f"category_id {ann.get('category_id')!r} is not in 'categories'"
        box = ann.get('bbox')
        if (
            not isinstance(box, (list, tuple))
            or len(box) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
            or box[2] < 0
            or box[3] < 0
        ):
            return f"bbox must be 4 finite numbers [x, y, w, h] with w, h >= 0, got {box!r}"
        if self.with_masks and not ann.get('iscrowd', 0):
            seg = ann.get('segmentation')
            img = images[ann['image_id']]
            if isinstance(seg, dict) and 'counts' in seg and 'size' in seg:
                if list(seg['size']) != [img['height'], img['width']]:
                    return (
                        f"segmentation: RLE of size {seg['size']!r} on image {img['file_name']} of "
                        f"{img['height']}x{img['width']} (height x width)"
                    )
                return ''
            ok = (
                isinstance(seg, list)
                and len(seg) > 0
                and all(
                    isinstance(p, list)
                    and len(p) >= 2
                    and len(p) % 2 == 0
                    and all(isinstance(v, (int, float)) and math.isfinite(v) for v in p)
                    for p in seg
                )
            )
            if not ok:  # (COCO itself has a few degenerate polygons of 2 points: pycocotools rasterizes them)
                return "segmentation must be polygons (lists of x, y pairs) or an RLE dict with counts/size"
        return ''

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def unreadable(self) -> int:
        """Files and annotations this dataset could not use (``self.skips``), so far."""
        return self.skips.count()

    def _load_image(self, img: dict) -> Image.Image:
        path = self.root / img['file_name']
        im = load_image(path)
        if im.size != (img['width'], img['height']):
            raise UnusableFile(
                path,
                BAD_ANNOTATION,
                f"the image is {im.size[0]}x{im.size[1]} but {self.ann_file} says {img['width']}x{img['height']}",
            )
        return im

    def __getitem__(self, index: int) -> Tuple[Any, Dict[str, Any]]:
        n = len(self.ids)
        for attempt in range(n):
            i = (index + attempt) % n
            if self.skips.is_marked(i):
                continue
            img_id = self.ids[i]
            try:
                image, target = self._sample(img_id, self._load_image(self.images[img_id]))
            except UnusableFile as e:
                if self.on_error == 'raise':
                    raise
                self.skips.mark(i, e)
                continue
            if self.exclude and attempt:
                target['excluded'] = True
            return image, target
        raise DataError(f"{self.root}: no usable image left in the dataset")

    def _sample(self, img_id: Any, pil: Image.Image):
        img = self.images[img_id]
        h, w = img['height'], img['width']
        anns = self.anns[img_id]
        boxes = torch.tensor([a['bbox'] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        target: Dict[str, Any] = {
            'boxes': tv_tensors.BoundingBoxes(boxes, format='XYXY', canvas_size=(h, w)),
            'labels': torch.tensor([self.label_of[a['category_id']] for a in anns], dtype=torch.int64),
            'image_id': img_id,
        }
        if self.with_masks:
            masks = np.zeros((len(anns), h, w), dtype=np.uint8)
            for i, a in enumerate(anns):
                try:
                    masks[i] = self.coco.annToMask(a)
                except Exception as e:  # what the checks at construction cannot see (the RLE counts themselves)
                    raise UnusableFile(
                        self.root / img['file_name'],
                        BAD_ANNOTATION,
                        f"{self.ann_file}: annotation {a.get('id')}: undecodable segmentation "
                        f"({type(e).__name__}: {e})",
                    ) from None
            target['masks'] = tv_tensors.Mask(torch.from_numpy(masks))
        image = tv_tensors.Image(TF.pil_to_tensor(pil))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


class RandomSizeCrop(v2.Transform):
    """mmdet's ``RandomCrop(crop_type='absolute_range', crop_size=(lo, hi))``: a crop whose height and width are
    each drawn in [lo, min(hi, side)] pixels, at a random position; boxes are clipped (sanitize afterwards)."""

    def __init__(self, min_size: int = 384, max_size: int = 600) -> None:
        super().__init__()
        if not (isinstance(min_size, int) and isinstance(max_size, int) and 0 < min_size <= max_size):
            raise ValueError(
                f"min_size and max_size must be ints with 0 < min_size <= max_size, got {min_size!r}, {max_size!r}"
            )
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        h, w = next(TF.get_size(x) for x in flat_inputs if isinstance(x, tv_tensors.Image))
        ch = random.randint(min(h, self.min_size), min(h, self.max_size))
        cw = random.randint(min(w, self.min_size), min(w, self.max_size))
        return dict(top=random.randint(0, h - ch), left=random.randint(0, w - cw), height=ch, width=cw)

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        return TF.crop(inpt, **params)


def detection_train_transforms(
    scales: Sequence[int] = TRAIN_SCALES,
    max_size: int = 1333,
    crop: bool = True,
    crop_scales: Sequence[int] = (400, 500, 600),
    crop_size: Tuple[int, int] = (384, 600),
    flip: float = 0.5,
) -> v2.Compose:
    """The 3x configs' training augmentation (see the module docstring); ``crop=False`` keeps only the
    multi-scale resize and flip (the plain ``mstrain`` configs). Sizes can be scaled down for small images.
    ``flip``: the horizontal flip probability (the configs' 0.5; 0 for classes that are not mirror-symmetric)."""
    if isinstance(flip, bool) or not isinstance(flip, (int, float)) or not 0 <= flip <= 1:
        raise ValueError(f"flip must be a probability in [0, 1], got {flip!r}")
    if not scales or not all(isinstance(s, int) and s > 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive ints, got {scales!r}")
    resize = v2.RandomShortestSize(list(scales), max_size=max_size)
    if crop:
        resize = v2.RandomChoice(
            [
                resize,
                v2.Compose(
                    [
                        v2.RandomShortestSize(list(crop_scales), max_size=max_size),
                        RandomSizeCrop(*crop_size),
                        v2.RandomShortestSize(list(scales), max_size=max_size),
                    ]
                ),
            ]
        )
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(flip),
            resize,
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=1.0),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def detection_eval_transforms() -> v2.Compose:
    """Float images in [0, 1] at their own size (the detector resizes to its test scale and maps back)."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])


def collate_detection(batch: Sequence[Tuple[Any, Dict[str, Any]]]) -> Tuple[List[torch.Tensor], List[Dict]]:
    """``[(image, target), ...] -> ([images], [targets])`` with plain tensors (torchvision detectors' input)."""
    images, targets = [], []
    for image, target in batch:
        images.append(image.as_subclass(torch.Tensor))
        targets.append(
            {k: (v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v) for k, v in target.items()}
        )
    return images, targets
