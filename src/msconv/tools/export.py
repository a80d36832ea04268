"""ONNX export of a model's inference form, with a dynamic batch dimension, checked in onnxruntime.

The exported graph is the inference form ``msconv.inference_model`` gives (a copy: the model passed in is not
modified): eval mode, re-parameterized (the model's own ``reparameterize()`` and timm's ``reparameterize_model`` on
its sub-modules), so BN folded and parallel kernels merged wherever the family defines it. The default exporter is
``torch.export``-based (``dynamo=True``, the default of torch >= 2.9); ``exporter='torchscript'`` selects the legacy
tracer for models ``torch.export`` cannot capture.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn

from .._extras import require
from ..inference import inference_model

__all__ = ['export_onnx', 'check_onnx', 'export_onnx_checked', 'OnnxCheckError']

#: Largest accepted onnxruntime-vs-PyTorch difference, relative to the largest output magnitude.
ONNX_RTOL = 1e-5


class OnnxCheckError(ValueError):
    """The exported graph does not compute the PyTorch model's outputs (no file was left behind)."""


EXPORTERS = ('dynamo', 'torchscript')


def export_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike],
    input_size: Sequence[int] = (3, 224, 224),
    *,
    exporter: str = 'dynamo',
    opset: Optional[int] = None,
    reparam: bool = True,
    example_batch: int = 2,
) -> str:
    """Write ``model`` (its inference form when ``reparam``) to ``path`` as ONNX with a dynamic batch size.

    The graph has one input ``input`` of shape ``(batch, C, H, W)`` (H and W fixed to ``input_size``) and one
    output ``output``. ``model`` itself is not modified (its inference form is a copy). Returns ``path``.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    require('onnx', 'ONNX export')
    if exporter == 'dynamo':
        require('onnxscript', 'ONNX export')
    if (
        not isinstance(input_size, (tuple, list))
        or len(input_size) != 3
        or not all(isinstance(v, int) and v > 0 for v in input_size)
    ):
        raise ValueError(f"input_size must be a (C, H, W) tuple of 3 positive ints, got {input_size!r}")
    if example_batch < 2:
        raise ValueError(
            f"example_batch must be >= 2 (a batch of 1 is specialised by the exporter), got {example_batch}"
        )
    _writable_folder(Path(path))
    path = str(path)
    if reparam:  # the reparameterized eval copy, fp32, default layout (an ONNX graph has no memory format)
        model = inference_model(model, channels_last=False).model
    else:
        model.eval()
    x = torch.randn(example_batch, *input_size)
    with torch.no_grad():
        if exporter == 'dynamo':
            program = torch.onnx.export(
                model,
                (x,),
                None,
                dynamo=True,
                verbose=False,
                opset_version=opset,
                input_names=['input'],
                output_names=['output'],
                dynamic_shapes=({0: torch.export.Dim('batch')},),
            )
            program.save(path)
        else:
            import warnings

            with warnings.catch_warnings():  # the user chose the legacy exporter: no deprecation notice
                warnings.simplefilter('ignore', DeprecationWarning)
                torch.onnx.export(
                    model,
                    (x,),
                    path,
                    dynamo=False,
                    opset_version=opset or 17,
                    input_names=['input'],
                    output_names=['output'],
                    dynamic_axes={'input': {0: 'batch'}, 'output': {0: 'batch'}},
                )
    return path


def _writable_folder(path: Path) -> Path:
    """The folder ``path`` is written into; ``FileNotFoundError`` naming ``path`` when it does not exist."""
    folder = path.parent if str(path.parent) else Path('.')
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: its folder {str(folder)!r} does not exist")
    return folder


def check_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike],
    input_size: Sequence[int] = (3, 224, 224),
    batch_sizes: Sequence[int] = (1, 3),
    seed: int = 0,
    relative: bool = False,
) -> Dict[int, float]:
    """Run the ONNX file in onnxruntime (CPU) and return the max-abs difference to ``model`` per batch size
    (divided by the largest ``|model output|`` when ``relative``)."""
    import numpy as np

    ort = require('onnxruntime', 'the onnxruntime check of an ONNX export')
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    diffs: Dict[int, float] = {}
    for b in batch_sizes:
        x = torch.randn(b, *input_size, generator=gen)
        with torch.no_grad():
            ref = model(x).numpy()
        got = session.run(None, {name: x.numpy()})[0]
        if got.shape != ref.shape:
            raise ValueError(f"onnx output shape {got.shape} differs from PyTorch {ref.shape} at batch size {b}")
        diffs[b] = float(np.abs(got - ref).max())
        if relative:
            diffs[b] /= max(float(np.abs(ref).max()), 1e-12)
    return diffs


def export_onnx_checked(
    model: nn.Module,
    path: Union[str, os.PathLike],
    input_size: Sequence[int] = (3, 224, 224),
    *,
    batch_sizes: Sequence[int] = (1, 3),
    rtol: float = ONNX_RTOL,
    **export_kwargs: Any,
) -> Dict[int, float]:
    """``export_onnx`` into a temporary file beside ``path``, check it in onnxruntime at ``batch_sizes`` and only
    then rename it to ``path`` (atomic). A graph whose outputs differ by more than ``rtol`` (relative to the largest
    output magnitude) raises ``OnnxCheckError`` and leaves no file behind, nor does any other failure. Returns the
    relative differences per batch size."""
    for module in ('onnx', 'onnxruntime'):  # say what is missing before the export, not after it
        require(module, 'ONNX export')
    path = Path(path)
    folder = _writable_folder(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=folder)
        os.close(fd)
        export_onnx(model, tmp, input_size, **export_kwargs)
        diffs = check_onnx(model, tmp, input_size, batch_sizes=batch_sizes, relative=True)
        if max(diffs.values()) > rtol:
            raise OnnxCheckError(
                f"the exported ONNX graph does not match the PyTorch model (relative differences "
                f"{ {b: f'{d:.1e}' for b, d in diffs.items()} } > {rtol:g}); {str(path)!r} was not written"
            )
        os.replace(tmp, path)
        return diffs
    except OSError as e:  # name the file asked for, not the temporary one it is written through
        cause = e.strerror or str(e)
        raise OSError(f"cannot write {str(path)!r}: {cause}; nothing was written") from e
    finally:
        for leftover in (tmp, f'{tmp}.data') if tmp else ():
            if os.path.exists(leftover):
                os.remove(leftover)


def _onnx_summary(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    onnx = require('onnx', 'ONNX export')
    m = onnx.load(str(path))
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    return dict(
        opset=max(o.version for o in m.opset_import if o.domain in ('', 'ai.onnx')),
        input_shape=dims,
        nodes=len(m.graph.node),
    )
