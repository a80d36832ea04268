"""Reading one image file: the conversions every dataset shares, and the reasons a file cannot be used.

``load_image(path)`` returns an RGB ``PIL.Image`` of what the file holds. Each conversion is exact or written here:

* EXIF orientation is applied (a lossless transposition): the picture as viewers, mmcv (mmdetection,
  mmsegmentation) and detectron2 read it. torchvision's and timm's ImageFolder loaders leave it out.
* 8-bit modes go through PIL's ``convert('RGB')``, as torchvision's loader does: grey ('L') and bilevel ('1', as
  0/255) are copied to three channels, palette ('P') images take their palette colours, alpha (RGBA, LA, a
  palette's transparent index) is dropped and the colours are kept as stored, CMYK and YCbCr use PIL's
  formulas (no colour profile).
* 16-bit samples keep their high byte (65535 -> 255, 0 -> 0, never more than one level below the rounded
  value): what Pillow itself does to 16-bit colour PNGs, so a picture gives the same pixels as 16-bit grey or
  16-bit colour. (PIL's ``convert`` clips 16-bit grey at 255: a nearly white image.)
* An animated file (GIF, APNG, WebP) gives its first frame.

A file that cannot be used raises ``UnusableFile`` naming it, with one of ``REASONS``: not a readable image
(corrupt, truncated, empty, no permission, vanished), over PIL's decompression-bomb limit (PIL refuses
``2 * Image.MAX_IMAGE_PIXELS`` itself and only warns between 1x and 2x: that warning is given again with the
file's name), samples of 32-bit integers or floats (no defined 8-bit scale), or, with ``short_side``, an aspect
ratio so extreme that resizing the shorter side to ``short_side`` pixels (an eval transform's first step) would
pass ``Image.MAX_IMAGE_PIXELS``: a 70 kB strip of 1x70000 pixels would become 36x2.5M pixels at a 32-pixel
input, 256x18M (14 GB) at 224.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps

__all__ = ['load_image', 'to_rgb', 'UnusableFile', 'REASONS']

UNREADABLE = 'not a readable image'
TOO_LARGE = 'over the decompression-bomb limit'
NO_8BIT_SCALE = 'no defined 8-bit scale'
EXTREME_ASPECT = 'extreme aspect ratio'
BAD_ANNOTATION = 'its annotation cannot be used'
REASONS = (UNREADABLE, TOO_LARGE, NO_8BIT_SCALE, EXTREME_ASPECT, BAD_ANNOTATION)

_SIXTEEN_BIT = ('I;16', 'I;16L', 'I;16B', 'I;16N')
_ORIENTATION = 0x0112  # the EXIF tag


class UnusableFile(ValueError):
    """A file a dataset cannot use: ``path``, ``reason`` (one of ``REASONS``) and the details."""

    def __init__(self, path: Union[str, os.PathLike], reason: str, detail: str = '') -> None:
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{self.path}: {reason}" + (f" ({detail})" if detail else ''))


def to_rgb(im: Image.Image, name: str = 'image') -> Image.Image:
    """``im`` in RGB by the rules of the module docstring (no EXIF step); ``UnusableFile`` for 32-bit samples."""
    mode = im.mode
    if mode == 'I' and im.format in ('PNG', 'PPM'):  # 16-bit grey as older Pillow versions open it
        mode = 'I;16'
    if mode in _SIXTEEN_BIT:
        high = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(high, 'L').convert('RGB')
    if mode in ('I', 'F'):
        raise UnusableFile(
            name, NO_8BIT_SCALE, f"mode {im.mode}: {'32-bit integer' if mode == 'I' else 'float'} samples"
        )
    if mode == 'RGB':
        return im
    if mode == 'P' and 'transparency' in im.info:  # through RGBA: the same colours, without PIL's warning
        im = im.convert('RGBA')
    return im.convert('RGB')


def load_image(path: Union[str, os.PathLike], short_side: Optional[int] = None) -> Image.Image:
    """The RGB image in the file ``path`` (see the module docstring); ``UnusableFile`` names a file it cannot use.

    ``short_side``: the side the shorter edge will be resized to; refuses aspect ratios whose resized image would
    pass ``PIL.Image.MAX_IMAGE_PIXELS``."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always', Image.DecompressionBombWarning)
            im = Image.open(path)
        for w in caught:
            warnings.warn(f"{path}: {w.message}", Image.DecompressionBombWarning, stacklevel=2)
    except Image.DecompressionBombError as e:
        raise UnusableFile(path, TOO_LARGE, str(e)) from None
    except MemoryError:
        raise
    except Exception as e:  # PIL raises many types for foreign, empty or unreadable files
        raise UnusableFile(path, UNREADABLE, f"{type(e).__name__}: {e}") from None
    with im:
        w, h = im.size
        limit = Image.MAX_IMAGE_PIXELS
        if short_side and limit and min(w, h) > 0 and max(w, h) * short_side * short_side > limit * min(w, h):
            raise UnusableFile(
                path,
                EXTREME_ASPECT,
                f"{w}x{h}: resizing its shorter side to {short_side} would make {max(w, h) * short_side // min(w, h)}"
                f"x{short_side} pixels, over PIL's limit of {limit}",
            )
        try:
            im.load()
            if im.getexif().get(_ORIENTATION, 1) != 1:
                im = ImageOps.exif_transpose(im)
            return to_rgb(im, str(path))
        except UnusableFile:
            raise
        except MemoryError:
            raise
        except Exception as e:
            raise UnusableFile(path, UNREADABLE, f"{type(e).__name__}: {e}") from None
