"""ONNX export of a model's inference form, with a dynamic batch dimension, checked in onnxruntime.

The model is put in eval mode and re-parameterized first (``model.reparameterize()`` when the model has it,
else timm's ``reparameterize_model``), so the exported graph is the deploy form: BN folded, parallel kernels
merged, wherever the family defines it. The default exporter is ``torch.export``-based (``dynamo=True``, the
default of torch >= 2.9); ``exporter='torchscript'`` selects the legacy tracer for models ``torch.export``
cannot capture.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn

from ._common import reparameterize

__all__ = ['export_onnx', 'check_onnx']

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
    output ``output``. The model is switched to eval mode (and re-parameterized) in place. Returns ``path``.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if (not isinstance(input_size, (tuple, list)) or len(input_size) != 3
            or not all(isinstance(v, int) and v > 0 for v in input_size)):
        raise ValueError(f"input_size must be a (C, H, W) tuple of 3 positive ints, got {input_size!r}")
    if example_batch < 2:
        raise ValueError(f"example_batch must be >= 2 (a batch of 1 is specialised by the exporter), got {example_batch}")
    path = str(path)
    model.eval()
    if reparam:
        model = reparameterize(model)
    x = torch.randn(example_batch, *input_size)
    with torch.no_grad():
        if exporter == 'dynamo':
            program = torch.onnx.export(
                model, (x,), None, dynamo=True, verbose=False, opset_version=opset,
                input_names=['input'], output_names=['output'],
                dynamic_shapes=({0: torch.export.Dim('batch')},),
            )
            program.save(path)
        else:
            import warnings
            with warnings.catch_warnings():  # the user chose the legacy exporter: no deprecation notice
                warnings.simplefilter('ignore', DeprecationWarning)
                torch.onnx.export(
                    model, (x,), path, dynamo=False, opset_version=opset or 17,
                    input_names=['input'], output_names=['output'],
                    dynamic_axes={'input': {0: 'batch'}, 'output': {0: 'batch'}},
                )
    return path


def check_onnx(
        model: nn.Module,
        path: Union[str, os.PathLike],
        input_size: Sequence[int] = (3, 224, 224),
        batch_sizes: Sequence[int] = (1, 3),
        seed: int = 0,
) -> Dict[int, float]:
    """Run the ONNX file in onnxruntime (CPU) and return the max-abs difference to ``model`` per batch size."""
    import numpy as np
    import onnxruntime as ort

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
    return diffs


def _onnx_summary(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    import onnx

    m = onnx.load(str(path))
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    return dict(opset=max(o.version for o in m.opset_import if o.domain in ('', 'ai.onnx')), input_shape=dims,
                nodes=len(m.graph.node))
