"""Training and evaluation engine: ``train(config)``, ``evaluate(...)``, checkpoints, torchrun support."""
from .config import PRESETS, TrainConfig, resolve_config
from .evaluate import evaluate
from .trainer import NonFiniteLossError, build_model, train

__all__ = ['PRESETS', 'TrainConfig', 'resolve_config', 'evaluate', 'train', 'build_model', 'NonFiniteLossError']
