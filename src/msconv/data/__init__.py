"""Datasets: the bundled MNIST digits (``digits``), ImageFolder trees with timm transforms (``loader``), and face
identity folders / verification pairs (``face``)."""

from .digits import DigitsDataset, load_digits
from .loader import ResumableDistributedSampler, SeededDataset, build_dataset, build_loader, check_image_folder

__all__ = [
    'DigitsDataset',
    'load_digits',
    'ResumableDistributedSampler',
    'SeededDataset',
    'build_dataset',
    'build_loader',
    'check_image_folder',
]
