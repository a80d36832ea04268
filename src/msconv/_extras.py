"""The optional dependencies (pyproject.toml's extras) and the one-line error of a feature whose extra is missing.

``pip install msconv`` is the lean core (torch, torchvision, timm, safetensors, numpy, pyyaml): enough to build,
train, load and run every model. Each other feature imports its package through :func:`require`, which raises
:class:`MissingExtraError` naming the extra to install::

    msconv export needs onnx, which is not installed: pip install "msconv[export]"
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

__all__ = ['EXTRAS', 'MissingExtraError', 'require', 'missing_extra_message', 'extra_for_missing_module']

# top-level import name -> (distribution on PyPI, the extra that installs it); pyproject.toml holds the same table
EXTRAS = {
    'onnx': ('onnx', 'export'),
    'onnxscript': ('onnxscript', 'export'),
    'onnxruntime': ('onnxruntime', 'export'),
    'pycocotools': ('pycocotools', 'dense'),
    'scipy': ('scipy', 'dense'),
    'matplotlib': ('matplotlib', 'plots'),
    'skimage': ('scikit-image', 'erf'),
    'mlxtend': ('mlxtend', 'digits'),
    'tensorboard': ('tensorboard', 'tensorboard'),
    'rich': ('rich', 'progress'),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message is one line naming the extra that installs it."""


def missing_extra_message(module: str, feature: str) -> str:
    dist, extra = EXTRAS[module.split('.')[0]]
    return f'{feature} needs {dist}, which is not installed: pip install "msconv[{extra}]"'


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (an optional dependency listed in ``EXTRAS``) for ``feature`` (a few words a user
    recognises, e.g. ``'msconv export'``), or raise :class:`MissingExtraError` naming the extra to install.

    Only a missing package is translated: a package that is installed but fails to import raises as it is."""
    top = module.split('.')[0]
    if top not in EXTRAS:
        raise ValueError(f"module must be one of the optional dependencies {sorted(EXTRAS)}, got {module!r}")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split('.')[0] != top:
            raise
        raise MissingExtraError(missing_extra_message(module, feature)) from e


def extra_for_missing_module(e: BaseException) -> Optional[str]:
    """For a ``ModuleNotFoundError`` of an optional dependency raised outside :func:`require`: the one-line
    message naming its extra (the command line prints it instead of a traceback); None for anything else."""
    if not isinstance(e, ModuleNotFoundError) or not e.name or e.name.split('.')[0] not in EXTRAS:
        return None
    return missing_extra_message(e.name, 'this command')
