"""Shift-wise convolution (SW): a large depthwise kernel emulated with small ones.

Paper: Dachong Li, Li Li, Zhuangzhuang Chen, Jianqiang Li, "ShiftwiseConv: Small Convolutional Kernel with Large
Kernel Effect", CVPR 2025 (arXiv 2401.12736). Official code: github.com/lidc54/shift-wiseConv (commit 2202e6b5),
whose semantics this module reproduces exactly (see ``shared/reference/shiftwise.md``).

What the operator computes, per "rep" channel c (the channels not set aside as ghost/identity channels):
``n_paths`` depthwise k x k convs give c ``nk = ceil(K/k)`` small kernels each; the paths are summed into
``W_c[0..nk-1]``. The official CUDA op writes the nk conv maps and shift-adds them into three maps. That is exactly
(reference section 2.4) three depthwise cross-correlations with kernels assembled from the small ones:

* horizontal strip ``Kh`` (k x nk*k): tile t = sum over the ``n_reps`` shuffles g of ``W_c[sigma_g(t)]``;
* vertical strip ``Kv`` (nk*k x k): the same with the vertical shuffles ``tau_g``;
* centre ``Ks`` (k x k) = sum over g of ``W_c[r_g]``.

The long axis spans offsets ``[-K//2, nk*k-1-K//2]`` (asymmetric and longer than K when k does not divide K).
Then ``y_c = BN_h(Kh * x_c) + BN_v(Kv * x_c) + BN_s(Ks * x_c) + x_c`` and the output is ``cat([y_rep, x_ghost])``:
rep channels first, then ghost channels (the official output channel order).

We never materialise the nk maps. The forms, checked against each other in tests and chosen by
``msconv.layers.forms``:

* ``forward_reference``: the plain form (assemble kernels, three depthwise convs, the three BatchNorm modules);
  once reparameterized, the two deploy strip convs, out of place.
* training (kind ``lean``: not under graph captures or ``reference_forms()``): a memory-lean autograd function
  that keeps only the rep input and per-channel statistics, and recomputes the three strip responses in backward
  (about 1x the input in saved activations instead of 4x).
* eval (kind ``folded``): BNs, identity and paths folded on the fly into one cross-shaped depthwise kernel per
  channel, run as a k x L and an L x k strip conv; ``reparameterize()`` stores that deploy form (ghost channels
  become a centre tap). Its strip convs run on Triton where ``use_fast_form('triton')`` allows.
"""

import functools
import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import depthwise_conv2d as _fast_depthwise
from ._fold import channels_last_only
from .fast_ops import depthwise_grad_input, depthwise_grad_weight
from .forms import is_capturing, use_fast_form

__all__ = ['ShiftWiseConv2d', 'shiftwise_indices', 'shiftwise_geometry']


def _depthwise(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    padding: Tuple[int, int],
) -> torch.Tensor:
    """Depthwise correlation, stride 1: the Triton kernel where ``use_fast_form('triton')`` allows, else
    ``F.conv2d``."""
    if use_fast_form('triton', x):
        return _fast_depthwise(x, weight, bias, padding, backend='triton')
    return F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1])


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b``, in place into the fresh ``a`` where ``use_fast_form('inplace')`` allows."""
    return a.add_(b) if use_fast_form('inplace', a) else a + b


def shiftwise_geometry(kernel_size: int, small_kernel: int) -> Dict[str, object]:
    """Derived scalars of the official op: ``nk``, ``padding``, ``extra_pad``, ``mid``, ``real_pad`` and the
    long-axis correlation offsets ``(lo, hi)`` = ``(-mid, nk*k-1-mid)``."""
    nk = math.ceil(kernel_size / small_kernel)
    padding = small_kernel - 1
    mid = kernel_size // 2
    real_pad = [mid - t * small_kernel - padding for t in range(nk)]
    return dict(
        nk=nk,
        padding=padding,
        extra_pad=padding - small_kernel // 2,
        mid=mid,
        real_pad=real_pad,
        offsets=(-mid, nk * small_kernel - 1 - mid),
    )


def shiftwise_indices(
    channels: int,
    kernel_size: int,
    small_kernel: int = 3,
    ghost_ratio: float = 0.23,
    n_reps: int = 4,
    seed: int = 123,
) -> Dict[str, torch.Tensor]:
    """Regenerate the official index draw bit-exactly, without touching any global random state.

    Ghost channels: a legacy numpy ``RandomState(seed)`` permutation (what ``np.random.seed(seed);
    np.random.choice(C, ghostN, replace=False)`` draws), sorted. Shuffles: a local torch CPU generator seeded
    ``seed`` draws ``randperm(nk)`` for every (group, rep channel) horizontally, then vertically, then one
    ``randint(0, nk, (repN,))`` per group for the centre path.

    Returns int64 tensors ``ghost`` (ghostN,), ``rep`` (repN,), ``perm_h`` and ``perm_v`` (n_reps, repN, nk) where
    ``perm[g, c, t]`` is the small kernel placed at tile t, and ``centre`` (n_reps, repN).
    """
    idx = _cached_indices(channels, kernel_size, small_kernel, float(ghost_ratio), n_reps, seed)
    return {k: v.clone() for k, v in idx.items()}


@functools.lru_cache(maxsize=64)
def _cached_indices(
    channels: int,
    kernel_size: int,
    small_kernel: int,
    ghost_ratio: float,
    n_reps: int,
    seed: int,
) -> Dict[str, torch.Tensor]:
    # every block of a stage draws the same indices (same arguments, fresh seed): draw them once
    rep_n = int(channels * (1 - ghost_ratio)) // 2 * 2
    ghost_n = channels - rep_n
    nk = math.ceil(kernel_size / small_kernel)
    ghost = np.sort(np.random.RandomState(seed).permutation(channels)[:ghost_n])
    rep = np.setdiff1d(np.arange(channels), ghost)
    gen = torch.Generator(device='cpu').manual_seed(seed)
    perms = []
    for _ in range(2):  # horizontal, then vertical
        perms.append(
            torch.stack(
                [
                    torch.stack([torch.randperm(nk, generator=gen, device='cpu') for _ in range(rep_n)])
                    for _ in range(n_reps)
                ]
            )
        )
    centre = torch.stack([torch.randint(0, nk, (rep_n,), generator=gen, device='cpu') for _ in range(n_reps)])
    return dict(
        ghost=torch.as_tensor(ghost, dtype=torch.long, device='cpu').reshape(ghost_n),
        rep=torch.as_tensor(rep, dtype=torch.long, device='cpu').reshape(rep_n),
        perm_h=perms[0].long(),
        perm_v=perms[1].long(),
        centre=centre.long(),
    )


def _take_channels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(1, index)`` that keeps a channels_last input channels_last (one copy either way)."""
    if channels_last_only(x):
        return x.permute(0, 2, 3, 1).index_select(3, index).permute(0, 3, 1, 2)
    return x.index_select(1, index)


def _cat_channels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cat([a, b], 1)`` that keeps channels_last inputs channels_last."""
    if channels_last_only(a) and channels_last_only(b):
        return torch.cat([a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1)], dim=3).permute(0, 3, 1, 2)
    return torch.cat([a, b], dim=1)


# layout decisions read tensor strides: FX records these two as leaf calls instead of tracing into them
torch.fx.wrap('_take_channels')
torch.fx.wrap('_cat_channels')


def _bn_affine(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of a BatchNorm given the statistics it normalises with."""
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


class _LeanShiftWiseTrain(torch.autograd.Function):
    """Training form: three strip correlations, batch-statistics BN, sum and identity, in one autograd node.

    Saves only the rep input, the three (tiny) kernels and the per-channel statistics; backward recomputes the
    strip responses and their kernels' gradients through the tuned ``depthwise_grad_input`` and
    ``depthwise_grad_weight`` operations. ``running`` holds each BN's ``(running_mean, running_var, factor)``
    (``None`` buffers when it tracks none): updated in place as the modules' own forward would.
    """

    @staticmethod
    def forward(ctx, xr, kh, kv, ks, gammas, betas, pads, eps: float, running):
        groups = xr.shape[1]
        y: Optional[torch.Tensor] = None
        means, invstds = [], []
        for i, (k, pad) in enumerate(zip((kh, kv, ks), pads)):
            z = F.conv2d(xr, k, padding=pad, groups=groups)
            # the BatchNorm's own kernel: batch statistics in one vectorised pass (var_mean over (0, 2, 3) of a
            # channels-last map is ~9x slower), its output, and the running statistics updated as the module does;
            # a bf16 z (autocast) with the fp32 affine and statistics: accumulated in fp32, its output in bf16
            running_mean, running_var, factor = running[i]
            out, mean, invstd = torch.native_batch_norm(
                z, gammas[i], betas[i], running_mean, running_var, True, factor, eps
            )
            y = torch.add(xr, out) if y is None else y.add_(out)
            means.append(mean)
            invstds.append(invstd)
        mean_t, invstd_t = torch.stack(means), torch.stack(invstds)
        ctx.save_for_backward(xr, kh, kv, ks, gammas, mean_t, invstd_t)
        ctx.pads, ctx.eps = pads, eps
        return y

    @staticmethod
    def backward(ctx, gy):
        xr, kh, kv, ks, gammas, mean_t, invstd_t = ctx.saved_tensors
        groups = xr.shape[1]
        need_x, need_k = ctx.needs_input_grad[0], any(ctx.needs_input_grad[1:4])
        gx: Optional[torch.Tensor] = None
        gks: List[Optional[torch.Tensor]] = [None, None, None]
        ggamma = torch.zeros_like(gammas)
        gbeta = torch.zeros_like(gammas)
        # gy is a channel slice of the block's gradient: in z's layout, BN's backward kernel is several times faster
        layout = torch.channels_last if channels_last_only(xr) else torch.contiguous_format
        gyc = gy.to(xr.dtype).contiguous(memory_format=layout)
        for i, (k, pad) in enumerate(zip((kh, kv, ks), ctx.pads)):
            z = F.conv2d(xr, k, padding=pad, groups=groups)
            # the BatchNorm's own backward kernel (its per-channel sums accumulate in double, as the plain form's;
            # bf16 z and gy with the fp32 affine and statistics under autocast: gz in bf16)
            gz, ggamma[i], gbeta[i] = torch.ops.aten.native_batch_norm_backward(
                gyc, z, gammas[i], None, None, mean_t[i], invstd_t[i], True, ctx.eps, [need_x or need_k, True, True]
            )
            if not (need_x or need_k):
                continue
            if need_x:
                gxi = depthwise_grad_input(gz, xr, k, pad)
                gx = gxi if gx is None else gx.add_(gxi)
            if need_k:
                gks[i] = depthwise_grad_weight(gz, xr, k, pad)
        if need_x:
            gx = gy.clone() if gx is None else gx.add_(gyc)
        return gx, gks[0], gks[1], gks[2], ggamma, gbeta, None, None, None


class ShiftWiseConv2d(nn.Module):
    """Shift-wise convolution emulating a ``kernel_size`` depthwise kernel with ``small_kernel`` ones.

    NCHW in and out, same channel count, stride 1. The output channel order is the official one by default: the
    rep channels (``rep_index``) first, then the ghost channels (``ghost_index``) unchanged; with
    ``official_order=False`` output channel c is input channel c's (a drop-in for a depthwise ``nn.Conv2d``, what
    :func:`msconv.layers.replace_large_kernels` builds).

    Args:
        channels: input (= output) channels C.
        kernel_size: emulated large kernel K (51, 49, 47, 13 in SW-T).
        small_kernel: odd small kernel k.
        ghost_ratio: fraction of channels that bypass the operator (repN = int(C*(1-ghost_ratio))//2*2).
        n_paths: parallel small-conv paths (summed; merged by ``reparameterize``).
        n_reps: shuffled placements per strip.
        seed: seed of the official index draw (the official code always uses 123).
        bias: a learnable per-channel bias added to the output (indexed by input channel, as a depthwise conv's;
            the official operator has none: its BatchNorms shift the rep channels).
        official_order: output channels in the official rep-then-ghost order (True) or in input order (False).
    """

    __constants__ = ['deployed', 'official_order']  # TorchScript compiles only the branch of the current form

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        small_kernel: int = 3,
        ghost_ratio: float = 0.23,
        n_paths: int = 2,
        n_reps: int = 4,
        seed: int = 123,
        bias: bool = False,
        official_order: bool = True,
    ) -> None:
        super().__init__()
        for name, val, lo in (
            ('channels', channels, 2),
            ('kernel_size', kernel_size, 1),
            ('small_kernel', small_kernel, 1),
            ('n_paths', n_paths, 1),
            ('n_reps', n_reps, 1),
        ):
            if not isinstance(val, int) or isinstance(val, bool) or val < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
        if small_kernel % 2 != 1:
            raise ValueError(f"small_kernel must be odd (the official op is defined for odd k), got {small_kernel}")
        if kernel_size < small_kernel:
            raise ValueError(f"kernel_size must be >= small_kernel ({small_kernel}), got {kernel_size}")
        if not (0.0 <= float(ghost_ratio) < 1.0):
            raise ValueError(f"ghost_ratio must be in [0, 1), got {ghost_ratio!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        rep_n = int(channels * (1 - ghost_ratio)) // 2 * 2
        if rep_n < 2:
            raise ValueError(
                f"channels={channels} with ghost_ratio={ghost_ratio} leaves {rep_n} shift-wise channels; "
                f"need at least 2 (use more channels or a smaller ghost_ratio)"
            )
        geo = shiftwise_geometry(kernel_size, small_kernel)
        self.channels, self.kernel_size, self.small_kernel = channels, kernel_size, small_kernel
        self.ghost_ratio, self.n_paths, self.n_reps, self.seed = float(ghost_ratio), n_paths, n_reps, seed
        self.rep_channels, self.ghost_channels = rep_n, channels - rep_n
        self.nk: int = geo['nk']
        self.extra_pad: int = geo['extra_pad']
        lo, hi = geo['offsets']
        self.long_offsets = (lo, hi)
        self.long_pad = max(-lo, hi)  # symmetric conv padding; the strip is zero-extended to 2*long_pad+1
        self.deployed = False
        self.official_order = bool(official_order)

        idx = shiftwise_indices(channels, kernel_size, small_kernel, ghost_ratio, n_reps, seed)
        for name in ('ghost', 'rep', 'perm_h', 'perm_v', 'centre'):
            t = idx[name]
            buf = torch.empty(t.shape, dtype=torch.long)
            if buf.device.type != 'meta':
                buf.copy_(t)
            self.register_buffer(f'{name}_index' if name in ('ghost', 'rep') else name, buf)
        out_index = torch.cat([idx['rep'], idx['ghost']])
        buf = torch.empty(out_index.shape, dtype=torch.long)
        if buf.device.type != 'meta':
            buf.copy_(out_index)
        self.register_buffer('output_index', buf, persistent=False)
        # input channel c sits at official output position input_index[c]
        buf = torch.empty(out_index.shape, dtype=torch.long)
        if buf.device.type != 'meta':
            buf.copy_(torch.argsort(out_index))
        self.register_buffer('input_index', buf, persistent=False)

        # (paths, repN*nk, k, k): kernel j of rep channel c in path p at row c*nk + j (official LoRAs.p.weight[:, 0]);
        # 4-D so that model.to(memory_format=torch.channels_last) works
        self.weight = nn.Parameter(torch.empty(n_paths, rep_n * self.nk, small_kernel, small_kernel))
        self.bn_h = nn.BatchNorm2d(rep_n)
        self.bn_v = nn.BatchNorm2d(rep_n)
        self.bn_s = nn.BatchNorm2d(rep_n)
        if bias:
            self.bias = nn.Parameter(torch.zeros(channels))
        else:
            self.register_parameter('bias', None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # what nn.Conv2d's default init gives each official small conv (fan_in = k*k)
        bound = 1.0 / self.small_kernel
        if self.weight.device.type != 'meta':
            nn.init.uniform_(self.weight, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, kernel_size={self.kernel_size}, small_kernel={self.small_kernel}, "
            f"rep={self.rep_channels}, ghost={self.ghost_channels}, n_paths={self.n_paths}, "
            f"n_reps={self.n_reps}, seed={self.seed}, footprint={self.long_offsets}"
            + (", bias=True" if self.bias is not None else "")
            + ("" if self.official_order else ", input order")
            + (", deployed" if self.deployed else "")
        )

    # ---- official index layouts (for checks against the official module) -------------------------------
    def official_indices(self) -> Dict[str, torch.Tensor]:
        """``pad_hv``, ``idx_identit``, ``idx_out``, ``ghost`` and ``rep`` as the official module holds them."""
        geo = shiftwise_geometry(self.kernel_size, self.small_kernel)
        real_pad = torch.tensor(geo['real_pad'], dtype=torch.int32)
        r, nk, n = self.rep_channels, self.nk, self.n_reps
        pad_hv = torch.zeros(r * nk, 2 * n, dtype=torch.int32)
        rows = torch.arange(r).view(r, 1) * nk
        for g in range(n):
            pad_hv[(rows + self.perm_h[g].cpu()).reshape(-1), g] = real_pad.repeat(r)
            pad_hv[(rows + self.perm_v[g].cpu()).reshape(-1), n + g] = real_pad.repeat(r)
        idx_identit = (rows + self.centre.cpu().t()).to(torch.int32)
        return dict(
            ghost=self.ghost_index.cpu().int(),
            rep=self.rep_index.cpu().int(),
            pad_hv=pad_hv,
            idx_identit=idx_identit,
            idx_out=(torch.arange(r * nk) // nk).int(),
        )

    # ---- kernel assembly ----------------------------------------------------------------------------------
    def _tile_counts(self, perm: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(repN, nk tiles, nk kernels): how many of the n_reps shuffles put kernel j at tile t."""
        return F.one_hot(perm, self.nk).to(dtype).sum(0)

    def strip_kernels(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Differentiable assembly of ``Kh`` (R,1,k,2P+1), ``Kv`` (R,1,2P+1,k) and ``Ks`` (R,1,k,k).

        The strips are zero-extended from the official footprint ``[lo, hi]`` to the symmetric ``[-P, P]`` so that
        plain symmetric conv padding gives the official (possibly asymmetric) correlation offsets.
        """
        r, nk, k = self.rep_channels, self.nk, self.small_kernel
        w = self.weight.sum(0)  # (R*nk, k, k): the paths merged
        flat = w.reshape(r, nk, k * k)
        tiles_h = torch.bmm(self._tile_counts(self.perm_h, w.dtype), flat).reshape(r, nk, k, k)
        tiles_v = torch.bmm(self._tile_counts(self.perm_v, w.dtype), flat).reshape(r, nk, k, k)
        ks = torch.bmm(F.one_hot(self.centre, nk).to(w.dtype).sum(0).unsqueeze(1), flat).reshape(r, 1, k, k)
        kh = tiles_h.permute(0, 2, 1, 3).reshape(r, 1, k, nk * k)  # tile t -> columns t*k .. t*k+k-1
        kv = tiles_v.reshape(r, 1, nk * k, k)  # tile t -> rows t*k .. t*k+k-1
        lo, hi = self.long_offsets
        left, right = self.long_pad + lo, self.long_pad - hi
        kh = F.pad(kh, (left, right))
        kv = F.pad(kv, (0, 0, left, right))
        return kh, kv, ks

    def _pads(self) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]:
        e, p = self.extra_pad, self.long_pad
        return (e, p), (p, e), (e, e)

    def _deploy_pads(self) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        e, p = self.extra_pad, self.long_pad
        return (e, p), (p, e)

    def _bn_eval_affines(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        return [_bn_affine(bn, bn.running_mean, bn.running_var) for bn in (self.bn_h, self.bn_v, self.bn_s)]

    def folded_strips(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eval-mode fold of the rep channels: ``(Wh, Wv, bias)`` with BNs, centre path and identity in ``Wh``.

        ``conv(xr, Wh, bias, pad (e, P)) + conv(xr, Wv, pad (P, e))`` equals the eval forward on the rep channels.
        """
        kh, kv, ks = self.strip_kernels()
        (ah, bh), (av, bv), (as_, bs) = self._bn_eval_affines()
        e, p, k = self.extra_pad, self.long_pad, self.small_kernel
        centre = ks * as_.view(-1, 1, 1, 1)
        centre = centre + F.one_hot(torch.tensor(e * k + e, device=ks.device), k * k).to(ks.dtype).view(1, 1, k, k)
        wh = kh * ah.view(-1, 1, 1, 1) + F.pad(centre, (p - e, p - e))
        wv = kv * av.view(-1, 1, 1, 1)
        return wh, wv, bh + bv + bs

    def cross_kernel(self) -> torch.Tensor:
        """The eval-mode operator on the rep channels as one dense (R, 1, 2P+1, 2P+1) cross-shaped kernel."""
        wh, wv, _ = self.folded_strips()
        e, p = self.extra_pad, self.long_pad
        return F.pad(wh, (0, 0, p - e, p - e)) + F.pad(wv, (p - e, p - e))

    # ---- forward forms ------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if torch.jit.is_scripting():
            return
        if not isinstance(x, torch.Tensor):  # e.g. an FX Proxy while tracing: nothing to check
            if is_capturing():
                return
            raise ValueError(
                f"ShiftWiseConv2d: input must be a tensor of shape (B, {self.channels}, H, W), got {type(x).__name__}"
            )
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"ShiftWiseConv2d: input must have shape (B, {self.channels}, H, W), got {tuple(x.shape)}")

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain form: assemble the kernels, three depthwise convs, the three BatchNorm modules; once
        reparameterized, the deploy strips as two depthwise convs."""
        self._check_input(x)
        if self.deployed:
            ph, pv = self._deploy_pads()
            y = F.conv2d(
                x, self.deploy_weight_h.to(x.dtype), self.deploy_bias.to(x.dtype), padding=ph, groups=self.channels
            ) + F.conv2d(x, self.deploy_weight_v.to(x.dtype), None, padding=pv, groups=self.channels)
            if self.official_order:
                return y.index_select(1, self.output_index)
            return y
        xr = x.index_select(1, self.rep_index)
        kh, kv, ks = self.strip_kernels()
        kh, kv, ks = kh.to(x.dtype), kv.to(x.dtype), ks.to(x.dtype)
        ph, pv, ps = self._pads()
        r = self.rep_channels
        y = (
            self.bn_h(F.conv2d(xr, kh, padding=ph, groups=r))
            + self.bn_v(F.conv2d(xr, kv, padding=pv, groups=r))
            + self.bn_s(F.conv2d(xr, ks, padding=ps, groups=r))
            + xr
        )
        y = torch.cat([y, x.index_select(1, self.ghost_index)], dim=1)
        if not self.official_order:
            y = y.index_select(1, self.input_index)
        return self._add_bias(y)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        """The training-form output plus ``bias`` in the output's channel order (folded into ``deploy_bias`` once
        reparameterized)."""
        bias = self.bias
        if bias is None:
            return y
        if self.official_order:
            bias = bias.index_select(0, self.output_index)
        return y + bias.to(y.dtype).view(1, -1, 1, 1)

    def _to_output_order(self, y: torch.Tensor) -> torch.Tensor:
        """An official-order output of the training forms in the module's order, plus its bias."""
        if not self.official_order:
            y = _take_channels(y, self.input_index)
        return self._add_bias(y)

    def _lean_ok(self) -> bool:
        return (
            all(type(bn) is nn.BatchNorm2d and bn.training for bn in (self.bn_h, self.bn_v, self.bn_s))
            and len({bn.eps for bn in (self.bn_h, self.bn_v, self.bn_s)}) == 1
        )

    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
        xr = _take_channels(x, self.rep_index)
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # AMP: convs in the autocast dtype, BN statistics in fp32
            xr = xr.to(torch.get_autocast_dtype(dev))
        kh, kv, ks = (t.to(xr.dtype) for t in self.strip_kernels())
        bns = (self.bn_h, self.bn_v, self.bn_s)
        ones = torch.ones(self.rep_channels, device=x.device, dtype=torch.float32)
        gammas = torch.stack([bn.weight.float() if bn.weight is not None else ones for bn in bns])
        betas = torch.stack([bn.bias.float() if bn.bias is not None else ones * 0 for bn in bns])
        running = []
        for bn in bns:
            factor = 0.0 if bn.momentum is None else bn.momentum
            if bn.track_running_stats and bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            running.append((bn.running_mean, bn.running_var, factor))
        y = _LeanShiftWiseTrain.apply(xr, kh, kv, ks, gammas, betas, self._pads(), self.bn_h.eps, tuple(running))
        return self._to_output_order(_cat_channels(y, _take_channels(x, self.ghost_index).to(y.dtype)))

    def _forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        xr = _take_channels(x, self.rep_index)
        wh, wv, bias = (t.to(x.dtype) for t in self.folded_strips())
        ph, pv, _ = self._pads()
        y = _add(_depthwise(xr, wh, bias, ph), _depthwise(xr, wv, None, pv))
        return self._to_output_order(_cat_channels(y, _take_channels(x, self.ghost_index)))

    def _forward_deploy(self, x: torch.Tensor) -> torch.Tensor:
        ph, pv, _ = self._pads()
        wh, wv, bias = (t.to(x.dtype) for t in (self.deploy_weight_h, self.deploy_weight_v, self.deploy_bias))
        y = _add(_depthwise(x, wh, bias, ph), _depthwise(x, wv, None, pv))
        return _take_channels(y, self.output_index) if self.official_order else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fast_form('folded', x):
            return self._forward_fast(x)
        return self.forward_reference(x)

    @torch.jit.unused
    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.deployed:
            return self._forward_deploy(x)
        if not self.training and not any(bn.training for bn in (self.bn_h, self.bn_v, self.bn_s)):
            return self._forward_folded(x)
        if self._lean_ok() and use_fast_form('lean', x):
            return self._forward_train(x)
        return self.forward_reference(x)

    @torch.no_grad()
    def merge_paths(self) -> None:
        """Sum the ``n_paths`` small-kernel paths into one (exact; what the official ``merge_branches`` does)."""
        if self.deployed or self.n_paths == 1:
            return
        self.weight = nn.Parameter(self.weight.sum(0, keepdim=True))
        self.n_paths = 1

    def official_macs(self, height: int, width: int) -> int:
        """Multiply-accumulates the official op's (merged) small convs count for an (H, W) input: repN*nk maps of
        (H+2e) x (W+2e), k*k each. This is the SW part of the paper's 5.0 GMACs for SW-T (the shift-add counts 0);
        the closed form actually executes more (the strips overlap), see ``benchmarks/bench_shiftwise_model.py``."""
        e = self.extra_pad
        return self.rep_channels * self.nk * self.small_kernel**2 * (height + 2 * e) * (width + 2 * e)

    # ---- inference form -------------------------------------------------------------------------------------
    @torch.no_grad()
    def deploy_params(
        self,
        out_scale: Optional[torch.Tensor] = None,
        out_shift: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All-channel deploy weights in INPUT channel order: ``(Wh (C,1,k,2P+1), Wv (C,1,2P+1,k), bias (C,))``.

        ``out_scale``/``out_shift`` (C,), given in the official OUTPUT order, fold a following per-channel affine
        (e.g. an eval BatchNorm). Ghost channels become a centre tap (scale) plus bias. ``bias`` is folded in.
        """
        wh_r, wv_r, b_r = self.folded_strips()
        c, k, e, p = self.channels, self.small_kernel, self.extra_pad, self.long_pad
        wh = wh_r.new_zeros(c, 1, k, 2 * p + 1)
        wv = wv_r.new_zeros(c, 1, 2 * p + 1, k)
        bias = b_r.new_zeros(c)
        wh[self.rep_index] = wh_r
        wv[self.rep_index] = wv_r
        bias[self.rep_index] = b_r
        wh[self.ghost_index, 0, e, p] = 1.0
        if self.bias is not None:
            bias = bias + self.bias.to(bias)
        if out_scale is not None or out_shift is not None:
            scale = wh.new_ones(c) if out_scale is None else out_scale.to(wh)
            shift = wh.new_zeros(c) if out_shift is None else out_shift.to(wh)
            # official output position i holds input channel output_index[i]
            s_in = torch.empty_like(scale).index_copy_(0, self.output_index, scale)
            t_in = torch.empty_like(shift).index_copy_(0, self.output_index, shift)
            wh = wh * s_in.view(-1, 1, 1, 1)
            wv = wv * s_in.view(-1, 1, 1, 1)
            bias = bias * s_in + t_in
        return wh, wv, bias

    @torch.no_grad()
    def reparameterize(
        self,
        out_scale: Optional[torch.Tensor] = None,
        out_shift: Optional[torch.Tensor] = None,
        official_order: Optional[bool] = None,
    ) -> None:
        """Switch to the inference form: one cross-shaped depthwise conv (a k x L plus an L x k strip) plus bias.

        Paths, the three BNs (running statistics), the centre path, the identity and ``bias`` are folded; the small
        kernels and BNs are removed. ``official_order`` sets the deployed output order (None: the module's own).
        With ``False`` the output is in input channel order: a module built in official order then changes its
        output order, and the caller must permute whatever consumes it by ``output_index`` (models do this to
        drop the gather).
        """
        if self.deployed:
            return
        wh, wv, bias = self.deploy_params(out_scale, out_shift)
        self.deploy_weight_h = nn.Parameter(wh)
        self.deploy_weight_v = nn.Parameter(wv)
        self.deploy_bias = nn.Parameter(bias)
        del self.weight, self.bn_h, self.bn_v, self.bn_s, self.bias
        self.register_parameter('bias', None)
        self.deployed = True
        if official_order is not None:
            self.official_order = bool(official_order)

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Official checkpoints do not carry the indices: keep the regenerated ones when they are absent.
        for name in ('ghost_index', 'rep_index', 'perm_h', 'perm_v', 'centre'):
            if prefix + name not in state_dict:
                state_dict[prefix + name] = getattr(self, name)
        # Paths are summed before use, so a checkpoint with another path count loads exactly: a merged one into a
        # multi-path module (path 0 = the sum, the others zero), a multi-path one into a merged module (summed).
        key = prefix + 'weight'
        if not self.deployed and key in state_dict and state_dict[key].dim() == 4:
            w = state_dict[key]
            if w.shape[0] == 1 and self.n_paths > 1:
                state_dict[key] = torch.cat([w, w.new_zeros((self.n_paths - 1, *w.shape[1:]))])
            elif w.shape[0] > 1 and self.n_paths == 1:
                state_dict[key] = w.sum(0, keepdim=True)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def convert_official_op(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official op keys (``<p>LoRAs.i.weight`` / ``<p>LoRA.weight``, ``<p>bn_lora1/2``, ``<p>bn_small``) to ours.

    The small convs (R*nk, 1, k, k) are stacked into ``<p>weight`` (paths, R*nk, k, k). Other keys pass
    unchanged (so msconv state dicts are returned as they are).
    """
    import re

    out: Dict[str, torch.Tensor] = {}
    paths: Dict[str, Dict[int, torch.Tensor]] = {}
    bn_names = {'bn_lora1': 'bn_h', 'bn_lora2': 'bn_v', 'bn_small': 'bn_s'}
    for key, val in state_dict.items():
        m = re.fullmatch(r'(.*?)(LoRAs\.(\d+)|LoRA)\.weight', key)
        if m:
            paths.setdefault(m.group(1), {})[int(m.group(3)) if m.group(3) is not None else 0] = val
            continue
        m = re.fullmatch(r'(.*?)(bn_lora1|bn_lora2|bn_small)\.(.+)', key)
        if m:
            out[f'{m.group(1)}{bn_names[m.group(2)]}.{m.group(3)}'] = val
            continue
        out[key] = val
    for prefix, by_path in paths.items():
        out[prefix + 'weight'] = torch.stack(
            [by_path[i].reshape(by_path[i].shape[0], *by_path[i].shape[2:]) for i in sorted(by_path)]
        )
    return out
