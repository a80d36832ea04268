"""Datasets: the bundled MNIST digits (``digits``), ImageFolder trees with timm transforms (``loader``), face
identity folders / verification pairs (``face``), COCO (``coco``) and ADE20K (``ade``) folders. Every file-backed
dataset reads images through ``images.load_image`` and names what it cannot use in a ``skips.SkippedFiles``
(``dataset.skips``): one account and one threshold for every task."""

from .digits import DigitsDataset, load_digits
from .images import UnusableFile, load_image
from .loader import ResumableDistributedSampler, SeededDataset, build_dataset, build_loader, check_image_folder
from .skips import DataError, SkippedFiles, skipped_files

__all__ = [
    'DigitsDataset',
    'load_digits',
    'ResumableDistributedSampler',
    'SeededDataset',
    'build_dataset',
    'build_loader',
    'check_image_folder',
    'load_image',
    'UnusableFile',
    'SkippedFiles',
    'DataError',
    'skipped_files',
]
