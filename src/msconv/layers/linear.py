"""A channels-last ``Linear`` whose GEMM runs through oneDNN on CPU.

For fp32 on CPU, ``F.linear`` calls the BLAS ``sgemm`` (MKL in the PyPI wheels), while a 1x1 convolution over a
channels-last tensor is a oneDNN matmul. The two compute the same products; on the 2-core AVX-512 machine we
measure on, oneDNN runs the token-mixer and MLP shapes of these models 1.5x-2.1x faster forward and 1.6x-2.0x
forward + backward (e.g. 3136 x 80 -> 320: 0.82 ms vs 0.43 ms; ``benchmarks/bench_cpu_linear.py`` prints the table
for the machine at hand). A contiguous (..., C) tensor viewed as (1, C, M, 1) or, for (B, H, W, C) tokens, as
(B, C, H, W) is channels-last already, so the detour costs no copy, and autograd goes through the convolution's
own backward. (bf16 needs no detour: ``F.linear`` already runs bf16 GEMMs on oneDNN.)

Which of the two runs is measured, not assumed: on another machine of the same kind the same shapes ran 0.75x-1.08x
(slower on 9 of 10), so where the gate allows the oneDNN form of the tuned operation ``linear``
(``msconv.layers.forms.tunable('linear', x)``: kind ``onednn``, i.e. fp32 CPU, oneDNN enabled, no autocast, no graph
capture, not inside ``reference_forms()``, and a contiguous input), ``msconv.layers.forms.tuned`` times both on the
first call for each shape in eager inference and keeps the faster. With autograd on (training),
under captures and everywhere else it is ``F.linear``.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fast_ops import linear_tuned
from .forms import tunable

__all__ = ['Linear']


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) computed by ``msconv.layers.fast_ops.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tunable('linear', x):
            return self._forward_fast(x)
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @torch.jit.unused
    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        return linear_tuned(x, self.weight, self.bias)
