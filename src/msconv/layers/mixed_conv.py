"""Scale-Aware Modulation (SAM) from SMT: Multi-Head Mixed Convolution + Scale-Aware Aggregation.

Paper: "Scale-Aware Modulation Meet Transformer", Lin et al., ICCV 2023 (arXiv 2307.08579).

The three operators are NCHW in and out and keep the official parameter layout (one depthwise kernel per head,
the grouped/dense 1x1 pair of SAA, head-major channel order of the ``s`` projection), so official weights load
with ``msconv.convert_official(sd, 'smt')``.

Channel orders. MHMC splits C channels into ``h`` heads of ``Ch = C / h`` contiguous channels ("head-major",
channel ``i * Ch + j`` is channel ``j`` of head ``i``). SAA first interleaves them (new channel ``j * h + i``) so
that each group of the grouped 1x1 conv sees one channel of every head. ``ScaleAwareModulation`` never shuffles
activations: it permutes the rows of the tiny ``s`` weight and of the depthwise kernels instead, so the
convolution output is produced directly in interleaved order (the same maths, no copy).
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.depthwise import depthwise_conv2d
from ._fold import bn_folded_weights, fold_bn_into_conv
from .fast_ops import depthwise_grad_input, depthwise_grad_weight, linear
from .forms import autocast_dtype, tunable, tuned, use_fast_form
from .linear import Linear

__all__ = ['MultiHeadMixedConv', 'ScaleAwareAggregation', 'ScaleAwareModulation']


def _interleave_rows(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder dim 0 from head-major (i * Ch + j) to interleaved (j * h + i)."""
    return t.unflatten(0, (num_heads, -1)).transpose(0, 1).flatten(0, 1)


def _per_head_weight_grad(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, kernel_sizes: Tuple[int, ...], interleaved: bool
) -> torch.Tensor:
    """The gradient of the merged MHMC kernel (C, 1, K, K), each head's window computed with the head's own kernel
    size (the padded taps get zeros: they are not parameters), through the tuned ``depthwise_grad_weight`` (the
    convolution's backward, or image by image the correlation of the input with the output gradient: 2x-5x faster
    for SMT-T's 5x5-9x9 heads on one thread of the AMD EPYC)."""
    C, K, heads = weight.shape[0], weight.shape[-1], len(kernel_sizes)
    ch = C // heads
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    grad_w = weight.new_zeros(weight.shape)
    for i, k in enumerate(kernel_sizes):
        rows = slice(i, None, heads) if interleaved else slice(i * ch, (i + 1) * ch)
        o = (K - k) // 2
        w_i = weight[rows, :, o : o + k, o : o + k].contiguous()
        x_i, g_i = x[:, rows].contiguous(memory_format=fmt), grad[:, rows].contiguous(memory_format=fmt)
        grad_w[rows, :, o : o + k, o : o + k] = depthwise_grad_weight(g_i, x_i, w_i, (k // 2, k // 2))
    return grad_w


def _group_chunks(groups: int, in_per_group: int) -> int:
    """Groups per chunk of :func:`_grouped_pointwise_gemm`: the most groups whose inputs fit 16 channels (a chunk's
    block-diagonal GEMM then does at most 16 / in_per_group times the grouped conv's multiply-adds, in one BLAS call
    with a useful inner size)."""
    return max(k for k in range(1, groups + 1) if groups % k == 0 and k * in_per_group <= max(16, in_per_group))


def _block_diagonal(weight: torch.Tensor, groups: int, k: int) -> torch.Tensor:
    """A grouped 1x1 weight (O, I/groups, 1, 1) as groups/k block-diagonal (k*O/groups, k*I/groups) matrices, one per
    chunk of k adjacent groups."""
    og, ig = weight.shape[0] // groups, weight.shape[1]
    w = weight.reshape(groups // k, k, og, ig)
    eye = torch.eye(k, dtype=weight.dtype, device=weight.device)
    return (w[:, :, :, None, :] * eye[None, :, None, :, None]).reshape(groups // k, k * og, k * ig)


def _grouped_pointwise_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], groups: int):
    """``F.conv2d(x, weight, bias, groups=groups)`` for a 1x1 ``weight`` on channels-last ``x``: one batched GEMM over
    chunks of adjacent groups, each chunk's token columns times its block-diagonal weight, written into the output's
    columns (strided views of the token matrices: no copies)."""
    B, C, H, W = x.shape
    out_ch = weight.shape[0]
    k = _group_chunks(groups, weight.shape[1])
    n = groups // k
    blocks = _block_diagonal(weight, groups, k)  # (n, co, ci)
    xt = x.permute(0, 2, 3, 1).reshape(-1, n, C // n).transpose(0, 1)  # (n, M, ci), a view: x is channels-last
    out = x.new_empty(B, H, W, out_ch)
    dest = out.view(-1, n, out_ch // n).transpose(0, 1)  # (n, M, co) view of the output's token columns
    if bias is None:
        torch.bmm(xt, blocks.transpose(1, 2), out=dest)
    else:
        torch.baddbmm(bias.view(n, 1, -1), xt, blocks.transpose(1, 2), out=dest)
    return out.permute(0, 3, 1, 2)


def grouped_pointwise(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], groups: int) -> torch.Tensor:
    """The grouped 1x1 convolution ``F.conv2d(x, weight, bias, groups=groups)`` with autograd off (a lean training
    function's forward, or the input gradient of one as the convolution with the groups' transposed weights), in the
    fastest of three exact forms on channels-last ``x`` (the tuned operation ``grouped_pointwise``): ``F.conv2d``
    (on one thread torch sends 1x1 convs of small batches to its native kernel, which copies every group of a
    channels-last map), oneDNN's convolution called directly, or one GEMM per chunk of adjacent groups
    (:func:`_grouped_pointwise_gemm`)."""
    plain = lambda: F.conv2d(x, weight, bias, groups=groups)  # noqa: E731
    if torch.is_grad_enabled() or not tunable('grouped_pointwise', x):
        return plain()
    weight = weight.contiguous()
    return tuned(
        'grouped_pointwise',
        x,
        {
            'conv': plain,
            'onednn': lambda: torch.mkldnn_convolution(x, weight, bias, (0, 0), (1, 1), (1, 1), groups),
            'gemm': lambda: _grouped_pointwise_gemm(x, weight, bias, groups),
        },
        extra=f"{weight.shape[1] * groups}/{groups}->{weight.shape[0]}{'+b' if bias is not None else ''}",
    )


def _grouped_transposed(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The grouped 1x1 weight whose convolution is the input gradient of ``weight``'s: (I, O/groups, 1, 1)."""
    og, ig = weight.shape[0] // groups, weight.shape[1]
    return weight.reshape(groups, og, ig).transpose(1, 2).reshape(groups * ig, og, 1, 1)


def _grouped_pointwise_grad_weight_gemm(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, groups: int):
    C, out_ch, ig = x.shape[1], weight.shape[0], weight.shape[1]
    og = out_ch // groups
    k = _group_chunks(groups, ig)
    n = groups // k
    xt = x.permute(0, 2, 3, 1).reshape(-1, n, C // n).transpose(0, 1)  # (n, M, ci)
    gt = grad.permute(0, 2, 3, 1).reshape(-1, n, out_ch // n).permute(1, 2, 0)  # (n, co, M)
    full = torch.bmm(gt, xt).view(n, k, og, k, ig)  # each chunk's (co, ci) product; its diagonal blocks: its groups'
    return full.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(weight.shape)


def grouped_pointwise_grad_weight(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, groups: int
) -> torch.Tensor:
    """The weight gradient of the grouped 1x1 convolution ``F.conv2d(x, weight, groups=groups)`` for the output
    gradient ``grad`` (autograd off), in the faster of two exact forms on channels-last maps (the tuned operation
    ``grouped_pointwise_grad_weight``): the convolution's backward (oneDNN's grouped weight gradient is slow; on one
    thread torch's native kernel copies every group), or per chunk of adjacent groups one GEMM over all tokens whose
    diagonal blocks are the chunk's groups' gradients."""

    def backward() -> torch.Tensor:
        return torch.ops.aten.convolution_backward(
            grad, x, weight, None, (1, 1), (0, 0), (1, 1), False, (0, 0), groups, (False, True, False)
        )[1]

    if torch.is_grad_enabled() or not tunable('grouped_pointwise_grad_weight', grad):
        return backward()
    return tuned(
        'grouped_pointwise_grad_weight',
        grad,
        {'backward': backward, 'gemm': lambda: _grouped_pointwise_grad_weight_gemm(grad, x, weight, groups)},
        extra=f'{weight.shape[1] * groups}/{groups}->{weight.shape[0]}',
    )


class _MixedDepthwise(torch.autograd.Function):
    """The merged MHMC convolution ``F.conv2d(x, weight, bias, padding=K // 2, groups=C)`` (``weight``: every
    head's kernel zero-padded to the largest size K) whose backward computes each head's weight gradient with the
    head's own kernel size: the taps outside a head's window hold zeros that are never trained (their gradient is
    dropped by the padding that built ``weight``), and oneDNN's depthwise weight gradient costs in proportion to the
    taps (about half the merged kernel's for kernels 3-5-7-9). The input gradient is the merged kernel's (one call,
    its zero taps add exact zeros). Under autocast it computes in the autocast dtype like ``F.conv2d`` and returns
    gradients in the inputs' dtypes. Not twice differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias, kernel_sizes: Tuple[int, ...], interleaved: bool):
        device = x.device.type
        dtype = autocast_dtype(x) or x.dtype
        xc, wc = x.to(dtype), weight.to(dtype)
        bc = bias.to(dtype) if bias is not None else None
        with torch.autocast(device, enabled=False):
            out = F.conv2d(xc, wc, bc, padding=weight.shape[-1] // 2, groups=weight.shape[0])
        ctx.save_for_backward(xc, wc)
        ctx.kernel_sizes, ctx.interleaved, ctx.has_bias = kernel_sizes, interleaved, bias is not None
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        xc, wc = ctx.saved_tensors
        K = wc.shape[-1]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = grad.to(xc.dtype)
        fmt = torch.channels_last if xc.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        grad = grad.contiguous(memory_format=fmt)
        grad_x = grad_w = grad_b = None
        if need_x:  # input only: asking oneDNN for the bias gradient would compute the merged weight gradient too
            grad_x = depthwise_grad_input(grad, xc, wc, (K // 2, K // 2))
        if need_b and ctx.has_bias:
            grad_b = grad.sum((0, 2, 3))
        if need_w:
            grad_w = _per_head_weight_grad(grad, xc, wc, ctx.kernel_sizes, ctx.interleaved)
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        return (
            grad_x.to(x_dtype) if grad_x is not None else None,
            grad_w.to(w_dtype) if grad_w is not None else None,
            grad_b.to(b_dtype) if grad_b is not None else None,
            None,
            None,
        )


class _SamLean(torch.autograd.Function):
    """The training form of the SAM token mixer on (B, H, W, C) tokens ``t``: ``proj(SAA(MHMC(s(t))) * v(t))`` with
    SAA's BatchNorm in training mode, that saves for backward ``t``, ``s``, the MHMC output, the BatchNorm input
    (with its batch statistics), the modulator and ``v``, and recomputes in backward what the plain form keeps besides
    (the BatchNorm output, the GELU output and the product fed to ``proj``): three elementwise passes instead of five
    tensors held from forward to backward. The token GEMMs (``v``, ``s``, ``proj``, SAA's dense 1x1 conv: a contiguous
    channels-last tensor is its token matrix) and their input gradients run through the tuned ``linear`` (BLAS or
    oneDNN), SAA's grouped 1x1 conv through :func:`grouped_pointwise` and :func:`grouped_pointwise_grad_weight`, MHMC's
    input gradient through the tuned ``depthwise_grad_input`` and its weight gradient per head
    (``_per_head_weight_grad``, each head through the tuned ``depthwise_grad_weight``). The
    BatchNorm running statistics are updated as ``nn.BatchNorm2d`` does when ``running`` is given. Under autocast it
    computes in the autocast dtype like the plain form (the BatchNorm's affine and statistics in fp32) and returns
    gradients in the inputs' dtypes. Not twice differentiable."""

    @staticmethod
    def forward(ctx, meta, t, wv, bv, ws, bs, wm, bm, w0, b0, gamma, beta, w1, b1, wp, bp):
        kernel_sizes, groups, eps, factor, running_mean, running_var = meta
        dtype = autocast_dtype(t) or t.dtype
        args = (t, wv, bv, ws, bs, wm, bm, w0, b0, gamma, beta, w1, b1, wp, bp)
        ctx.dtypes = tuple(a.dtype if a is not None else None for a in args)
        cast = [a.to(dtype) if a is not None and i not in (9, 10) else a for i, a in enumerate(args)]
        t, wv, bv, ws, bs, wm, bm, w0, b0, gamma, beta, w1, b1, wp, bp = cast
        C, K = wm.shape[0], wm.shape[-1]
        with torch.autocast(t.device.type, enabled=False):
            v = linear(t, wv, bv)
            s = linear(t, ws, bs).permute(0, 3, 1, 2)  # (B, C, H, W) channels-last view, interleaved channels
            d = F.conv2d(s, wm, bm, padding=K // 2, groups=C)
            z = grouped_pointwise(d, w0, b0, groups)
            y, mean, invstd = torch.native_batch_norm(
                z, gamma, beta, running_mean, running_var, True, factor if factor is not None else 0.0, eps
            )
            m = linear(torch.ops.aten.gelu_(y).permute(0, 2, 3, 1), w1.flatten(1), b1)  # y is not saved
            out = linear(m * v, wp, bp)
        ctx.save_for_backward(t, wv, ws, s, wm, d, w0, z, gamma, beta, mean, invstd, w1, m, v, wp)
        ctx.meta = (kernel_sizes, groups, eps, running_mean, running_var)
        ctx.has_bias = tuple(b is not None for b in (bv, bs, bm, b0, b1, bp))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        t, wv, ws, s, wm, d, w0, z, gamma, beta, mean, invstd, w1, m, v, wp = ctx.saved_tensors
        kernel_sizes, groups, eps, running_mean, running_var = ctx.meta
        has_bv, has_bs, has_bm, has_b0, has_b1, has_bp = ctx.has_bias
        need = ctx.needs_input_grad[1:]
        K = wm.shape[-1]
        grad = grad.to(t.dtype).contiguous()
        flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
        g = [None] * 15
        g2 = flat(grad)
        if need[13]:
            g[13] = g2.t().mm(flat(m * v))
        if need[14] and has_bp:
            g[14] = g2.sum(0)
        gp = linear(grad, wp.t())
        gm, gv = gp * v, gp.mul_(m)  # gp is not needed after these
        if need[1]:
            g[1] = flat(gv).t().mm(flat(t))
        if need[2] and has_bv:
            g[2] = flat(gv).sum(0)
        gt = linear(gv, wv.t()) if need[0] else None
        # SAA backward: proj1 as a GEMM on tokens, GELU, BatchNorm, the grouped 1x1 conv
        scale = gamma.float() * invstd  # y = z * scale + shift, as the CPU BatchNorm computes it
        shift = beta.float() - mean * scale
        y = torch.addcmul(shift.view(1, -1, 1, 1), z, scale.view(1, -1, 1, 1)).to(z.dtype)
        ga = linear(gm, w1.flatten(1).t()).permute(0, 3, 1, 2)
        gy = torch.ops.aten.gelu_backward.grad_input(ga, y, grad_input=ga)  # in place: ga is not needed after
        if need[11]:  # y is not needed after: the GELU output in place
            g[11] = flat(gm).t().mm(flat(torch.ops.aten.gelu_(y).permute(0, 2, 3, 1))).view(w1.shape)
        if need[12] and has_b1:
            g[12] = flat(gm).sum(0)
        gz, g[9], g[10] = torch.ops.aten.native_batch_norm_backward(
            gy, z, gamma, running_mean, running_var, mean, invstd, True, eps, [True, need[9], need[10]]
        )
        gz = gz.contiguous(memory_format=torch.channels_last)
        gd = grouped_pointwise(gz, _grouped_transposed(w0, groups), None, groups)  # SAA's grouped 1x1 conv
        if need[7]:
            g[7] = grouped_pointwise_grad_weight(gz, d, w0, groups)
        if need[8] and has_b0:
            g[8] = gz.sum((0, 2, 3))
        # MHMC: the input gradient with the merged kernel, the weight gradient head by head
        gd = gd.contiguous(memory_format=torch.channels_last)
        gs = depthwise_grad_input(gd, s, wm, (K // 2, K // 2))
        if need[5]:
            g[5] = _per_head_weight_grad(gd, s, wm, kernel_sizes, interleaved=True)
        if need[6] and has_bm:
            g[6] = gd.sum((0, 2, 3))
        gs = gs.permute(0, 2, 3, 1)
        if need[3]:
            g[3] = flat(gs).t().mm(flat(t))
        if need[4] and has_bs:
            g[4] = flat(gs).sum(0)
        if need[0]:
            gt = gt.add_(linear(gs, ws.t())) if gt is not None else linear(gs, ws.t())
            g[0] = gt
        return (None, *(a.to(dt) if a is not None else None for a, dt in zip(g, ctx.dtypes)))


class MultiHeadMixedConv(nn.Module):
    """MHMC: ``num_heads`` depthwise convolutions of growing kernel size (3, 5, 7, 9 for four heads).

    Head ``i`` convolves the contiguous channels ``[i * C/h, (i + 1) * C/h)`` with a ``(3 + 2i)``-sized kernel.
    ``forward`` runs all heads as ONE depthwise convolution whose smaller kernels are zero-padded to the
    largest size (a ``folded`` form: identical result, one launch, no slicing or concatenation);
    ``forward_reference`` is the plain per-head loop of the paper.

    Args:
        dim: number of channels C (divisible by ``num_heads``).
        num_heads: number of heads h.
        kernel_sizes: odd kernel size per head; defaults to ``3 + 2 * i``.
    """

    __constants__ = ['deployed']

    def __init__(self, dim: int, num_heads: int = 4, kernel_sizes: Optional[Sequence[int]] = None):
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        kernel_sizes = tuple(kernel_sizes) if kernel_sizes is not None else tuple(3 + 2 * i for i in range(num_heads))
        if len(kernel_sizes) != num_heads or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes must be {num_heads} odd sizes, got {kernel_sizes}")
        self.dim = dim
        self.num_heads = num_heads
        self.kernel_sizes = kernel_sizes
        self.max_kernel = max(kernel_sizes)
        self.deployed = False  # set by ScaleAwareModulation.reparameterize: one stored (interleaved) kernel
        head_dim = dim // num_heads
        self.convs = nn.ModuleList(
            [nn.Conv2d(head_dim, head_dim, k, padding=k // 2, groups=head_dim) for k in kernel_sizes]
        )

    def merged_kernel(self, interleaved: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """All heads' kernels zero-padded to ``max_kernel`` as one depthwise (C, 1, K, K) weight and (C,) bias,
        in head-major channel order or, with ``interleaved=True``, in SAA's interleaved order."""
        k_max = self.max_kernel
        weight = torch.cat([F.pad(c.weight, [(k_max - c.kernel_size[0]) // 2] * 4) for c in self.convs])
        bias = torch.cat([c.bias for c in self.convs])
        if interleaved:
            weight, bias = _interleave_rows(weight, self.num_heads), _interleave_rows(bias, self.num_heads)
        return weight, bias

    @torch.jit.unused
    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, interleaved: bool) -> torch.Tensor:
        """The merged depthwise convolution: Triton's mixed-kernel-size kernel (each head visits only its own
        taps, one launch) where ``use_fast_form('triton')`` allows it, else ``F.conv2d`` with the zero-padded
        kernel."""
        if not self.deployed and torch.is_grad_enabled() and use_fast_form('lean', x):  # padded taps: not parameters
            return _MixedDepthwise.apply(x, weight, bias, self.kernel_sizes, interleaved)
        if use_fast_form('triton', x):
            return depthwise_conv2d(
                x,
                weight,
                bias,
                self.max_kernel // 2,
                group_kernel_sizes=self.kernel_sizes,
                group_interleaved=interleaved,
                backend='triton',
            )
        return F.conv2d(x, weight, bias, padding=self.max_kernel // 2, groups=self.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) head-major -> same
        if use_fast_form('folded', x):
            return self._forward_merged(x)
        return self.forward_reference(x)

    @torch.jit.unused
    def _forward_merged(self, x: torch.Tensor) -> torch.Tensor:
        if self.deployed:
            return self.conv(x, self.merged.weight, self.merged.bias, interleaved=True)
        weight, bias = self.merged_kernel()
        return self.conv(x, weight, bias, interleaved=False)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The per-head loop of the paper; once deployed (channels interleaved), the stored merged conv."""
        if self.deployed:
            return F.conv2d(x, self.merged.weight, self.merged.bias, padding=self.max_kernel // 2, groups=self.dim)
        ch = self.dim // self.num_heads
        outs: List[torch.Tensor] = []
        for i, conv in enumerate(self.convs):
            outs.append(conv(x[:, i * ch : (i + 1) * ch]))
        return torch.cat(outs, dim=1)


class ScaleAwareAggregation(nn.Module):
    """SAA: interleave the heads' channels, grouped 1x1 conv (groups of ``num_heads`` channels, one from each
    head) -> BatchNorm -> GELU -> dense 1x1 conv back to C channels. Its output is the modulator."""

    def __init__(self, dim: int, num_heads: int = 4, expand_ratio: int = 2):
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.num_heads = num_heads
        self.proj0 = nn.Conv2d(dim, dim * expand_ratio, 1, groups=dim // num_heads)
        self.bn = nn.BatchNorm2d(dim * expand_ratio)
        self.act = nn.GELU()
        self.proj1 = nn.Conv2d(dim * expand_ratio, dim, 1)

    _band_bytes = 4 << 20  #: the fused form's rows per band: about this many bytes of the expanded tensor

    def forward(self, x: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
        """``x``: (B, C, H, W) in head-major order, or already interleaved when ``interleaved=True``."""
        if use_fast_form('inplace', x):
            if interleaved and tunable('saa_fused', x) and self._fused_ok(x):
                return self._forward_tuned(x)
            return self._forward_inplace(x, interleaved)
        return self.forward_reference(x, interleaved)

    @torch.jit.unused
    def _forward_tuned(self, x: torch.Tensor) -> torch.Tensor:
        return tuned(
            'saa_fused',
            x,
            {
                'plain': lambda: self._forward_inplace(x, True),
                'fused': lambda: self._forward_fused(x),
                'fused_bands': lambda: self._forward_fused(x, bands=True),
            },
            extra=f'{self.dim}/{self.num_heads}->{self.proj0.out_channels}',
        )

    @torch.jit.unused
    def _fused_ok(self, x: torch.Tensor) -> bool:
        bn = self.bn
        return (
            type(self.act) is nn.GELU
            and self.act.approximate == 'none'
            and self.proj0.weight.dtype == x.dtype
            and (
                type(bn) is nn.Identity
                or (type(bn) is nn.BatchNorm2d and not bn.training and bn.running_mean is not None and bn.affine)
            )
        )

    @torch.jit.unused
    def _forward_fused(self, x: torch.Tensor, bands: bool = False) -> torch.Tensor:
        """The ``fused`` inference form on interleaved channels-last ``x``: the BatchNorm (eval statistics) folded
        into the grouped 1x1 conv's tiny weight at call time, that conv with the GELU as one oneDNN call (no separate
        BatchNorm and GELU passes; ``F.conv2d`` would run a grouped 1x1 conv of one image on one thread as a loop of
        per-group native convolutions), then the dense 1x1 conv as a GEMM over the tokens (``fast_ops.linear``).
        With ``bands=True`` (the ``fused_bands`` form) both run one band of rows of one image at a time (about
        ``_band_bytes`` of the expanded tensor per band, which then stays in cache), each band's GEMM written into
        the output's rows: faster on SMT's first stage at detection sizes, slower on the later ones."""
        w, b = self.proj0.weight, self.proj0.bias
        if isinstance(self.bn, nn.BatchNorm2d):
            w, b = bn_folded_weights(w, b, self.bn)
        w = w.contiguous()
        w1, b1 = self.proj1.weight.flatten(1), self.proj1.bias
        B, H, W = x.shape[0], x.shape[2], x.shape[3]
        expanded = self.proj0.out_channels
        rows = max(1, self._band_bytes // max(1, W * expanded * x.element_size())) if bands else H
        if rows >= H:
            a = torch.ops.mkldnn._convolution_pointwise(
                x, w, b, [0, 0], [1, 1], [1, 1], self.proj0.groups, 'gelu', [], 'none'
            )
            return linear(a.permute(0, 2, 3, 1), w1, b1).permute(0, 3, 1, 2)
        out = x.new_empty(B, H, W, self.dim)  # tokens
        for i in range(B):
            for r0 in range(0, H, rows):
                r1 = min(r0 + rows, H)
                a = torch.ops.mkldnn._convolution_pointwise(
                    x[i : i + 1, :, r0:r1], w, b, [0, 0], [1, 1], [1, 1], self.proj0.groups, 'gelu', [], 'none'
                )
                a = a.permute(0, 2, 3, 1).reshape(-1, expanded)
                dest = out[i, r0:r1].view(-1, self.dim)
                if b1 is None:
                    torch.mm(a, w1.t(), out=dest)
                else:
                    torch.addmm(b1, a, w1.t(), out=dest)
        return out.permute(0, 3, 1, 2)

    def _interleave(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W), head-major -> interleaved channels
        return x.unflatten(1, (self.num_heads, self.dim // self.num_heads)).transpose(1, 2).flatten(1, 2)

    def forward_reference(self, x: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
        if not interleaved:
            x = self._interleave(x)
        return self.proj1(self.act(self.bn(self.proj0(x))))

    @torch.jit.unused
    def _forward_inplace(self, x: torch.Tensor, interleaved: bool) -> torch.Tensor:
        if not interleaved:
            x = self._interleave(x)
        return self.proj1(torch.ops.aten.gelu_(self.bn(self.proj0(x))))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Inference form: the BatchNorm folded into the grouped 1x1 conv (eval statistics)."""
        if isinstance(self.bn, nn.BatchNorm2d):
            self.proj0 = fold_bn_into_conv(self.proj0, self.bn)
            self.bn = nn.Identity()


class ScaleAwareModulation(nn.Module):
    """The SAM token mixer: ``proj(SAA(MHMC(s(x))) * v(x))``.

    ``v`` and ``s`` are per-pixel linear projections; MHMC runs on ``s``, SAA turns the result into the
    modulator, which multiplies ``v`` elementwise before the output projection.

    Args:
        dim: channels C.
        num_heads: MHMC heads (``ca_num_heads`` in the official code).
        expand_ratio: SAA expansion of the grouped 1x1 conv.
        qkv_bias: bias in the ``v`` and ``s`` projections.
        proj_drop: dropout after the output projection.
    """

    __constants__ = ['deployed']  # TorchScript compiles only the plain form of the current state

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        expand_ratio: int = 2,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.v = Linear(dim, dim, bias=qkv_bias)
        self.s = Linear(dim, dim, bias=qkv_bias)
        self.mhmc = MultiHeadMixedConv(dim, num_heads)
        self.saa = ScaleAwareAggregation(dim, num_heads, expand_ratio)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.deployed = False

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Inference form: ``s`` stored with interleaved output rows, MHMC as one ``nn.Conv2d`` (smaller kernels
        zero-padded to the largest, rows interleaved) and SAA's BatchNorm folded. Eval outputs are unchanged."""
        if self.deployed:
            return
        h = self.num_heads
        s = Linear(
            self.dim, self.dim, bias=self.s.bias is not None, device=self.s.weight.device, dtype=self.s.weight.dtype
        )
        s.weight.copy_(_interleave_rows(self.s.weight, h))
        if self.s.bias is not None:
            s.bias.copy_(_interleave_rows(self.s.bias, h))
        weight, bias = self.mhmc.merged_kernel(interleaved=True)
        self.mhmc.merged = nn.Conv2d(
            self.dim,
            self.dim,
            self.mhmc.max_kernel,
            padding=self.mhmc.max_kernel // 2,
            groups=self.dim,
            device=weight.device,
            dtype=weight.dtype,
        )
        self.mhmc.merged.weight.copy_(weight)
        self.mhmc.merged.bias.copy_(bias)
        del self.mhmc.convs
        self.mhmc.deployed = True
        self.s = s
        self.saa.reparameterize()
        self.deployed = True

    @torch.jit.unused
    def modulator(self, x: torch.Tensor) -> torch.Tensor:
        """The SAA output for channels-last input ``x`` (B, H, W, C), as (B, H, W, C): ``s`` with interleaved
        rows, MHMC as one merged conv (the ``folded`` form) and SAA without an activation shuffle."""
        if self.deployed:
            return self.saa(self.mhmc(self.s(x).permute(0, 3, 1, 2)), interleaved=True).permute(0, 2, 3, 1)
        h = self.num_heads
        weight_s = _interleave_rows(self.s.weight, h)
        bias_s = _interleave_rows(self.s.bias, h) if self.s.bias is not None else None
        s = linear(x, weight_s, bias_s).permute(0, 3, 1, 2)  # (B, C, H, W), interleaved channels
        weight, bias = self.mhmc.merged_kernel(interleaved=True)
        s = self.mhmc.conv(s, weight, bias, interleaved=True)
        return self.saa(s, interleaved=True).permute(0, 2, 3, 1)

    def forward_nhwc(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        if use_fast_form('folded', x):
            return self._forward_folded_nhwc(x)
        return self.forward_reference_nhwc(x)

    @torch.jit.unused
    def _lean_ok(self) -> bool:
        bn = self.saa.bn
        return (
            not self.deployed
            and (self.proj_drop.p == 0.0 or not self.training)
            and type(bn) is nn.BatchNorm2d
            and bn.training
            and bn.affine
            and type(self.saa.act) is nn.GELU
            and self.saa.act.approximate == 'none'
        )

    @torch.jit.unused
    def _bn_state(self) -> Tuple[Optional[float], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(factor, running_mean, running_var)`` for SAA's training-mode BatchNorm, as ``nn.BatchNorm2d.forward``
        (``num_batches_tracked`` counted)."""
        bn = self.saa.bn
        if not bn.track_running_stats or bn.running_mean is None:
            return None, None, None
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        return factor, bn.running_mean, bn.running_var

    @torch.jit.unused
    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
        """The training step's token mixer as the lean autograd function (:class:`_SamLean`): the plain form's
        values, gradients and BatchNorm statistics, a third less saved for backward at the same speed."""
        h, saa = self.num_heads, self.saa
        wm, bm = self.mhmc.merged_kernel(interleaved=True)
        # the BatchNorm's holder (and the layer) run their forward pre-hooks as if called: gradient checkpointing's
        # keep-the-statistics-once hook (``msconv.engine.tasks.keep_batchnorm_statistics_once``) needs them
        for module in (saa, saa.bn):
            for hook in module._forward_pre_hooks.values():
                hook(module, (x,))
        factor, running_mean, running_var = self._bn_state()
        meta = (self.mhmc.kernel_sizes, saa.proj0.groups, saa.bn.eps, factor, running_mean, running_var)
        out = _SamLean.apply(
            meta, x, self.v.weight, self.v.bias,
            _interleave_rows(self.s.weight, h), _interleave_rows(self.s.bias, h) if self.s.bias is not None else None,
            wm, bm, saa.proj0.weight, saa.proj0.bias, saa.bn.weight, saa.bn.bias, saa.proj1.weight, saa.proj1.bias,
            self.proj.weight, self.proj.bias,
        )  # fmt: skip
        return self.proj_drop(out)

    @torch.jit.unused
    def _forward_folded_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and use_fast_form('lean', x) and self._lean_ok():
            return self._forward_train(x)
        m = self.modulator(x)  # a fresh tensor: in inference it can take the product in place
        return self.proj_drop(self.proj(m.mul_(self.v(x)) if use_fast_form('inplace', x) else m * self.v(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return self.forward_nhwc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return self.forward_reference_nhwc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_reference_nhwc(self, t: torch.Tensor) -> torch.Tensor:
        """The plain form, channels-last tokens: the paper's (per-head MHMC, activation interleave) or, once
        reparameterized, the same maths on the merged weights (``s`` rows interleaved, one depthwise conv)."""
        if self.deployed:
            s = self.mhmc.forward_reference(self.s(t).permute(0, 3, 1, 2))  # one conv, interleaved channels
            m = self.saa.forward_reference(s, interleaved=True).permute(0, 2, 3, 1)
        else:
            s = self.mhmc.forward_reference(self.s(t).permute(0, 3, 1, 2))
            m = self.saa.forward_reference(s, interleaved=False).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(m * self.v(t)))
