"""Shared by the tools: building a model from a name (msconv or timm) and switching it to its inference form."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn

__all__ = ['build_model', 'read_weights', 'reparameterize', 'check_checkpoint_file', 'machine_line']


def check_checkpoint_file(path: Union[str, os.PathLike]) -> None:
    """Refuse, naming the file, what cannot be a checkpoint before anything tries to unpickle it: a missing file,
    a folder, or a file that is neither safetensors, a torch zip archive nor a pickle."""
    from ..models._builder import check_checkpoint_kind

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist or is not a file")
    check_checkpoint_kind(Path(path), name='checkpoint')


def build_model(
    name: str,
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
    *,
    meta: bool = False,
    trust_pickle: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """An msconv model by registered name, or any timm model (``timm:`` prefix optional).

    ``checkpoint_path`` (official or msconv format for msconv models, any timm checkpoint for timm models) is
    loaded strictly; it may also be a run folder or a training checkpoint folder, as ``msconv eval`` takes (see
    :func:`read_weights`). ``meta=True`` builds the model on the meta device (shapes only, for counting).
    """
    import timm

    import msconv
    from msconv.models._registry import _MODEL_FAMILY, unknown_model_message

    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {type(name).__name__}")
    timm_name = name[len('timm:') :] if name.startswith('timm:') else name
    if not timm.is_model(timm_name):
        raise ValueError(unknown_model_message(name) + ' Prefix timm: for any timm model.')
    if checkpoint_path is not None and not meta and os.path.isdir(checkpoint_path):  # a run or checkpoint folder
        return _build_from_folder(timm_name, Path(checkpoint_path), kwargs)
    if checkpoint_path is not None and not meta:
        check_checkpoint_file(checkpoint_path)
    if meta:
        if checkpoint_path is not None:
            raise ValueError('checkpoint_path cannot be loaded into a model built on the meta device')
        with torch.device('meta'):
            return timm.create_model(timm_name, **kwargs)
    try:
        if timm_name.split('.')[0] in _MODEL_FAMILY:
            return msconv.create_model(timm_name, checkpoint_path=checkpoint_path, trust_pickle=trust_pickle, **kwargs)
        return timm.create_model(timm_name, checkpoint_path=str(checkpoint_path) if checkpoint_path else '', **kwargs)
    except RuntimeError as e:  # load_state_dict: missing/unexpected keys or shapes that differ
        if checkpoint_path is None or 'state_dict' not in str(e):
            raise
        details = (
            ' '.join(line.strip() for line in str(e).splitlines()[1:3])  # torch's message
            or str(e).split('(a checkpoint of another model?): ', 1)[-1]
        )  # MsconvModel.load_state_dict's
        raise ValueError(
            f"checkpoint {os.fspath(checkpoint_path)!r} does not fit {timm_name!r}: it is a checkpoint "
            f"of another model or of another number of classes ({details[:400]})"
        ) from e


def read_weights(path: Union[str, os.PathLike], which: str = 'last', use_ema: bool = False) -> Dict[str, Any]:
    """The weights in a run folder (its newest valid checkpoint, or with ``which='best'`` the weights of its best
    evaluation) or in a training checkpoint folder (``<run>/checkpoints/step-N``), as ``msconv eval`` reads them
    (``msconv.engine.checkpoint.read_folder_weights``): ``{'state_dict', 'checkpoint', 'step', 'model',
    'model_kwargs'}`` (the model from the checkpoint, else from the run's config.yaml, which gives the kwargs)."""
    from ..engine.checkpoint import read_folder_weights
    from ..engine.config import load_yaml

    found = read_folder_weights(path, which, use_ema)
    run = load_yaml(found['config']) if found['config'] is not None else {}
    return {
        'state_dict': found['state_dict'],
        'checkpoint': found['checkpoint'],
        'step': found['step'],
        'model': found['meta'].get('model') or run.get('model'),
        'model_kwargs': dict(run.get('model_kwargs') or {}),
    }


def _build_from_folder(name: str, folder: Path, kwargs: Dict[str, Any]) -> nn.Module:
    """``name`` built as its run trained it (the run's model_kwargs under the caller's, the checkpoint's number of
    classes) with the folder's weights loaded strictly."""
    import timm

    from ..engine.build import load_weights

    found = read_weights(folder)
    sd = found['state_dict']
    if found['model'] not in (None, name):
        raise ValueError(f"checkpoint {found['checkpoint']!r} is a checkpoint of {found['model']!r}, not of {name!r}")
    kwargs = {**found['model_kwargs'], **kwargs}
    classifier = getattr(timm.models.get_pretrained_cfg(name), 'classifier', None) or 'head.fc'
    if f'{classifier}.weight' in sd:
        kwargs.setdefault('num_classes', sd[f'{classifier}.weight'].shape[0])
    model = timm.create_model(name, **kwargs)
    load_weights(model, sd, f"checkpoint {found['checkpoint']!r}", name, trained_as=found['model'])
    return model


def reparameterize(model: nn.Module) -> nn.Module:
    """Switch ``model`` (in place) to its inference form and return it.

    Calls the model's own ``reparameterize()`` when it has one, else timm's ``reparameterize_model``, which
    calls ``reparameterize()`` / ``fuse()`` on every sub-module that has it (a no-op for plain models).
    """
    if callable(getattr(model, 'reparameterize', None)):
        model.reparameterize()
        return model
    from timm.models import reparameterize_model

    return reparameterize_model(model, inplace=True)


def machine_line(threads: Optional[int] = None) -> str:
    """The machine a figure comes from: CPU model, the ISA extensions that decide CPU kernels, torch, threads
    (default: torch's current thread count), oneDNN; and the GPU when CUDA is available."""
    import platform

    threads = torch.get_num_threads() if threads is None else threads
    model, flags = platform.processor() or 'unknown CPU', set()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                model = line.split(':', 1)[1].strip()
            elif line.startswith('flags'):
                flags = set(line.split(':', 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ('avx2', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_bf16', 'amx_tile') if f in flags]
    line = (
        f"{model}; ISA: {' '.join(isa) or 'n/a'}; torch {torch.__version__}; {threads} threads; "
        f"oneDNN {'on' if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled else 'off'}"
    )
    if torch.cuda.is_available():
        line += f"; GPU {torch.cuda.get_device_name()}"
    return line
