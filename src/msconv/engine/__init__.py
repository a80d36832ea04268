"""Training and evaluation engine: ``train(config)``, ``evaluate(...)``, ``demo()``, crash-safe checkpoints,
torchrun support.

Modules: ``config`` (TrainConfig, presets, YAML), ``build`` (model by name, data configuration, checked weight
loading), ``tasks`` (one strategy object per training task; ``register_task``), ``trainer`` (the loop),
``checkpoint`` (atomic, verified checkpoints and run folders), ``metrics`` (records, curves, progress),
``evaluate``, ``verification`` (face pairs), ``sparsity`` (ShiftWise sparse training), ``distributed``, ``demo``.
"""

from .build import build_model
from .config import PRESETS, TrainConfig, resolve_config
from .demo import demo
from .evaluate import evaluate
from .registry import register_task
from .tasks import Task
from .trainer import NonFiniteLossError, train

# isort: split
# The built-in tasks: importing a task's module registers it (one line per task module).
from . import dense_tasks  # noqa: F401  (detection, segmentation)

__all__ = [
    'PRESETS',
    'TrainConfig',
    'resolve_config',
    'evaluate',
    'train',
    'demo',
    'build_model',
    'NonFiniteLossError',
    'Task',
    'register_task',
]
