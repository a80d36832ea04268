"""The one registry of training tasks: ``TASKS`` maps a task's name (``TrainConfig.task``) to its ``Task`` class.

It sits below everything that asks it (config resolution, the trainer, ``msconv eval`` and ``msconv demo``), so
none of them imports a task module. A task module registers its class with ``@register_task(name)``;
``msconv.engine`` imports the built-in task modules, one line each.
"""

from __future__ import annotations

from typing import Callable, Dict, TypeVar

__all__ = ['TASKS', 'register_task', 'task_class']

T = TypeVar('T', bound=type)

TASKS: Dict[str, type] = {}


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator: register a ``msconv.engine.tasks.Task`` subclass as task ``name``."""

    def add(cls: T) -> T:
        cls.name = name
        TASKS[name] = cls
        return cls

    return add


def task_class(name: str) -> type:
    """The class registered as task ``name``; ``ValueError`` listing the tasks for any other name."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {name!r}")
    return TASKS[name]
