"""msconv: multi-scale convolution backbones (SMT, SCSC, ShiftwiseConv) for PyTorch and timm.

``import msconv`` registers every model in timm's registry, so ``timm.create_model('smt_tiny')`` works too.
"""

from importlib import import_module
from typing import Any

from . import layers, models
from ._extras import MissingExtraError
from .layers import replace_large_kernels
from .models import (
    FAMILIES,
    convert_official,
    create_model,
    list_models,
    model_family,
    model_info,
    read_checkpoint,
    reparameterize,
    select_classifier_rows,
)

__version__ = '0.1.0'

# Heavier parts (engine, tools) are imported on first use so that `import msconv` stays light.
_LAZY = {
    'profile': 'msconv.tools.profile',
    'benchmark': 'msconv.tools.bench',
    'export_onnx': 'msconv.tools.export',
    'inference_model': 'msconv.inference',
    'InferenceModel': 'msconv.inference',
    'compute_erf': 'msconv.tools.erf',
    'depthwise_conv2d': 'msconv.layers.fast_ops',
    'train': 'msconv.engine',
    'evaluate': 'msconv.engine',
    'demo': 'msconv.engine',
    'TrainConfig': 'msconv.engine',
    'SparsityScheduler': 'msconv.engine.sparsity',
    'create_detector': 'msconv.dense',
    'create_segmenter': 'msconv.dense',
    'create_backbone_fpn': 'msconv.dense',
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'msconv' has no attribute {name!r}")


__all__ = [
    'FAMILIES',
    'MissingExtraError',
    'convert_official',
    'create_model',
    'list_models',
    'model_family',
    'model_info',
    'read_checkpoint',
    'reparameterize',
    'replace_large_kernels',
    'select_classifier_rows',
    'layers',
    'models',
    '__version__',
    *_LAZY,
]
