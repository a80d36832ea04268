"""Shared by the tools: building a model from a name (msconv or timm) and switching it to its inference form."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import timm
import torch
import torch.nn as nn

__all__ = ['build_model', 'reparameterize', 'check_checkpoint_file', 'weights_file', 'machine_line']


def weights_file(path: Union[str, os.PathLike]) -> str:
    """The weights file ``path`` names: itself for a file; for a training checkpoint folder (``step-N``,
    ``best-N``), its ``model.safetensors`` once the folder verifies; for a run folder (holding ``checkpoints/``), that
    of its newest checkpoint that verifies (as ``msconv eval``). Anything else is returned as given."""
    # deferred: the engine's checkpoint reader (the engine imports this module)
    from ..engine.checkpoint import CheckpointError, latest_good_checkpoint, load_checkpoint

    folder = Path(path)
    if not folder.is_dir():
        return os.fspath(path)
    if (folder / 'checkpoints').is_dir():
        found = latest_good_checkpoint(folder)
        if found is None:
            raise ValueError(f"checkpoint: run folder {str(folder)!r} holds no valid checkpoint")
        folder = found[0]
    elif (folder / 'meta.json').is_file():
        try:
            load_checkpoint(folder)
        except CheckpointError as e:
            raise ValueError(str(e)) from None
    else:
        raise ValueError(
            f"checkpoint {str(folder)!r} is a folder but neither a run folder (with checkpoints/) nor a training "
            f"checkpoint (with meta.json); pass a weights file (.safetensors/.pth)"
        )
    weights = folder / 'model.safetensors'
    if not weights.is_file():
        raise ValueError(f"checkpoint {str(folder)!r} holds no model.safetensors")
    return str(weights)


def _run_model_kwargs(name: str, weights: str) -> Dict[str, Any]:
    """The keywords a training run built ``name`` with: its config.yaml's ``model_kwargs`` and the number of
    classes of the classifier in ``weights`` (the data decided it; the model's default would drop the trained
    classifier)."""
    # deferred: the engine's run-folder readers (the engine imports this module)
    from safetensors import safe_open

    from ..engine.checkpoint import find_run_config
    from ..engine.config import load_yaml

    out: Dict[str, Any] = {}
    cfg = find_run_config(Path(weights).parent)
    if cfg is not None:
        run = load_yaml(cfg)
        if run.get('model') == name:
            out.update(run.get('model_kwargs') or {})
    classifier = timm.models.get_pretrained_cfg_value(name, 'classifier')
    if isinstance(classifier, str):
        with safe_open(weights, 'pt') as f:
            if f'{classifier}.weight' in f.keys():
                out['num_classes'] = f.get_slice(f'{classifier}.weight').get_shape()[0]
    return out


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

    ``checkpoint_path`` (official or msconv format for msconv models, any timm checkpoint for timm models; a
    training run folder or checkpoint folder gives its verified ``model.safetensors``) is loaded strictly;
    ``meta=True`` builds the model on the meta device (shapes only, for counting).
    """
    import msconv
    from msconv.models._registry import _MODEL_FAMILY, unknown_model_message

    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {type(name).__name__}")
    timm_name = name[len('timm:') :] if name.startswith('timm:') else name
    if not timm.is_model(timm_name):
        raise ValueError(unknown_model_message(name) + ' Prefix timm: for any timm model.')
    if checkpoint_path is not None and not meta:
        if Path(checkpoint_path).is_dir():  # a run folder or a checkpoint folder: its weights, as the run built it
            checkpoint_path = weights_file(checkpoint_path)
            kwargs = {**_run_model_kwargs(timm_name, checkpoint_path), **kwargs}
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
