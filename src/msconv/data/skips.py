"""What a dataset could not use: every file or annotation named once, counted once, under one threshold.

Every dataset of msconv that reads files (classification and face folders, COCO, ADE20K) keeps a
``SkippedFiles`` as ``dataset.skips``. Its entries are found at two times:

* while the dataset is built (main process): a file that is not an image, a missing file, an annotation naming
  an unknown image or category, a malformed box or segmentation, a duplicated id: ``add(name, reason, kind)``;
* while an item is loaded, perhaps in a DataLoader worker: ``mark(index, error)`` writes the item's reason code
  into a shared-memory table (one byte per item), so the count is the same whichever process met the file, and
  a marked item is not read again (its stand-in is taken at once).

Each entry is announced once with a warning naming it, counted once per kind (``'file'``, ``'annotation'``),
and ``check()`` raises ``DataError`` naming the first entries once one kind's share of its total passes
``threshold`` (the config's ``bad_image_threshold``, 1% by default). What a dataset leaves out on purpose
without losing data (a folder link not followed because its folder was already read, crowd regions, boxes under
a pixel) is ``note()``-d: announced and listed in ``notes``, never counted.

The engine's hooks: ``skipped_files(dataset)`` finds the account (through wrappers); ``counts()`` and
``metrics()`` for the records; ``message(split)`` and ``check(split)`` for the threshold; ``marks``, a uint8
tensor with one code per item, to ``all_reduce`` with ``MAX`` across ranks (then every rank counts the union:
each file once, whichever rank met it); ``notes`` for the log. An item once marked stays known for the life of
the dataset, so the counts are those of the whole run, against the split's size.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .images import REASONS, UNREADABLE, UnusableFile

__all__ = [
    'SkippedFiles',
    'DataError',
    'skipped_files',
    'DEFAULT_THRESHOLD',
    'EVAL_THRESHOLD_HINT',
    'TRAIN_THRESHOLD_HINT',
]

DEFAULT_THRESHOLD = 0.01  # TrainConfig.bad_image_threshold's default
_LISTED = 5  # entries named in a refusal


class DataError(ValueError):
    """A split with more unusable files or annotations than the threshold allows (the message names them)."""


# how an evaluation's user raises the threshold (msconv eval's flag, msconv.evaluate's argument)
# ... and a training run's user (msconv train's --set, msconv.train's keyword)
TRAIN_THRESHOLD_HINT = 'msconv train --set bad_image_threshold=F, or bad_image_threshold=F'
EVAL_THRESHOLD_HINT = 'msconv eval --bad-image-threshold F, or bad_image_threshold=F'


class SkippedFiles:
    """The account of one split (see the module docstring).

    Args:
        where: the split as users name it (its folder or annotation file), for messages.
        items: the names of the items ``mark`` can refer to, by index (the files an item is read from).
        totals: how many entries of each kind the split has, e.g. ``{'file': 1000, 'annotation': 7000}``
            (the threshold's denominators); ``'file'`` defaults to ``len(items)`` plus the files added.
        threshold: the largest share of a kind that may be skipped (``DataError`` past it).
        root: names under this folder are shown relative to it.
    """

    def __init__(
        self,
        where: Union[str, os.PathLike],
        items: Sequence[str] = (),
        totals: Optional[Dict[str, int]] = None,
        threshold: float = DEFAULT_THRESHOLD,
        root: Optional[Union[str, os.PathLike]] = None,
    ) -> None:
        self.where = str(where)
        self.items = [str(n) for n in items]
        self.totals = dict(totals or {})
        self.threshold = float(threshold)
        self.root = None if root is None else str(root)
        self.notes: List[str] = []
        self._added: Dict[Tuple[str, str], str] = {}  # (kind, name) -> reason, in the order found
        self.marks = torch.zeros(len(self.items), dtype=torch.uint8).share_memory_()  # reason code + 1, 0: fine

    # ----------------------------------------------------------------------------------------------- recording
    def add(self, name: str, reason: str, kind: str = 'file') -> bool:
        """Record ``name`` (a file path or e.g. ``'annotation 12'``) found unusable while building; warns the
        first time. Returns whether it was new."""
        key = (kind, str(name))
        if key in self._added:
            return False
        self._added[key] = reason
        warnings.warn(f"skipping {name}: {reason}", UserWarning, stacklevel=3)
        return True

    def mark(self, index: int, error: Optional[BaseException] = None) -> bool:
        """Record item ``index`` as unusable (``error``: why; an ``UnusableFile`` names its reason), in any
        process; warns the first time. Returns whether it was new."""
        if int(self.marks[index]):
            return False
        reason = error.reason if isinstance(error, UnusableFile) else UNREADABLE
        self.marks[index] = REASONS.index(reason) + 1
        detail = (
            (error.detail if isinstance(error, UnusableFile) else f"{type(error).__name__}: {error}") if error else ''
        )
        warnings.warn(
            f"skipping {self.items[index]}: {reason}" + (f" ({detail})" if detail else ''),
            UserWarning,
            stacklevel=3,
        )
        return True

    def is_marked(self, index: int) -> bool:
        """Whether item ``index`` is known unusable."""
        return bool(int(self.marks[index]))

    def merge(self, marks: torch.Tensor) -> None:
        """Take in the items another process found unusable (its ``marks``, or several processes' reduced with
        ``MAX``): afterwards this account counts the union. Not announced again: the process that met them did."""
        torch.maximum(self.marks, marks.to(self.marks.device, torch.uint8), out=self.marks)

    def note(self, message: str) -> None:
        """Announce something left out on purpose without losing data (listed in ``notes``, not counted)."""
        if message not in self.notes:
            self.notes.append(message)
            warnings.warn(message, UserWarning, stacklevel=3)

    # ----------------------------------------------------------------------------------------------- reading
    def entries(self) -> List[Tuple[str, str, str]]:
        """``(name, reason, kind)`` of every entry: those found while building, then the marked items by index."""
        out = [(name, reason, kind) for (kind, name), reason in self._added.items()]
        for i in torch.nonzero(self.marks).flatten().tolist():
            out.append((self.items[i], REASONS[int(self.marks[i]) - 1], 'file'))
        return out

    def counts(self) -> Dict[str, int]:
        """Entries per kind (only the kinds that have some)."""
        out: Dict[str, int] = {}
        for kind, _ in self._added:
            out[kind] = out.get(kind, 0) + 1
        n = int((self.marks > 0).sum())
        if n:
            out['file'] = out.get('file', 0) + n
        return out

    def count(self) -> int:
        return sum(self.counts().values())

    def total(self, kind: str) -> int:
        if kind in self.totals:
            return self.totals[kind]
        if kind == 'file':
            return len(self.items) + sum(1 for k, _ in self._added if k == 'file')
        return 0

    def metrics(self) -> Dict[str, int]:
        """Fields for a metrics record: ``skipped_files``, ``skipped_annotations`` (when the split has any)."""
        counts = self.counts()
        out = {'skipped_files': counts.get('file', 0)}
        if 'annotation' in self.totals or 'annotation' in counts:
            out['skipped_annotations'] = counts.get('annotation', 0)
        return out

    def message(self, split: str = '', threshold: Optional[float] = None, hint: Optional[str] = None) -> Optional[str]:
        """The refusal when a kind's share of skipped entries passes ``threshold`` (default: ``self.threshold``),
        naming the first entries; None within it. ``hint``: how the caller's user raises the threshold (default:
        ``TRAIN_THRESHOLD_HINT``)."""
        threshold = self.threshold if threshold is None else float(threshold)
        counts = self.counts()
        over = {k: n for k, n in counts.items() if n > threshold * self.total(k)}
        if not over:
            return None
        what = ' and '.join(f"{n} of {self.total(k)} {k}s" for k, n in sorted(counts.items()))
        entries = self.entries()
        listed = ', '.join(f"{self._show(name)} ({reason})" for name, reason, _ in entries[:_LISTED])
        more = f" and {len(entries) - _LISTED} more" if len(entries) > _LISTED else ''
        in_split = f" in {split}" if split else ''
        return (
            f"data {self.where!r}: {what}{in_split} could not be used, more than bad_image_threshold={threshold:g} "
            f"of the split: {listed}{more}. Fix or remove them, or raise the threshold "
            f"({hint or TRAIN_THRESHOLD_HINT})"
        )

    def check(self, split: str = '', threshold: Optional[float] = None, hint: Optional[str] = None) -> None:
        """Raise ``DataError`` with ``message(...)`` when past the threshold."""
        msg = self.message(split, threshold, hint)
        if msg is not None:
            raise DataError(msg)

    def _show(self, name: str) -> str:
        if self.root and name.startswith(self.root.rstrip(os.sep) + os.sep):
            return os.path.relpath(name, self.root)
        return name


def skipped_files(dataset) -> Optional[SkippedFiles]:
    """The ``SkippedFiles`` of ``dataset`` or of the dataset it wraps (``.dataset``), else None."""
    for _ in range(4):
        skips = getattr(dataset, 'skips', None)
        if isinstance(skips, SkippedFiles):
            return skips
        dataset = getattr(dataset, 'dataset', None)
        if dataset is None:
            return None
    return None
