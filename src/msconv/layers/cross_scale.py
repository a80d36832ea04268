"""Spatial cross-scale convolution (SCSC), NCHW in and out.

Paper: Wang, Chu, Han, Zhang, "SCSC: Spatial Cross-scale Convolution Module to Strengthen both CNNs and
Transformers", ICCV 2023 Workshops (NIVT), arXiv 2308.07110. Official code: github.com/megvii-research/SCSC
(``scsc_swin.py`` token mixer, ``cbtnet.py`` CNN block), reproduced here clean-room from a specification;
parity is checked against fixtures produced by the official code.

Dataflow of one module (``C`` = ``dim``, ``m`` = number of kernel sizes, ``cp = C // m``, ``G`` = ``groups``)::

    x (B, C, H, W)
      -> reduce: 1x1 conv C->cp, BN, GELU                              x_r (B, cp, H, W)
      -> m depthwise convs k_s x k_s on the whole x_r (stride s)       concat (B, m*cp, H', W'), branch-major
      -> BN, GELU
      -> routing: per-pixel sigmoid gates from x_r (1x1 conv cp -> m*G, same stride)
         combine m channels into one with gates shared by the cp/G channels of a gate group
                                                                        (B, cp, H', W')
      -> recover: 1x1 conv cp->out, BN [, GELU in the CNN form] -> squeeze-excitation

Routing, side by side (``a`` = GELU(BN(concat)) with concat channel ``s*cp + c`` = branch s, channel c;
``gate[j*G + g]``; routed channel ``q`` lies in gate group ``g = q // (cp/G)``)::

    routing="official":    routed[q] = sum_j gate[j*G + g] * a[q*m + j]
                           (what the released code computes: its channel shuffle followed by its reshape
                           sums the m ADJACENT concatenated channels, which nearly always come from the same
                           kernel size; only the following 1x1 mixes scales)
    routing="cross_scale": routed[q] = sum_j gate[j*G + g] * a[j*cp + q]
                           (the same reduced channel q taken from every kernel size, as the name suggests)

Both have exactly the same parameters and cost; only the channel pairing differs. Our BN after the
depthwise convs is stored in concat (branch-major) order; the official one is stored in its shuffled order, and
``convert_scsc_official`` permutes it on load. Neither routing needs a permute or a contiguous copy: the sum is a
broadcast multiply-and-reduce over a view.

``reparameterize()`` folds every BatchNorm into the conv before it (the inference form); outputs stay identical
to within float rounding.

Forms: ``forward_reference`` is the plain form (the one graph captures and ``reference_forms()`` run). When
``msconv.layers.forms`` allows in-place forms (autograd off, no capture), ``forward`` runs ``_forward_inplace``: the
same operations in the same order, but the GELUs, the sigmoid, the SE product and the residual add are applied in
place on tensors the module just created, the routing as m multiply-accumulates into one output, and on CPU some
1x1 convs as GEMMs. On CPU this matters more than the arithmetic suggests: every fresh activation-sized tensor is
a new allocation whose pages are faulted in (and zeroed) by the OS, which costs about as much as the GELU itself.
With autograd on (a training step), where ``msconv.layers.forms`` allows the ``lean_recompute`` kind (fp32, no
autocast, no capture, a contiguous input) and the module's BatchNorms are plain and in training mode, ``forward`` may
run the module as one autograd function (``_LeanCrossScale``) that saves the input of each GEMM and convolution and
recomputes the BatchNorm, GELU, routing and SE passes in backward: less than half of what autograd saves, and fewer
passes over memory. Whether it does is the ``scsc_train`` tuned operation's choice: the autotuner times it against
the plain training form on a copy of the module, per structure and input shape, on the running machine
(``forms.tuned_training``). Tests check the forms agree.
"""

import contextlib
import copy as copy_module
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, SEModule

from ._fold import channels_last_only, fold_bn_into_conv
from .fast_ops import (
    bn_recompute,
    bn_train_backward,
    bn_train_forward,
    conv_gelu,
    depthwise_grad_input,
    depthwise_grad_weight_per_image,
    is_pointwise,
    linear_1x1,
    pointwise_conv,
    pointwise_conv_train,
    pointwise_gemm,
    pointwise_gemm_backward,
    spatial_mean,
)
from .forms import autocast_dtype, tunable, tuned, tuned_training, use_fast_form

__all__ = [
    'SpatialCrossScaleConv',
    'CrossScaleBottleneck',
    'convert_scsc_official',
    'STAGE_KERNEL_SIZES',
]


ROUTINGS = ('official', 'cross_scale')

#: Kernel sizes of the four stages of the official SCSC networks (Swin+SCSC and CBTNet alike).
STAGE_KERNEL_SIZES = ((3, 9, 13), (3, 7, 11), (3, 5, 7), (3, 5))


def _check_kernel_sizes(kernel_sizes: Sequence[int]) -> Tuple[int, ...]:
    ks = tuple(kernel_sizes) if isinstance(kernel_sizes, (list, tuple)) else None
    if not ks or not all(isinstance(k, int) and k > 0 and k % 2 == 1 for k in ks):
        raise ValueError(f"kernel_sizes must be a non-empty sequence of odd positive ints, got {kernel_sizes!r}")
    return ks


class SpatialCrossScaleConv(nn.Module):
    """Spatial cross-scale convolution, the token-mixer form (NCHW in and out, no residual of its own).

    Args:
        dim: input channels ``C``.
        kernel_sizes: one depthwise kernel size per branch (odd); ``m = len(kernel_sizes)``.
        groups: gate groups ``G``: each gate map is shared by ``cp / G`` routed channels (official ``mg``).
        se_reduction: squeeze-excitation reduction; the hidden width is ``max(out_dim // se_reduction, 32)``.
        routing: ``"official"`` (the released code) or ``"cross_scale"`` (see the module docstring).
        out_dim: output channels (``dim`` when None).
        stride: 1, or 2 to downsample inside the depthwise and routing convs (CNN form).
        out_act: GELU after the recovery BN (the CNN form has it, the Swin token mixer does not).
    """

    def __init__(
        self,
        dim: int,
        kernel_sizes: Sequence[int] = (3, 7, 11),
        groups: int = 4,
        se_reduction: int = 16,
        routing: str = 'official',
        out_dim: int | None = None,
        stride: int = 1,
        out_act: bool = False,
    ) -> None:
        super().__init__()
        ks = _check_kernel_sizes(kernel_sizes)
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        m = len(ks)
        cp = dim // m
        if not isinstance(groups, int) or groups <= 0 or cp == 0 or cp % groups != 0:
            raise ValueError(
                f"groups must divide the reduced width dim // len(kernel_sizes) = {dim} // {m} = {cp}, got {groups!r}"
            )
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        if not isinstance(se_reduction, int) or se_reduction <= 0:
            raise ValueError(f"se_reduction must be a positive int, got {se_reduction!r}")
        out_dim = dim if out_dim is None else out_dim
        self.dim, self.out_dim, self.kernel_sizes, self.groups = dim, out_dim, ks, groups
        self.num_scales, self.reduced_dim, self.routing, self.stride = m, cp, routing, stride

        self.reduce = nn.Conv2d(dim, cp, 1, bias=False)
        self.reduce_bn = nn.BatchNorm2d(cp)
        self.dw = nn.ModuleList(
            [nn.Conv2d(cp, cp, k, stride=stride, padding=k // 2, groups=cp, bias=False) for k in ks]
        )
        self.dw_bn = nn.BatchNorm2d(m * cp)  # concat (branch-major) channel order
        self.router = nn.Conv2d(cp, m * groups, 1, stride=stride, bias=False)
        self.recover = nn.Conv2d(cp, out_dim, 1, bias=False)
        self.recover_bn = nn.BatchNorm2d(out_dim)
        self.act = nn.GELU()
        self.out_act = nn.GELU() if out_act else nn.Identity()
        self.se = SEModule(out_dim, rd_channels=max(out_dim // se_reduction, 32), bias=False)

    def route(self, feats: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Gated sum of the m branch features: (B, m*cp, H, W) x (B, m*G, H, W) -> (B, cp, H, W)."""
        m, G, cp = self.num_scales, self.groups, self.reduced_dim
        if self.routing == 'official':
            f = feats.unflatten(1, (G, cp // G, m))  # channel q*m + j = (g, r, j)
            # (B, G, 1, m, H, W), gate channel j*G + g; made contiguous (m*G channels: tiny) so that the product,
            # the sum and everything downstream stay in plain contiguous NCHW
            g = gate.unflatten(1, (m, G)).transpose(1, 2).contiguous().unsqueeze(2)
            out = (f * g).sum(3)
        else:
            f = feats.unflatten(1, (m, G, cp // G))  # channel j*cp + q = (j, g, r)
            g = gate.unflatten(1, (m, G)).unsqueeze(3)
            out = (f * g).sum(1)
        return out.flatten(1, 2)

    @torch.jit.unused
    def route_fast(self, feats: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``route`` as m strided multiply-accumulates into one output: no (B, m*cp, H, W) product tensor is
        materialised (about 2x faster than ``route`` on CPU). Same sum, accumulated in branch order."""
        B, _, H, W = feats.shape
        return self._routed(feats, gate, tokens=False).view(B, self.reduced_dim, H, W)

    @torch.jit.unused
    def _routed(self, feats: torch.Tensor, gate: torch.Tensor, tokens: bool) -> torch.Tensor:
        """The gated sum of ``route_fast`` on NCHW maps or, with ``tokens``, on (B, H, W, C) token views (the
        routed channels come out as (B, H, W, G, cp/G)). In bf16/fp16, where the gate allows the ``scsc_routing``
        operation's ``fp32_tail`` form and it measures faster: the gates widened to fp32 (m*G values per pixel),
        the m multiply-accumulates in fp32 and the sum rounded once; ATen's bf16 loops over these strided views round
        after every op, element by element, and ran 2x-3x slower than fp32 on an AMD EPYC with AVX512-BF16."""
        if not tunable('scsc_routing', feats):
            return self._routed_form(feats, gate, tokens, fp32=False)
        m, G, cp = self.num_scales, self.groups, self.reduced_dim
        return tuned(
            'scsc_routing',
            feats,
            {
                'plain': lambda: self._routed_form(feats, gate, tokens, fp32=False),
                'fp32_tail': lambda: self._routed_form(feats, gate, tokens, fp32=True),
            },
            extra=f'{m}x{cp}/g{G}/{self.routing}',
        )

    def _routed_form(self, feats: torch.Tensor, gate: torch.Tensor, tokens: bool, fp32: bool) -> torch.Tensor:
        m, G, cp = self.num_scales, self.groups, self.reduced_dim
        if fp32:
            gate = gate.float()
        if tokens:
            B, Ho, Wo = feats.shape[0], feats.shape[1], feats.shape[2]
            if self.routing == 'official':
                f = feats.view(B, Ho, Wo, G, cp // G, m)  # branch j of routed channel (g, r) at f[..., g, r, j]
                g = gate.view(B, Ho, Wo, m, G, 1).transpose(3, 4)  # (B, H', W', G, m, 1): g[..., g, j, :]
                fj, gj = (lambda j: f[..., j]), (lambda j: g[:, :, :, :, j])
            else:
                f = feats.view(B, Ho, Wo, m, G, cp // G)
                g = gate.view(B, Ho, Wo, m, G, 1)
                fj, gj = (lambda j: f[:, :, :, j]), (lambda j: g[:, :, :, j])
        else:
            B, H, W = feats.shape[0], feats.shape[2], feats.shape[3]
            if self.routing == 'official':
                f = feats.view(B, G, cp // G, m, H, W)  # branch j of routed channel (g, r) at f[:, g, r, j]
                g = gate.view(B, m, G, H, W).transpose(1, 2).contiguous().view(B, G, 1, m, H, W)
                fj, gj = (lambda j: f[:, :, :, j]), (lambda j: g[:, :, :, j])
            else:
                f = feats.view(B, m, G, cp // G, H, W)
                g = gate.view(B, m, G, 1, H, W)
                fj, gj = (lambda j: f[:, j]), (lambda j: g[:, j])
        out = fj(0) * gj(0)  # fp32 when the gates are (a bf16 x fp32 product)
        for j in range(1, m):
            out.addcmul_(fj(j), gj(j))
        return out.to(feats.dtype) if fp32 else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fast_form('inplace', x):
            return self._forward_inplace(x, None)
        if not torch.jit.is_scripting() and self._train_op(x) is not None:
            return self._forward_tuned_train(x)
        if torch.is_grad_enabled() and tunable('pointwise_conv_train', x):
            return self._forward_train(x)
        return self.forward_reference(x)

    @torch.jit.unused
    def _forward_tuned_train(self, x: torch.Tensor) -> torch.Tensor:
        """The module in a training step: its plain training form (``_forward_train``) or the lean autograd function
        (``_forward_lean``), whichever ``forms.tuned_training`` measures faster (forward + backward) for this module's
        structure and input shape on the running machine (operation ``scsc_train``, or ``scsc_train_amp`` under bf16
        autocast)."""
        return tuned_training(_train_op_name() or 'scsc_train', (x,), _SCSC_TRAIN_FORMS, module=self)

    @torch.jit.unused
    def _train_op(self, x: torch.Tensor) -> Optional[str]:
        """The tuned training operation for this module's step on ``x`` (``scsc_train`` in fp32, ``scsc_train_amp``
        under bf16 autocast), or None where autograd is off, the gate allows no lean form or the module's own
        conditions (``_lean_ok``) fail."""
        if not torch.is_grad_enabled():
            return None
        op = _train_op_name()  # the gate is asked before anything reads x (under a capture x is a proxy)
        return op if op is not None and tunable(op, x) and self._lean_ok() else None

    @torch.jit.unused
    def _forward_lean(self, x: torch.Tensor) -> torch.Tensor:
        """``forward_reference`` as one lean autograd function (``_LeanCrossScale``)."""
        return _LeanCrossScale.apply(self, autocast_dtype(x), x, *self._lean_params())

    @torch.jit.unused
    def _lean_ok(self) -> bool:
        """The module's own conditions for the lean training form: its three BatchNorms plain, in training mode and
        tracking statistics; bias-free 1x1 convs and a timm SE without BN or max-pool."""
        bns = (self.reduce_bn, self.dw_bn, self.recover_bn)
        se = self.se
        return (
            all(type(bn) is nn.BatchNorm2d and bn.training and bn.track_running_stats and bn.affine for bn in bns)
            and all(c.bias is None for c in (self.reduce, self.router, self.recover, *self.dw))
            and type(self.out_act) in (nn.GELU, nn.Identity)
            and getattr(self.out_act, 'approximate', 'none') == 'none'
            and self.act.approximate == 'none'
            and isinstance(se, SEModule)
            and isinstance(se.bn, nn.Identity)
            and not se.add_maxpool
        )

    @torch.jit.unused
    def _lean_params(self) -> List[nn.Parameter]:
        ps = [self.reduce.weight, self.reduce_bn.weight, self.reduce_bn.bias]
        ps += [c.weight for c in self.dw]
        ps += [self.dw_bn.weight, self.dw_bn.bias, self.router.weight, self.recover.weight]
        ps += [self.recover_bn.weight, self.recover_bn.bias]
        return ps + list(self.se.parameters())

    @torch.jit.unused
    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
        """``_scsc_reference`` with the 1x1 convs (reduce, router, recover) through
        ``fast_ops.pointwise_conv_train``: the convolution or batched GEMMs, whichever trains faster here."""
        x_r = self.act(self.reduce_bn(pointwise_conv_train(self.reduce, x)))
        feats = self.act(self.dw_bn(torch.cat([conv(x_r) for conv in self.dw], dim=1)))
        gate = torch.sigmoid(pointwise_conv_train(self.router, x_r))
        y = self.out_act(self.recover_bn(pointwise_conv_train(self.recover, self.route(feats, gate))))
        return self.se(y)

    @torch.jit.unused
    def _se_inplace(self, y: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        """timm's SEModule forward with the final product in place on ``y`` (a tensor this module created); with
        ``shortcut``, ``y * gate + shortcut`` in the same pass (one ``addcmul``, written over ``y``)."""
        se = self.se
        if not isinstance(se.bn, nn.Identity) or se.add_maxpool:
            return self.se(y) if shortcut is None else self.se(y).add_(shortcut)
        gate = se.gate(se.fc2(se.act(se.bn(se.fc1(spatial_mean(y))))))
        if shortcut is None:
            return y.mul_(gate)
        return torch.addcmul(shortcut, y, gate, out=y)

    @torch.jit.unused
    def _forward_inplace(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        """``forward_reference`` with in-place activations; only valid when autograd is not recording. A
        channels-last input to the reparameterized module runs the token form (``_forward_tokens``) and gives a
        channels-last output. With ``shortcut`` (the residual form): the output plus ``shortcut``, added in the SE's
        product pass."""
        if channels_last_only(x) and isinstance(self.reduce_bn, nn.Identity):  # reparameterized: no BN left
            return self._se_inplace(self._forward_tokens(x), shortcut)
        if isinstance(self.reduce_bn, nn.Identity):  # reparameterized: each GELU follows its conv directly
            x_r = conv_gelu(self.reduce, x, lambda: torch.ops.aten.gelu_(pointwise_conv(self.reduce, x)))
            feats = torch.cat([conv_gelu(conv, x_r) for conv in self.dw], dim=1)
        else:
            x_r = torch.ops.aten.gelu_(self.reduce_bn(pointwise_conv(self.reduce, x)))
            feats = torch.ops.aten.gelu_(self.dw_bn(torch.cat([conv(x_r) for conv in self.dw], dim=1)))
        gate = torch.sigmoid_(pointwise_conv(self.router, x_r))
        routed = self.route_fast(feats, gate)
        if isinstance(self.recover_bn, nn.Identity) and not isinstance(self.out_act, nn.Identity):
            y = conv_gelu(self.recover, routed, lambda: torch.ops.aten.gelu_(pointwise_conv(self.recover, routed)))
        else:
            y = self.recover_bn(pointwise_conv(self.recover, routed))
            if not isinstance(self.out_act, nn.Identity):
                y = torch.ops.aten.gelu_(y)
        return self._se_inplace(y, shortcut)

    @torch.jit.unused
    def _forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``_forward_inplace`` up to the SE for a channels-last ``x``, computed on its (B, H, W, C) token view (no
        copy): the 1x1 convs are single GEMMs over all B*H*W tokens (``msconv.layers.fast_ops.linear``: BLAS or
        oneDNN, measured), the depthwise convs run on oneDNN's channels-last kernels. The routing either reads the
        concatenated branches (``_routed``), or where the ``scsc_tokens`` operation allows and measures it faster,
        each branch's output where its conv wrote it, as runs of adjacent channels (``_token_route``: ``runs`` with one
        gate per token, ``expanded`` with the gates copied out per channel). The output is channels-last."""
        m, cp = self.num_scales, self.reduced_dim
        concat = lambda: self._tokens_form(x, 'concat')  # noqa: E731
        if not tunable('scsc_tokens', x):
            return concat()
        ran: List[str] = []

        def form(name: str) -> torch.Tensor:
            ran.append(name)
            return self._tokens_form(x, name)

        out = tuned(
            'scsc_tokens',
            x,
            {'concat': lambda: form('concat'), 'runs': lambda: form('runs'), 'expanded': lambda: form('expanded')},
            extra=f'{m}x{cp}/g{self.groups}/{self.routing}/s{self.stride}/o{self.out_dim}/{type(self.out_act).__name__}',
        )
        self._drop_unused_token_convs(ran)
        return out

    @torch.jit.unused
    def _drop_unused_token_convs(self, ran: List[str]) -> None:
        """Drop the reordered conv copies of ``_token_convs`` (the module's reduce, branch and router weights once
        more) once a call ran the ``concat`` form alone (the autotuner's cached choice, not a measurement) and no call
        has run a reordered form alone: kept only where a ``runs`` or ``expanded`` choice uses them (for example
        when another input size of the same module chose one)."""
        if len(ran) != 1:
            return  # a measurement: every form ran
        if ran[0] != 'concat':
            self.__dict__['_token_convs_used'] = True
        elif not self.__dict__.get('_token_convs_used', False):
            self.__dict__.pop('_token_cache', None)

    @torch.jit.unused
    def _tokens_form(self, x: torch.Tensor, form: str) -> torch.Tensor:
        B, s = x.shape[0], self.stride
        reduce, dws, router = (self.reduce, list(self.dw), self.router) if form == 'concat' else self._token_convs()
        xt = x.permute(0, 2, 3, 1)  # (B, H, W, C), contiguous
        x_r = conv_gelu(reduce, x, lambda: torch.ops.aten.gelu_(linear_1x1(reduce, xt)).permute(0, 3, 1, 2))
        x_r_t = x_r.permute(0, 2, 3, 1)  # (B, H, W, cp), contiguous
        branches = [conv_gelu(conv, x_r).permute(0, 2, 3, 1) for conv in dws]  # each (B, H', W', cp), contiguous
        gate = torch.sigmoid_(linear_1x1(router, x_r_t[:, ::s, ::s] if s > 1 else x_r_t))  # (B, H', W', m*G)
        Ho, Wo = gate.shape[1], gate.shape[2]
        if form == 'concat':
            routed_t = self._routed(torch.cat(branches, dim=3), gate, tokens=True).view(B, Ho, Wo, -1)
        else:
            routed_t = self._token_route(branches, gate, expanded=form == 'expanded')  # (B, H', W', cp)
        if isinstance(self.out_act, nn.Identity):
            return linear_1x1(self.recover, routed_t).permute(0, 3, 1, 2)  # (B, out, H', W'), channels-last
        return conv_gelu(
            self.recover,
            routed_t.permute(0, 3, 1, 2),
            lambda: torch.ops.aten.gelu_(linear_1x1(self.recover, routed_t)).permute(0, 3, 1, 2),
        )

    @torch.jit.unused
    def _token_convs(self) -> Tuple[nn.Conv2d, List[nn.Conv2d], nn.Conv2d]:
        """The reduce, branch and router convs of the token form's ``runs`` and ``expanded`` forms. For the
        ``official`` routing (m > 1): copies whose reduced channels are reordered by their remainder modulo m
        (``_official_order``), so that every operand of the routing is a run of adjacent channels (``_route_runs``):
        the reduce conv's output rows, the branch kernels and the router's input columns renumbered, the same sums.
        ATen vectorises a multiply-add over adjacent channels; over every m-th channel (the official pairing read in
        place) it runs element by element, slowest in bf16. The copies are rebuilt when a weight changes (its storage
        or version); the module's own convs are untouched."""
        if self.routing != 'official' or self.num_scales == 1:
            return self.reduce, list(self.dw), self.router
        ws = [self.reduce.weight, self.reduce.bias, self.router.weight]
        ws += [t for c in self.dw for t in (c.weight, c.bias)]
        key = tuple((t.data_ptr(), _version(t), t.dtype, t.device) if t is not None else None for t in ws)
        cached = self.__dict__.get('_token_cache')
        if cached is not None and cached[0] == key:
            return cached[1]
        perm = torch.tensor(self._official_order()[0], device=self.reduce.weight.device)

        def copy(conv: nn.Conv2d, out_perm: bool) -> nn.Conv2d:
            new = copy_module.copy(conv)  # the conv's settings; its parameters replaced (not registered on self)
            new._parameters = dict(conv._parameters)
            with torch.no_grad():
                w = conv.weight[perm] if out_perm else conv.weight[:, perm]
                new._parameters['weight'] = nn.Parameter(w.contiguous(), requires_grad=False)
                if conv.bias is not None and out_perm:
                    new._parameters['bias'] = nn.Parameter(conv.bias[perm].contiguous(), requires_grad=False)
            return new

        convs = (copy(self.reduce, True), [copy(c, True) for c in self.dw], copy(self.router, False))
        self.__dict__['_token_cache'] = (key, convs)
        return convs

    @torch.jit.unused
    def _official_order(self) -> Tuple[List[int], List[int]]:
        """The reduced channels sorted by ``(c % m, c // m)``: the order (old channel at each new place) and the new
        place of each old channel."""
        m, cp = self.num_scales, self.reduced_dim
        order = [c for r in range(m) for c in range(r, cp, m)]
        place = [0] * cp
        for p, c in enumerate(order):
            place[c] = p
        return order, place

    @torch.jit.unused
    def _route_runs(self, split_groups: bool) -> List[Tuple[int, int, int, int, int, int]]:
        """The products of ``_token_route``, in order: ``(j, first routed channel, length, branch, first channel in the
        branch (``_token_convs``' order), gate channel or -1)``; each routed channel meets its j = 0 product first and
        then j = 1, ..., m - 1, as in ``route_fast``. ``official``: routed q takes branch channel ``t = q*m + j`` of
        the concatenation (branch ``t // cp``, channel ``t % cp``), so for one j and one branch the routed channels
        form a range whose branch channels are adjacent in ``_official_order``. ``cross_scale``: branch j, channel q.
        With ``split_groups``, runs are cut where the gate group (cp/G channels) changes and carry their gate
        channel."""
        m, G, cp = self.num_scales, self.groups, self.reduced_dim
        gw = cp // G
        runs = []
        place = self._official_order()[1] if self.routing == 'official' else list(range(cp))
        for j in range(m):
            for s in range(m if self.routing == 'official' else 1):
                if self.routing == 'official':
                    q0, q1 = max(0, -((j - s * cp) // m)), min(cp, ((s + 1) * cp - 1 - j) // m + 1)
                    b = s
                else:
                    q0, q1, b = 0, cp, j
                if q1 <= q0:
                    continue
                cuts = [q0] + [g * gw for g in range(G) if q0 < g * gw < q1] + [q1] if split_groups else [q0, q1]
                for a, e in zip(cuts[:-1], cuts[1:]):
                    c = a * m + j - s * cp if self.routing == 'official' else a
                    runs.append((j, a, e - a, b, place[c], j * G + a // gw if split_groups else -1))
        return runs

    @torch.jit.unused
    def _token_route(self, branches: List[torch.Tensor], gate: torch.Tensor, expanded: bool = False) -> torch.Tensor:
        """The gated sum of the branch outputs (each (B, H', W', cp) tokens, as ``_token_convs`` ordered them) with
        the gates (B, H', W', m*G) into a fresh (B, H', W', cp): the same products and sums as ``route_fast``, in
        the same order, over runs of adjacent channels (``_route_runs``), each with one gate per token. With
        ``expanded``: the gates first copied out per routed channel (B, H', W', m, cp), so that runs need not stop
        where the gate group changes and every operand is a run of adjacent values: ATen's bf16 loops with a
        broadcast gate vectorise only runs that are a multiple of their vector width (32) and ran up to 4x slower
        otherwise (AMD EPYC, 1 thread); the copy is one pass over m*cp values per token."""
        m, G, cp = self.num_scales, self.groups, self.reduced_dim
        B, Ho, Wo = gate.shape[0], gate.shape[1], gate.shape[2]
        out = branches[0].new_empty(B, Ho, Wo, cp)
        if expanded:
            gx = gate.view(B, Ho, Wo, m, G, 1).expand(B, Ho, Wo, m, G, cp // G).reshape(B, Ho, Wo, m, cp)
        for j, a, n, b, c, gc in self._route_runs(split_groups=not expanded):
            o, f = out[..., a : a + n], branches[b][..., c : c + n]
            g = gx[..., j, a : a + n] if expanded else gate[..., gc : gc + 1]
            if j == 0:
                torch.mul(f, g, out=o)
            else:
                o.addcmul_(f, g)
        return out

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return self._scsc_reference(x)

    def _scsc_reference(self, x: torch.Tensor) -> torch.Tensor:
        x_r = self.act(self.reduce_bn(self.reduce(x)))
        branches: List[torch.Tensor] = []
        for conv in self.dw:
            branches.append(conv(x_r))
        feats = self.act(self.dw_bn(torch.cat(branches, dim=1)))
        gate = torch.sigmoid(self.router(x_r))
        y = self.out_act(self.recover_bn(self.recover(self.route(feats, gate))))
        return self.se(y)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the three BatchNorms into the convs before them (inference form, in place)."""
        if isinstance(self.reduce_bn, nn.Identity):
            return
        self.reduce = fold_bn_into_conv(self.reduce, self.reduce_bn)
        cp = self.reduced_dim
        folded = []
        for s, conv in enumerate(self.dw):
            bn = nn.BatchNorm2d(cp, eps=self.dw_bn.eps).to(self.dw_bn.weight)
            for name in ('weight', 'bias', 'running_mean', 'running_var'):
                getattr(bn, name).copy_(getattr(self.dw_bn, name)[s * cp : (s + 1) * cp])
            bn.eval()
            folded.append(fold_bn_into_conv(conv, bn))
        self.dw = nn.ModuleList(folded)
        self.recover = fold_bn_into_conv(self.recover, self.recover_bn)
        self.reduce_bn, self.dw_bn, self.recover_bn = nn.Identity(), nn.Identity(), nn.Identity()


_BRANCH_FORMAT = torch.channels_last
"""The memory layout the lean form runs the depthwise branches in: oneDNN's channels-last depthwise kernels (forward
and backward) ran 2x-2.6x faster than its NCHW ones at SCSC's shapes, layout copies included (AMD EPYC, 1 thread)."""


def _branches(mod: 'SpatialCrossScaleConv', x_r: torch.Tensor) -> torch.Tensor:
    """The m depthwise branches on ``x_r``, concatenated along channels into a contiguous NCHW tensor (each branch
    run in ``_BRANCH_FORMAT`` and written into its slice: one layout pass)."""
    cp = mod.reduced_dim
    x_rb = x_r.contiguous(memory_format=_BRANCH_FORMAT)
    outs = [_branch_conv(conv, x_rb) for conv in mod.dw]
    cat = x_r.new_empty(x_r.shape[0], len(outs) * cp, *outs[0].shape[2:])
    for j, o in enumerate(outs):
        cat[:, j * cp : (j + 1) * cp].copy_(o)
    return cat


def _branch_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a depthwise branch (no bias) with autograd off, its kernel cast to ``x``'s dtype as autocast
    casts it; for stride 1, where the ``scsc_branch_conv`` operation measures it faster: the same correlation as the
    input gradient of a correlation with the flipped kernel (oneDNN's backward-data kernel ran the 13x13 and 11x11
    branches about 2x faster than its forward kernel, AMD EPYC, 1 thread)."""
    w = conv.weight.to(x.dtype)

    def forward() -> torch.Tensor:
        return F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)

    p = conv.padding
    k = w.shape[2:]
    if (
        tuple(conv.stride) != (1, 1)
        or tuple(conv.dilation) != (1, 1)
        or p[0] > k[0] - 1
        or p[1] > k[1] - 1
        or not tunable('scsc_branch_conv', x)
    ):
        return forward()

    def transposed() -> torch.Tensor:
        flip_pad = [k[0] - 1 - p[0], k[1] - 1 - p[1]]
        return torch.ops.aten.convolution_backward(
            x, x, w.flip(2, 3), None, [1, 1], flip_pad, [1, 1], False, [0, 0], conv.groups, [True, False, False]
        )[0]

    return tuned('scsc_branch_conv', x, {'conv': forward, 'transposed': transposed}, extra=f'{tuple(k)}/p{tuple(p)}')


def _dw_grad_weight(g: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Kernel gradient of the depthwise ``conv`` (no bias, dilation 1) at input ``x`` for the output gradient ``g``
    (autograd off): the convolution's backward, or image by image the depthwise correlation of the padded input with
    the output gradient as its kernel (dilated by the stride), summed in fp32, whichever the ``scsc_dw_grad_weight``
    tuned operation measures faster for this shape. oneDNN's backward-weights kernel for channels-last depthwise
    convolutions ran the large kernels 4x-6x slower than its forward kernels on the same sums (9x9 and 13x13 at 56x56,
    AMD EPYC, 1 thread)."""
    w = conv.weight

    def backward() -> torch.Tensor:
        return torch.ops.aten.convolution_backward(
            g, x, w.to(x.dtype), None, conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups,
            [False, True, False],
        )[1]  # fmt: skip

    if not tunable('scsc_dw_grad_weight', g) or tuple(conv.dilation) != (1, 1) or x.shape[0] < 2:
        return backward()
    return tuned(
        'scsc_dw_grad_weight',
        g,
        {
            'backward': backward,
            'per_image': lambda: (
                depthwise_grad_weight_per_image(g, x, w.shape[2:], conv.stride, conv.padding).view(w.shape).to(x.dtype)
            ),
        },
        extra=f'{tuple(w.shape[2:])}/s{tuple(conv.stride)}/p{tuple(conv.padding)}',
    )


def _route_backward(
    mod: 'SpatialCrossScaleConv', g_routed: torch.Tensor, feats: torch.Tensor, gate: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``mod.route(feats, gate)`` (branch features, gates) for the routed gradient ``g_routed``: the
    products autograd forms for the broadcast multiply and the sum, without recording them."""
    m, G, cp = mod.num_scales, mod.groups, mod.reduced_dim
    B, H, W = feats.shape[0], feats.shape[2], feats.shape[3]
    if mod.routing == 'official':
        f = feats.view(B, G, cp // G, m, H, W)
        gv = gate.view(B, m, G, H, W).transpose(1, 2).unsqueeze(2)  # (B, G, 1, m, H, W)
        gr = g_routed.view(B, G, cp // G, 1, H, W)
        g_gate = (gr * f).sum(2).transpose(1, 2)  # (B, m, G, H, W)
    else:
        f = feats.view(B, m, G, cp // G, H, W)
        gv = gate.view(B, m, G, 1, H, W)
        gr = g_routed.view(B, 1, G, cp // G, H, W)
        g_gate = (gr * f).sum(3)
    return (gr * gv).view(feats.shape), g_gate.reshape(gate.shape)


def _version(t: torch.Tensor) -> int:
    """``t._version``; -1 for an inference tensor (made under ``torch.inference_mode``), which has no version counter
    (it can only be written in place inside ``inference_mode``, where nothing tracks it)."""
    return -1 if t.is_inference() else t._version


def _train_op_name() -> Optional[str]:
    """The tuned training operation of an SCSC module in this autocast state (the lean forms are CPU forms):
    ``scsc_train`` without CPU autocast, ``scsc_train_amp`` under bf16 CPU autocast, None under another dtype."""
    if not torch.is_autocast_enabled('cpu'):
        return 'scsc_train'
    return 'scsc_train_amp' if torch.get_autocast_dtype('cpu') == torch.bfloat16 else None


def _gemm_amp(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """:func:`pointwise_gemm` in ``x``'s reduced dtype with the fp32 ``weight`` cast to it (as autocast runs a
    convolution), batched: oneDNN's bf16 GEMM writes through a copy when given ``out=``."""
    B, C, H, W = x.shape
    return torch.matmul(weight.reshape(weight.shape[0], C).to(x.dtype), x.reshape(B, C, H * W)).view(B, -1, H, W)


def _gemm_backward_amp(
    grad: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, input_grad: bool = True
) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Gradients of :func:`_gemm_amp` (input, weight): the input gradient in ``x``'s dtype, one batched GEMM; the
    weight gradient as one GEMM over every image's tokens (the channel-major copies of ``grad`` and ``x``), rounded
    once to that dtype as the convolution's backward under autocast rounds it, then fp32 (the weight's dtype)."""
    B, C, H, W = x.shape
    n_out = grad.shape[1]
    g = grad.reshape(B, n_out, H * W)
    xs = x.reshape(B, C, H * W)
    gw = torch.mm(g.transpose(0, 1).reshape(n_out, B * H * W), xs.transpose(0, 1).reshape(C, B * H * W).t())
    gx = torch.matmul(weight.reshape(n_out, C).to(x.dtype).t(), g).view(B, C, H, W) if input_grad else None
    return gx, gw.to(weight.dtype).view(weight.shape)


def _lean_gemm(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """:func:`pointwise_gemm` (fp32, autograd off) image by image, as one batched GEMM or as the convolution,
    whichever the ``scsc_lean_gemm`` tuned operation measures faster for this shape (on 7x7-28x28 maps and 2 threads
    the per-image GEMMs are many small calls: fewer, larger calls ran the lean function's GEMMs faster, AMD EPYC)."""
    if not tunable('scsc_lean_gemm', x):
        return pointwise_gemm(weight, x)
    B, C, H, W = x.shape

    def batched() -> torch.Tensor:
        w = weight.reshape(weight.shape[0], C)
        return torch.bmm(w.expand(B, -1, -1), x.reshape(B, C, H * W)).view(B, -1, H, W)

    return tuned(
        'scsc_lean_gemm',
        x,
        {'per_image': lambda: pointwise_gemm(weight, x), 'batched': batched, 'conv': lambda: F.conv2d(x, weight)},
        extra=f'{C}->{weight.shape[0]}',
    )


def _lean_gemm_backward(
    grad: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, input_grad: bool = True
) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Gradients (input, weight) of :func:`_lean_gemm`: :func:`pointwise_gemm_backward` (image by image), batched
    GEMMs (the weight gradient the sum of the per-image products), batched input gradients and the weight gradient
    as one GEMM over every token of channel-major copies, or the convolution's backward, whichever
    ``scsc_lean_gemm_backward`` measures faster."""
    if not tunable('scsc_lean_gemm_backward', grad):
        return pointwise_gemm_backward(grad, weight, x, input_grad)
    B, C, H, W = x.shape
    n_out = grad.shape[1]
    g = grad.reshape(B, n_out, H * W)
    xs = x.reshape(B, C, H * W)
    w = weight.reshape(n_out, C)

    def input_gradient() -> Optional[torch.Tensor]:
        return torch.bmm(w.t().expand(B, -1, -1), g).view(B, C, H, W) if input_grad else None

    def batched() -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        return input_gradient(), torch.bmm(g, xs.transpose(1, 2)).sum(0).view(weight.shape)

    def tokens() -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        gw = torch.mm(g.transpose(0, 1).reshape(n_out, B * H * W), xs.transpose(0, 1).reshape(C, B * H * W).t())
        return input_gradient(), gw.view(weight.shape)

    def conv() -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [input_grad, True, False]
        )
        return gx, gw

    return tuned(
        'scsc_lean_gemm_backward',
        grad,
        {
            'per_image': lambda: pointwise_gemm_backward(grad, weight, x, input_grad),
            'batched': batched,
            'tokens': tokens,
            'conv': conv,
        },
        extra=f"{C}->{n_out}{'' if input_grad else '/w'}",
    )


class _LeanCrossScale(torch.autograd.Function):
    """``SpatialCrossScaleConv._scsc_reference`` (training mode) as one autograd function that saves for backward
    only the input, the reduce and recover 1x1 outputs (before their BNs), the concatenated branch outputs (before
    their BN), the gates and the BN batch statistics: about 3.3 activation maps of ``C`` channels where autograd keeps
    7.3 (every BN output, GELU output and product). Backward recomputes the BN affine maps, the GELUs and the routing
    (elementwise passes) and runs the same backward ops autograd would (``native_batch_norm_backward``,
    ``gelu_backward``, ``convolution_backward`` for the depthwise convs); the 1x1 convs are per-image GEMMs. The
    forward runs the same ops as the plain form, the BatchNorms moving their running statistics once.

    With a compute dtype ``cd`` (bf16 autocast): what the plain form computes under autocast, with autocast off
    inside: the input cast to ``cd`` (and its gradient back), every GEMM and convolution in ``cd`` with the fp32
    weights cast to it, the BatchNorms on ``cd`` activations with fp32 statistics and affines, the GELUs, gates,
    routing and products in ``cd``, the SE under autocast itself; the 1x1 convs as batched GEMMs, each weight
    gradient one GEMM over all tokens rounded once to ``cd`` (as the convolution's backward under autocast), then
    fp32. Everything saved is in ``cd``: half the bytes of the fp32 form."""

    @staticmethod
    def forward(ctx, mod: 'SpatialCrossScaleConv', cd: Optional[torch.dtype], x: torch.Tensor, *params):
        if cd is None:
            return _LeanCrossScale._forward(ctx, mod, None, x)
        with torch.autocast('cpu', enabled=False):
            return _LeanCrossScale._forward(ctx, mod, cd, x)

    @staticmethod
    def _forward(ctx, mod: 'SpatialCrossScaleConv', cd: Optional[torch.dtype], x: torch.Tensor) -> torch.Tensor:
        s = mod.stride
        xc = x if cd is None else x.to(cd)
        gemm = _lean_gemm if cd is None else _gemm_amp
        r = gemm(mod.reduce.weight, xc)  # (B, cp, H, W)
        a1, m1, i1 = bn_train_forward(mod.reduce_bn, r)
        x_r = torch.ops.aten.gelu_(a1)
        cat = _branches(mod, x_r)  # (B, m*cp, H', W')
        a2, m2, i2 = bn_train_forward(mod.dw_bn, cat)
        feats = torch.ops.aten.gelu_(a2)
        gate = torch.sigmoid_(gemm(mod.router.weight, x_r[:, :, ::s, ::s].contiguous() if s > 1 else x_r))
        routed = mod._routed_form(feats, gate, tokens=False, fp32=False).view(gate.shape[0], -1, *gate.shape[2:])
        del feats, a2
        z = gemm(mod.recover.weight, routed)  # (B, out, H', W')
        a3, m3, i3 = bn_train_forward(mod.recover_bn, z)
        y = torch.ops.aten.gelu_(a3) if isinstance(mod.out_act, nn.GELU) else a3
        se = mod.se
        pooled = y.mean((2, 3), keepdim=True)
        with _se_autocast(cd):
            out = y * se.gate(se.fc2(se.act(se.fc1(pooled))))
        ctx.mod, ctx.cd, ctx.x_dtype = mod, cd, x.dtype
        ctx.save_for_backward(xc, r, cat, gate, z, pooled, m1, i1, m2, i2, m3, i3)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.cd is None:
            return _LeanCrossScale._backward(ctx, grad)
        with torch.autocast('cpu', enabled=False):
            return _LeanCrossScale._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: torch.Tensor):
        mod, cd = ctx.mod, ctx.cd
        x, r, cat, gate, z, pooled, m1, i1, m2, i2, m3, i3 = ctx.saved_tensors
        s, cp, se = mod.stride, mod.reduced_dim, mod.se
        grad = grad.contiguous() if cd is None else grad.to(cd).contiguous()
        gelu_out = isinstance(mod.out_act, nn.GELU)
        se_params = [p for p in se.parameters() if p.requires_grad]
        if cd is None:
            gemm_backward = _lean_gemm_backward
            recompute = bn_recompute
        else:
            gemm_backward = _gemm_backward_amp
            recompute = lambda t, *a: bn_recompute(t, *a).to(cd)  # noqa: E731  (fp32 maths, as BN computes, rounded)
        # tail: recover BN (+ GELU), squeeze-excitation
        a3 = recompute(z, mod.recover_bn.weight, mod.recover_bn.bias, m3, i3)
        y = torch.nn.functional.gelu(a3) if gelu_out else a3
        with torch.enable_grad(), _se_autocast(cd):
            p = pooled.detach().requires_grad_()
            scale = se.gate(se.fc2(se.act(se.fc1(p))))
        g_scale = (grad * y).sum((2, 3), keepdim=True)
        g_pooled, *g_wanted = torch.autograd.grad(scale, [p, *se_params], g_scale)
        found = {id(q): g for q, g in zip(se_params, g_wanted)}
        g_se = [found.get(id(q)) for q in se.parameters()]
        del y
        g_y = grad * scale.detach()
        g_y += g_pooled / (g_y.shape[2] * g_y.shape[3])
        g_a3 = torch.ops.aten.gelu_backward(g_y, a3) if gelu_out else g_y
        del a3, g_y
        g_z, g_w3, g_b3 = bn_train_backward(g_a3, z, mod.recover_bn, m3, i3)
        del g_a3
        # routing: the branch features and the gated sum recomputed
        a2 = recompute(cat, mod.dw_bn.weight, mod.dw_bn.bias, m2, i2)
        feats = torch.nn.functional.gelu(a2)
        routed = mod._routed_form(feats, gate, tokens=False, fp32=False).view(gate.shape[0], -1, *gate.shape[2:])
        g_routed, g_wc = gemm_backward(g_z, mod.recover.weight, routed)
        del g_z, routed
        g_feats, g_gate = _route_backward(mod, g_routed, feats, gate)
        del feats, g_routed
        g_a2 = torch.ops.aten.gelu_backward(g_feats, a2)
        del a2, g_feats
        g_cat, g_w2, g_b2 = bn_train_backward(g_a2, cat, mod.dw_bn, m2, i2)
        del g_a2
        # branches and router back to the reduced input
        a1 = recompute(r, mod.reduce_bn.weight, mod.reduce_bn.bias, m1, i1)
        x_r = torch.nn.functional.gelu(a1)
        g_logit = torch.ops.aten.sigmoid_backward(g_gate, gate)
        if s > 1:
            g_xs, g_wg = gemm_backward(g_logit, mod.router.weight, x_r[:, :, ::s, ::s].contiguous())
            g_xr = torch.zeros_like(x_r)
            g_xr[:, :, ::s, ::s] = g_xs
        else:
            g_xr, g_wg = gemm_backward(g_logit, mod.router.weight, x_r)
        g_dw = []
        fmt = _BRANCH_FORMAT
        x_rb = x_r.contiguous(memory_format=fmt)
        for j, conv in enumerate(mod.dw):
            g_j = g_cat[:, j * cp : (j + 1) * cp].contiguous(memory_format=fmt)
            if tuple(conv.stride) == (1, 1) and tuple(conv.dilation) == (1, 1):
                g_in = depthwise_grad_input(g_j, x_rb, conv.weight.to(x_rb.dtype), tuple(conv.padding))
            else:
                g_in = torch.ops.aten.convolution_backward(
                    g_j, x_rb, conv.weight.to(x_rb.dtype), None, conv.stride, conv.padding, conv.dilation, False,
                    [0, 0], conv.groups, [True, False, False],
                )[0]  # fmt: skip
            g_xr += g_in
            g_w = _dw_grad_weight(g_j, x_rb, conv)
            g_dw.append(torch.empty_like(conv.weight).copy_(g_w))  # the weight's strides (DDP's gradient buckets)
        del g_cat, x_r, x_rb
        g_a1 = torch.ops.aten.gelu_backward(g_xr, a1)
        del a1, g_xr
        g_r, g_w1, g_b1 = bn_train_backward(g_a1, r, mod.reduce_bn, m1, i1)
        g_x, g_wr = gemm_backward(g_r, mod.reduce.weight, x, input_grad=ctx.needs_input_grad[2])
        if g_x is not None and g_x.dtype != ctx.x_dtype:
            g_x = g_x.to(ctx.x_dtype)
        return (None, None, g_x, g_wr, g_w1, g_b1, *g_dw, g_w2, g_b2, g_wg, g_wc, g_w3, g_b3, *g_se)


def _se_autocast(cd: Optional[torch.dtype]):
    """The squeeze-excitation of ``_LeanCrossScale`` under autocast to ``cd`` (as the plain form runs it), or as is."""
    return torch.autocast('cpu', dtype=cd) if cd is not None else contextlib.nullcontext()


#: The candidates of the ``scsc_train`` tuned operation for an SCSC module (called with the module, or with the
#: autotuner's copy of it, and the input).
_SCSC_TRAIN_FORMS = {
    'plain': lambda mod, x: mod._forward_train(x),
    'lean': lambda mod, x: mod._forward_lean(x),
}


class CrossScaleBottleneck(SpatialCrossScaleConv):
    """The CNN residual form used by ResNet+SCSC: SCSC (with GELU after the recovery BN) plus its own shortcut.

    ``y = scsc(x) + shortcut(x)`` with no activation after the add (as in the official block). The shortcut is the
    identity, or a 1x1 conv (with ``stride``) + BN projection when the stride or the width changes. The reduced
    width is ``in_dim // len(kernel_sizes)``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel_sizes: Sequence[int] = (3, 7, 11),
        groups: int = 4,
        stride: int = 1,
        se_reduction: int = 16,
        routing: str = 'official',
        drop_path: float = 0.0,
    ) -> None:
        super().__init__(
            in_dim,
            kernel_sizes=kernel_sizes,
            groups=groups,
            se_reduction=se_reduction,
            routing=routing,
            out_dim=out_dim,
            stride=stride,
            out_act=True,
        )
        if stride != 1 or in_dim != out_dim:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_dim, out_dim, 1, stride=stride, bias=False), nn.BatchNorm2d(out_dim)
            )
        else:
            self.shortcut = nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and use_fast_form('inplace', x):
            return self._forward_residual_inplace(x)
        if not torch.jit.is_scripting() and self._train_op(x) is not None:
            return self._forward_residual_train(x, tuned=True)
        if torch.is_grad_enabled() and tunable('pointwise_conv_train', x):
            return self._forward_residual_train(x, tuned=False)
        return self.forward_reference(x)

    @torch.jit.unused
    def _forward_residual_train(self, x: torch.Tensor, tuned: bool = False) -> torch.Tensor:
        """``forward_reference`` with every 1x1 conv through ``fast_ops.pointwise_conv_train``; with ``tuned``, the
        SCSC branch in the form ``forms.tuned_training`` measures faster (``_forward_tuned_train``: the plain training
        form or the lean autograd function)."""
        if isinstance(self.shortcut, nn.Sequential) and len(self.shortcut) == 2:
            shortcut = self.shortcut[1](pointwise_conv_train(self.shortcut[0], x))
        else:
            shortcut = self.shortcut(x)
        branch = self._forward_tuned_train(x) if tuned else self._forward_train(x)
        return self.drop_path(branch) + shortcut

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self._scsc_reference(x)) + self.shortcut(x)

    @torch.jit.unused
    def _forward_residual_inplace(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.shortcut, nn.Conv2d):
            if channels_last_only(x) and is_pointwise(self.shortcut):
                s = self.shortcut.stride[0]
                xt = x.permute(0, 2, 3, 1)
                shortcut = linear_1x1(self.shortcut, xt[:, ::s, ::s] if s > 1 else xt).permute(0, 3, 1, 2)
            else:
                shortcut = pointwise_conv(self.shortcut, x)
        else:
            shortcut = self.shortcut(x)
        return self._forward_inplace(x, shortcut)

    @torch.no_grad()
    def reparameterize(self) -> None:
        super().reparameterize()
        if isinstance(self.shortcut, nn.Sequential):
            self.shortcut = fold_bn_into_conv(self.shortcut[0], self.shortcut[1])


# ---------------------------------------------------------------------------------------------------------------
# Official state dict -> ours (module level). Model-level key renames live with each model file.

_MODULE_RENAMES: List[Tuple[str, str]] = [
    (r'reduction_c\.weight', 'reduce.weight'),
    (r'bn1\.(.+)', r'reduce_bn.\1'),
    (r'layers\.(\d+)(?:\.0)?\.weight', r'dw.\1.weight'),
    (r'bn2\.(.+)', r'dw_bn.\1'),
    (r'routing_fc\.weight', 'router.weight'),
    (r'recover_c\.weight', 'recover.weight'),
    (r'bn3\.(.+)', r'recover_bn.\1'),
    (r'se\.fc\.0\.weight', 'se.fc1.weight'),
    (r'se\.fc\.2\.weight', 'se.fc2.weight'),
    (r'downsample\.(\d)\.(.+)', r'shortcut.\1.\2'),
]


def convert_scsc_official(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename the keys of every official SCSC module (Swin ``SCSC_block`` or CNN ``CNN_Trans_block``) in a state dict.

    A module is recognised by its ``<prefix>reduction_c.weight`` key; its sub-keys are renamed to ours, the SE
    Linear weights become 1x1 conv weights, and the BN after the depthwise convs is permuted from the official
    shuffled order to our concat order. Every other key passes through unchanged (identity on msconv keys).
    """
    out = dict(state_dict)
    prefixes = [k[: -len('reduction_c.weight')] for k in state_dict if k.endswith('reduction_c.weight')]
    for p in prefixes:
        sub = {k[len(p) :]: v for k, v in state_dict.items() if k.startswith(p)}
        m = sum(1 for k in sub if re.fullmatch(r'layers\.\d+(?:\.0)?\.weight', k))
        for k, v in sub.items():
            for pat, rep in _MODULE_RENAMES:
                if re.fullmatch(pat, k):
                    new = re.sub(pat, rep, k)
                    if new.startswith('se.fc') and v.dim() == 2:
                        v = v.reshape(*v.shape, 1, 1)
                    if new.startswith('dw_bn.') and v.dim() == 1 and m > 0:
                        # official bn2 channel j*cp + t normalises concat channel t*m + j
                        v = v.reshape(m, -1).t().reshape(-1).contiguous()
                    del out[p + k]
                    out[p + new] = v
                    break
    return out
