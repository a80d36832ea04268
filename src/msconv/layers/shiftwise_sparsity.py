"""Moved: the sparsity scheduler is a training tool and lives in :mod:`msconv.engine.sparsity` (also
``msconv.SparsityScheduler``). This alias keeps ``from msconv.layers.shiftwise_sparsity import SparsityScheduler``
working until its last user switches; it is the one import from layers up to the engine, and it runs only when
this module is imported."""
from ..engine.sparsity import SparsityScheduler

__all__ = ['SparsityScheduler']
