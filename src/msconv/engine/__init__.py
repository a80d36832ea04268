"""Training and evaluation engine: ``train(config)``, ``evaluate(...)``, ``demo()``, crash-safe checkpoints,
torchrun support.

The modules, lowest layer first; each imports only from the layers below it (``tests/test_architecture.py``):

- ``registry`` (the one task registry), ``checkpoint`` (atomic, verified checkpoints and run folders), ``lock``
  (one writer per run folder), ``distributed``, ``metrics`` (records, curves, progress), ``verification`` (face
  pairs), ``sparsity`` (ShiftWise sparse training);
- ``config`` (``TrainConfig``: the options every task shares; registered presets; YAML; checks), ``optim`` (the
  optimizer's parameter groups);
- ``build`` (model by name, data configuration, checked weight loading), ``recipes`` (the ImageNet presets and their
  official tables), ``evaluate`` (a classifier's evaluation, ``msconv.evaluate``);
- ``tasks`` (the ``Task`` interface; ``msconv eval`` and ``msconv demo`` ask a run's task through it);
- ``trainer`` (the loop), ``demo`` (the digits demos);
- the tasks: ``classification``, ``face``, ``dense_tasks`` (detection and segmentation; presets in
  ``dense_recipes``). Each owns its config section, presets, data, evaluation, demo and ``msconv train`` flags and
  registers itself; this package imports them, one line each.
"""

from .build import build_model
from .config import PRESETS, TrainConfig, resolve_config
from .demo import demo
from .evaluate import evaluate
from .registry import TASKS, register_task
from .tasks import Task
from .trainer import NonFiniteLossError, train

# isort: split
# The built-in tasks: importing a task's module registers it (one line per task module).
from .classification import ClassificationConfig, ClassificationTask
from .dense_tasks import DetectionConfig, DetectionTask, SegmentationConfig, SegmentationTask
from .face import FaceConfig, FaceTask

__all__ = [
    'PRESETS',
    'TASKS',
    'TrainConfig',
    'ClassificationConfig',
    'FaceConfig',
    'DetectionConfig',
    'SegmentationConfig',
    'resolve_config',
    'evaluate',
    'train',
    'demo',
    'build_model',
    'NonFiniteLossError',
    'Task',
    'ClassificationTask',
    'FaceTask',
    'DetectionTask',
    'SegmentationTask',
    'register_task',
]
