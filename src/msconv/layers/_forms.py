"""Switch every msconv operator to its plain reference form.

Operators keep one obviously-correct PyTorch form (``forward_reference``) beside their fast form. Inside
``reference_forms()`` the operators run the reference form instead, which is what tests compare against and what
``msconv.profile`` counts: e.g. MHMC's fast form is one depthwise conv with kernels zero-padded to 9x9, but the
architecture's cost is that of its 3/5/7/9 kernels.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

__all__ = ['reference_forms', 'reference_forms_enabled']

_ENABLED = False


def reference_forms_enabled() -> bool:
    return _ENABLED


@contextmanager
def reference_forms(enabled: bool = True) -> Iterator[None]:
    global _ENABLED
    previous, _ENABLED = _ENABLED, enabled
    try:
        yield
    finally:
        _ENABLED = previous
