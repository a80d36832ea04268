"""The `msconv` command line lives in the top-level package ``msconv_cli`` (so that ``msconv --help`` does not
import torch); this module keeps ``from msconv.cli import main`` working."""

from msconv_cli import build_parser, main

__all__ = ['build_parser', 'main']
