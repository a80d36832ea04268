"""Face data: insightface verification pair files (``.bin``) and a folder-of-identities training set.

The insightface ``.bin`` files (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, ...) are a pickle of
``(bins, issame_list)``: ``bins`` is a list of 2N encoded images (JPEG/PNG bytes; image 2i and 2i+1 form pair i)
and ``issame_list`` holds N booleans. ``load_bin`` reads them with a restricted unpickler that can build only
plain containers, bytes, numbers and booleans, so a crafted file cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch

from .images import to_rgb
from .loader import CheckedImageFolder

__all__ = ['load_bin', 'save_bin', 'FaceIdentityFolder']

# Python 2 pickles (the original insightface files) store bytes as str; protocol-2 pickles written by
# Python 3 store bytes through _codecs.encode. Nothing else may be looked up.
_ALLOWED_GLOBALS = {
    ('_codecs', 'encode'),
    ('builtins', 'bytes'),
    ('builtins', 'bytearray'),
    ('builtins', 'list'),
    ('builtins', 'tuple'),
    ('builtins', 'bool'),
    ('builtins', 'int'),
    ('builtins', 'str'),
    ('__builtin__', 'bytes'),
    ('__builtin__', 'bytearray'),
    ('__builtin__', 'list'),
    ('__builtin__', 'tuple'),
    ('__builtin__', 'bool'),
    ('__builtin__', 'int'),
    ('__builtin__', 'str'),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: a face .bin file holds only image bytes and booleans"
        )


def _decode(buf: bytes, image_size: Optional[Tuple[int, int]]) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(buf)) as im:
        im = to_rgb(im)  # 16-bit samples keep their high byte, as the training folders read them
        if image_size is not None and im.size != (image_size[1], image_size[0]):
            im = im.resize((image_size[1], image_size[0]), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def load_bin(
    path: Union[str, os.PathLike], image_size: Optional[Tuple[int, int]] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Read an insightface verification ``.bin``.

    Args:
        path: the ``.bin`` file.
        image_size: (H, W) to resize every image to; None keeps the stored size (all images must then agree).

    Returns:
        ``images`` uint8 (2N, 3, H, W) RGB, and ``issame`` bool (N,).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path {str(path)!r} does not exist or is not a file")
    with open(path, 'rb') as f:
        try:
            obj = _SafeUnpickler(f, encoding='bytes').load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise ValueError(f"path {str(path)!r} is not an insightface .bin pair file: {e}") from e
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"path {str(path)!r}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    bins, issame = obj
    if len(bins) != 2 * len(issame) or len(issame) == 0:
        raise ValueError(
            f"path {str(path)!r}: expected 2 images per pair, got {len(bins)} images for {len(issame)} pairs"
        )
    images = [_decode(bytes(b), image_size) for b in bins]
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"path {str(path)!r}: images differ in size {sorted(shapes)}; pass image_size=(H, W)")
    return torch.from_numpy(np.stack(images)), torch.tensor([bool(s) for s in issame], dtype=torch.bool)


def save_bin(path: Union[str, os.PathLike], images: torch.Tensor, issame: torch.Tensor, fmt: str = 'PNG') -> None:
    """Write images uint8 (2N, 3, H, W) and issame (N,) as an insightface ``.bin`` (encoded with ``fmt``)."""
    from PIL import Image

    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 of shape (2N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if issame.dim() != 1 or images.shape[0] != 2 * issame.shape[0]:
        raise ValueError(f"issame must have shape ({images.shape[0] // 2},), got {tuple(issame.shape)}")
    bins = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(buf, format=fmt)
        bins.append(buf.getvalue())
    with open(path, 'wb') as f:
        pickle.dump((bins, [bool(s) for s in issame.tolist()]), f, protocol=pickle.HIGHEST_PROTOCOL)


class FaceIdentityFolder(CheckedImageFolder):
    """A face training set laid out as ``root/<identity>/<image>``: items are (image, identity index).

    A ``CheckedImageFolder`` (torchvision's ImageFolder order: sorted identity folders, the usual image
    extensions): a file it cannot use is skipped with a warning naming it, and counted once in ``self.skips``.
    ``num_identities`` is the number of classes a margin head needs.
    """

    def __init__(self, root: Union[str, os.PathLike], transform: Optional[Callable] = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"root {str(root)!r} must be a folder of identity sub-folders")
        super().__init__(root, transform=transform)
        self.identities = self.classes

    @property
    def num_identities(self) -> int:
        return len(self.identities)
