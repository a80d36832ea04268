"""Training and evaluation engine: ``train(config)``, ``evaluate(...)``, ``demo()``, crash-safe checkpoints,
torchrun support."""
from .config import PRESETS, TrainConfig, resolve_config
from .demo import demo
from .evaluate import evaluate
from .build import build_model
from .trainer import NonFiniteLossError, train

__all__ = ['PRESETS', 'TrainConfig', 'resolve_config', 'evaluate', 'train', 'demo', 'build_model',
           'NonFiniteLossError']
