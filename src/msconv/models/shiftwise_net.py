"""ShiftWise v2 (SW): UniRepLKNet's macro design with shift-wise convolutions.

Paper: Dachong Li, Li Li, Zhuangzhuang Chen, Jianqiang Li, "ShiftwiseConv: Small Convolutional Kernel with Large
Kernel Effect", CVPR 2025 (arXiv 2401.12736). Official code and weights: github.com/lidc54/shift-wiseConv
(``backbones/SW_v2_unirep.py``, commit 2202e6b5); the released SW-T ImageNet-1k checkpoint (83.39 top-1) is
distributed on Google Drive only, so no URL is set here: load it with ``create_model(..., checkpoint_path=...)``.

Network: stem (conv3x3 s2, LN, GELU, conv3x3 s2, LN), then four stages of [conv3x3 s2 + LN downsample] and blocks
``x + ls * BN(Linear(GRN(GELU(Linear(SE(BN(SW(x))))))))`` (the two Linears channels-last, the second without bias),
then mean pooling, LayerNorm and a Linear classifier. Every block of stage i uses an SW emulating
``kernel_sizes[i]`` with ``small_kernel`` (51/49/47/13 with 3 in the released models).

``model.reparameterize()`` produces the inference form: each SW becomes one cross-shaped depthwise kernel with the
BN that follows it folded in and its output left in input channel order (the SE and first Linear are permuted
once instead), and the BN and layer scale after the second Linear are folded into it.
"""

import re
from functools import partial
from typing import Dict, List, Optional, Sequence, Set, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, LayerScale2d, NormMlpClassifierHead, SEModule, trunc_normal_
from timm.layers.grn import GlobalResponseNorm
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs
from timm.models._features import feature_take_indices

from ..layers._fold import bn_scale_shift
from ..layers.fast_ops import linear, linear_gelu, spatial_l2_norms, spatial_mean
from ..layers.forms import autocast_dtype, tuned, tuned_training, use_fast_form
from ..layers.linear import Linear
from ..layers.shiftwise import ShiftWiseConv2d, convert_official_op
from ._builder import MsconvModel, factory_kwargs
from ._registry import register_converter, register_model

__all__ = ['ShiftWiseNet', 'ShiftWiseBlock', 'ShiftWiseStage', 'checkpoint_filter_fn']


def _spatial_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, ..., C) x2 -> (B, 1, C) or (B, 1, 1, C): per image and channel the sum over the middle dims of ``a * b``
    (GRN's squared norms, the SE gate's gradient): one product and one sum (``vector_norm`` over the middle dims of
    a channels-last tensor is ~3x-8x slower on CPU: 9.7 ms vs 3.8 ms at 8x56x56x320), accumulated and returned in
    fp32 (bf16 operands: the products rounded to bf16, their sum not)."""
    return torch.sum(a * b, dim=tuple(range(1, a.dim() - 1)), keepdim=True, dtype=torch.float32)


def _sum_fp32(t: torch.Tensor, dim) -> torch.Tensor:
    return torch.sum(t, dim=dim, dtype=torch.float32)


class _LeanMlpTrain(torch.autograd.Function):
    """Training form of a block's ``fc2(GRN(GELU(fc1(x * gate))))`` (the SE's product and the MLP, channels-last
    Linears, exact GELU, GRN over the spatial dims) in one autograd node.

    GRN(g) = g + bias + weight * g * n = g * a + bias with a = 1 + weight * n (n: the per-image channel norms over
    their mean). Saves the SE's input ``x``, the gate and the first Linear's output ``h`` (1 + 4 channel-widths per
    pixel where autograd saves 5 more 4x-wide tensors) and recomputes GELU(h) in backward. Two ways to run fc2 and
    the GRN's backward sums, chosen per shape by the tuned training operation ``shiftwise_mlp_train``:

    * ``per_image=False``: the GRN output written once, one GEMM for fc2 and two for its backward, the sums as
      passes over the 4x-wide maps;
    * ``per_image=True``: fc2(GRN(g)) = g @ (W2 * a)^T + W2 @ bias image by image (the GRN output never written),
      the GRN's sums from the per-image products dz^T @ g (C x 4C): fewer passes over large maps, but batched GEMMs
      that run slowly on few pixels.

    ``dtype``: the compute dtype (``None``: fp32). With bf16 (a bf16 autocast step, kind ``lean_bf16``) the GEMMs,
    GELU, the GRN's products and the saved ``h`` are bf16 as autocast would run the plain form's Linears, and the
    GRN's norms, the per-channel statistics and every reduction are accumulated and kept in fp32 (where the plain
    form under autocast writes the GRN output as a 4x-wide fp32 map); gradients come back in each input's dtype.

    ``x`` is (B, C, H, W) (any layout), ``gate`` (B, C, 1, 1); returns (B, C, H, W) in the compute dtype.
    """

    @staticmethod
    def forward(ctx, x, gate, w1, b1, grn_w, grn_b, w2, eps: float, per_image: bool, dtype=None):
        cd = torch.float32 if dtype is None else dtype
        with torch.autocast(x.device.type, enabled=False):  # the dtypes below are the form's own
            B, C = x.shape[0], x.shape[1]
            xt = x.permute(0, 2, 3, 1)  # (B, H, W, C): a contiguous view of a channels-last x
            h = F.linear((xt * gate.view(B, 1, 1, C)).to(cd), w1.to(cd), b1.to(cd))  # (B, H, W, 4C)
            hidden = h.shape[-1]
            g = F.gelu(h).view(B, -1, hidden)
            norms = _spatial_dots(g, g).sqrt_()  # (B, 1, 4C), fp32
            denom = norms.mean(dim=-1, keepdim=True) + eps
            a = torch.addcmul(torch.ones_like(norms), grn_w.float(), norms / denom)
            if per_image:
                bias = torch.mv(w2, grn_b.to(w2.dtype)).to(cd).view(1, 1, C)
                out = torch.baddbmm(bias, g, (w2 * a).to(cd).transpose(1, 2))  # (B, H*W, C)
            else:
                out = F.linear(torch.addcmul(grn_b.to(cd), g, a.to(cd)), w2.to(cd))
        ctx.save_for_backward(x, gate, h, w1, w2, grn_w, grn_b, norms, denom, a)
        ctx.per_image = per_image
        return out.view(B, x.shape[2], x.shape[3], C).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, dz):
        x, gate, h, w1, w2, grn_w, grn_b, norms, denom, a = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):  # a backward called inside autocast: the same dtypes
            return _LeanMlpTrain._backward(ctx, dz, x, gate, h, w1, w2, grn_w, grn_b, norms, denom, a)

    @staticmethod
    def _backward(ctx, dz, x, gate, h, w1, w2, grn_w, grn_b, norms, denom, a):
        need = ctx.needs_input_grad
        cd = h.dtype
        B, C = x.shape[0], x.shape[1]
        hidden = h.shape[-1]
        dz3 = dz.permute(0, 2, 3, 1).reshape(B, -1, C).to(cd)
        g = F.gelu(h).view(B, -1, hidden)
        w2c, ac = w2.to(cd), a.to(cd)
        gw2 = None
        if ctx.per_image:
            m = torch.bmm(dz3.transpose(1, 2), g)  # (B, C, 4C): per image dz^T @ g
            dz_sum = _sum_fp32(dz3, (0, 1))
            if need[6]:
                gw2 = _sum_fp32(m * ac, 0).addr_(dz_sum, grn_b.float())
            s = _sum_fp32(m * w2c, 1).unsqueeze(1)  # (B, 1, 4C): sum over H, W of (dz @ W2) * g
            del m
            ggrn_b = torch.mv(w2.t().float(), dz_sum) if need[5] else None
            go_a = torch.bmm(dz3, (w2 * a).to(cd))  # (dz @ W2) * a
        else:
            dz2 = dz3.reshape(-1, C)
            if need[6]:
                gw2 = dz2.t().mm(torch.addcmul(grn_b.to(cd), g, ac).view(-1, hidden))
            go = dz2.mm(w2c).view_as(g)  # the gradient of the GRN output
            s = _spatial_dots(go, g)
            ggrn_b = _sum_fp32(go, (0, 1)) if need[5] else None
            go_a = go.mul_(ac)
            del go
        nrm = norms / denom
        ggrn_w = (s * nrm).sum(dim=(0, 1)) if need[4] else None
        # through n = norms / denom, denom = mean(norms) + eps, norms = ||g||: dg = go * a + g * e
        dn = grn_w.float() * s / denom
        dn = dn - (dn * nrm).sum(dim=-1, keepdim=True) / hidden
        e = torch.where(norms > 0, dn / norms, torch.zeros_like(dn))
        dg = go_a.addcmul_(g, e.to(cd))
        del g, go_a
        dh = torch.ops.aten.gelu_backward(dg.view_as(h), h)
        del dg
        gate_t = gate.view(B, 1, 1, C)
        xt = x.permute(0, 2, 3, 1)
        dh2 = dh.reshape(-1, hidden)
        gw1 = dh2.t().mm((xt * gate_t).to(cd).reshape(-1, C)) if need[2] else None
        gb1 = _sum_fp32(dh2, 0) if need[3] else None
        du = dh.matmul(w1.to(cd))  # (B, H, W, C)
        gx = (du * gate_t.to(cd)).permute(0, 3, 1, 2).to(x.dtype) if need[0] else None
        ggate = _spatial_dots(du, xt.to(cd)).view_as(gate).to(gate.dtype) if need[1] else None

        def like(grad, t):
            return None if grad is None else grad.to(t.dtype)

        return (
            gx,
            ggate,
            like(gw1, w1),
            like(gb1, w1),
            like(ggrn_w, grn_w),
            like(ggrn_b, grn_b),
            like(gw2, w2),
            None,
            None,
            None,
        )


def lean_mlp_train(
    x: torch.Tensor,
    gate: torch.Tensor,
    fc1: nn.Linear,
    grn: GlobalResponseNorm,
    fc2: nn.Linear,
) -> torch.Tensor:
    """``fc2(GRN(GELU(fc1(x * gate))))`` of a ShiftWise block in training (x (B, C, H, W), gate (B, C, 1, 1),
    returns (B, C, H, W)) through :class:`_LeanMlpTrain`, batched or image by image, whichever
    :func:`~msconv.layers.forms.tuned_training` measures faster (forward + backward) for this shape. Under autocast
    (the gate's kind ``lean_bf16``) it computes in the autocast dtype where autocast runs the Linears."""
    dtype = autocast_dtype(x)

    def form(per_image: bool):
        return lambda *a: _LeanMlpTrain.apply(*a, grn.eps, per_image, dtype)

    return tuned_training(
        'shiftwise_mlp_train',
        (x, gate, fc1.weight, fc1.bias, grn.weight, grn.bias, fc2.weight),
        {'batched': form(False), 'per_image': form(True)},
        extra=f'{fc1.in_features}->{fc1.out_features}',
    )


def _batch_norm_scaled(bn: nn.BatchNorm2d, x: torch.Tensor, gamma: Optional[torch.Tensor]) -> torch.Tensor:
    """``bn(x) * gamma`` (per channel) in one ``F.batch_norm`` with the affine scaled by ``gamma``: the same
    statistics and running-statistics update as the module's own forward, one saved tensor instead of two."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    weight, bias = bn.weight, bn.bias
    if gamma is not None:
        weight = gamma if weight is None else weight * gamma
        bias = None if bias is None else bias * gamma
    use_batch = bn.training or bn.running_mean is None
    return F.batch_norm(
        x,
        bn.running_mean if not bn.training or bn.track_running_stats else None,
        bn.running_var if not bn.training or bn.track_running_stats else None,
        weight,
        bias,
        use_batch,
        factor,
        bn.eps,
    )


class ShiftWiseBlock(nn.Module):
    """SW -> BN -> SE -> Linear(4C) -> GELU -> GRN -> Linear(C, no bias) -> BN -> layer scale -> drop path, residual."""

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        small_kernel: int = 3,
        ghost_ratio: float = 0.23,
        n_paths: int = 2,
        n_reps: int = 4,
        seed: int = 123,
        mlp_ratio: int = 4,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 1e-6,
    ) -> None:
        super().__init__()
        hidden = mlp_ratio * dim
        self.conv = ShiftWiseConv2d(dim, kernel_size, small_kernel, ghost_ratio, n_paths, n_reps, seed)
        self.norm = nn.BatchNorm2d(dim)
        self.se = SEModule(dim, rd_channels=dim // 4, act_layer=nn.ReLU)
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU()
        self.grn = GlobalResponseNorm(hidden, eps=1e-6, channels_last=True)
        self.fc2 = Linear(hidden, dim, bias=False)
        self.norm2 = nn.BatchNorm2d(dim)
        self.ls = LayerScale2d(dim, layer_scale_init_value) if layer_scale_init_value > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the gate first: it answers False while scripting, so that the script never reaches the unused methods
        if (
            not self.training
            and (
                use_fast_form('inplace', x, layout='channels_last') or use_fast_form('inplace_bf16', x, 'channels_last')
            )
            and self._inference_ok()
        ):
            return self._forward_inference(x)
        if self.training and (use_fast_form('lean_fp32', x) or use_fast_form('lean_bf16', x)) and self._lean_ok():
            return self._forward_train(x)
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.se(self.norm(self.conv(x)))
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = self.fc2(self.grn(self.act(self.fc1(x))))
        x = self.ls(self.norm2(x.permute(0, 3, 1, 2)))  # (B, C, H, W)
        return shortcut + self.drop_path(x)

    @torch.jit.unused
    def _lean_ok(self) -> bool:
        """The structure the training form assumes (plain BN2 in training, exact GELU, plain SE, channels-last GRN,
        layer scale or none)."""
        return (
            type(self.norm2) is nn.BatchNorm2d
            and self.norm2.training
            and type(self.ls) in (LayerScale2d, nn.Identity)
            and type(self.act) is nn.GELU
            and self.act.approximate == 'none'
            and type(self.grn) is GlobalResponseNorm
            and self.grn.channel_dim == -1
            and type(self.se) is SEModule
            and not self.se.add_maxpool
            and self.fc2.bias is None
        )

    @torch.jit.unused
    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
        """Training form (kind ``lean_fp32``): the same maths as ``forward_reference`` with the SE product, the MLP
        and the GRN in one autograd node (:class:`_LeanMlpTrain`) and the layer scale folded into BN2's affine:
        less saved for backward and fewer passes."""
        shortcut = x
        y = self.norm(self.conv(x))
        se = self.se
        gate = se.gate(se.fc2(se.act(se.bn(se.fc1(y.mean((2, 3), keepdim=True))))))
        z = lean_mlp_train(y, gate, self.fc1, self.grn, self.fc2)
        gamma = self.ls.gamma if isinstance(self.ls, LayerScale2d) else None
        return shortcut + self.drop_path(_batch_norm_scaled(self.norm2, z, gamma))

    @torch.jit.unused
    def _inference_ok(self) -> bool:
        """The structure the inference form assumes (reparameterized block, exact GELU, plain SE); what it needs of
        the input and the environment (in-place forms allowed, channels-last memory) is the gate's question."""
        return (
            self.conv.deployed
            and isinstance(self.norm2, nn.Identity)
            and isinstance(self.ls, nn.Identity)
            and self.fc2.bias is not None
            and type(self.act) is nn.GELU
            and self.act.approximate == 'none'
            and not getattr(self.se, 'add_maxpool', False)
        )

    @torch.jit.unused
    def _forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        """Deploy form without autograd: the same maths as ``forward_reference`` with every elementwise step in
        place on a fresh buffer, the GRN bias folded through ``fc2`` and, where the gate allows the
        ``shiftwise_block`` operation's ``per_image`` form and it measures faster, the MLP run image by image so that
        its 4x-wide hidden tensor stays cache-sized.

        GRN(h) = h + bias + weight * h * n = h * (1 + weight * n) + bias, with n the per-image channel norms
        over the mean norm; so fc2(GRN(h)) = fc2_no_bias(h * (1 + weight * n)) + (fc2.bias + fc2.weight @ bias)."""
        return tuned(
            'shiftwise_block',
            x,
            {
                'batched': lambda: self._inference_form(x, per_image=False),
                'per_image': lambda: self._inference_form(x, per_image=True),
            },
            module=self,
        )

    def _inference_form(self, x: torch.Tensor, per_image: bool) -> torch.Tensor:
        y = self.conv(x)  # fresh, channels-last; ends up holding the block output
        se = self.se
        gate = se.gate(se.fc2(se.act(se.bn(se.fc1(spatial_mean(y))))))
        y.mul_(gate)
        # under bf16 autocast (kind inplace_bf16) y is bf16 and so is all that follows: the Linears' weights cast
        # as autocast would, the GRN's vectors rounded to bf16 where they scale a bf16 map
        dt = y.dtype
        w1, b1, w2 = (t.to(dt) for t in (self.fc1.weight, self.fc1.bias, self.fc2.weight))
        bias2 = torch.addmv(self.fc2.bias, self.fc2.weight, self.grn.bias).to(dt)
        grn_w = self.grn.weight.to(dt)
        yt, xt = y.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1)  # (B, H, W, C) views, contiguous
        for yi, xi in zip(yt.split(1), xt.split(1)) if per_image else ((yt, xt),):
            h = linear_gelu(yi, w1, b1)  # GELU(fc1(yi)), fresh
            hv = h.flatten(1, 2)  # (b, H*W, 4C) view
            norms = spatial_l2_norms(hv)
            norms.div_(norms.mean(dim=-1, keepdim=True).add_(self.grn.eps))
            hv.mul_(norms.mul_(grn_w).add_(1.0))
            torch.add(xi, linear(h, w2, bias2), out=yi)  # residual; yi is no longer needed
        return y

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold SW + BN into one cross conv (input channel order), permute SE/fc1, fold BN2 + layer scale into fc2."""
        if self.conv.deployed:
            return
        scale, shift = bn_scale_shift(self.norm)
        self.conv.reparameterize(scale, shift, official_order=False)
        self.norm = nn.Identity()
        # the SW output is now in input order: input channel c sat at official position inv[c]
        inv = torch.argsort(self.conv.output_index)
        self.se.fc1.weight.copy_(self.se.fc1.weight[:, inv])
        self.se.fc2.weight.copy_(self.se.fc2.weight[inv])
        self.se.fc2.bias.copy_(self.se.fc2.bias[inv])
        self.fc1.weight.copy_(self.fc1.weight[:, inv])
        scale, shift = bn_scale_shift(self.norm2)
        if isinstance(self.ls, LayerScale2d):
            scale, shift = scale * self.ls.gamma, shift * self.ls.gamma
        fc2 = Linear(self.fc2.in_features, self.fc2.out_features, bias=True).to(self.fc2.weight)
        fc2.weight.copy_(self.fc2.weight * scale.view(-1, 1))
        fc2.bias.copy_(shift)
        self.fc2, self.norm2, self.ls = fc2, nn.Identity(), nn.Identity()


class ShiftWiseStage(nn.Module):
    """Optional downsample (conv3x3 s2 + LayerNorm) followed by ``depth`` ShiftWise blocks."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        depth: int,
        kernel_size: int,
        downsample: bool = True,
        drop_path_rates: Optional[Sequence[float]] = None,
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=2, padding=1),
                LayerNorm2d(out_chs, eps=1e-6),
            )
        else:
            self.downsample = nn.Identity()
        dpr = list(drop_path_rates) if drop_path_rates is not None else [0.0] * depth
        self.blocks = nn.Sequential(
            *[ShiftWiseBlock(out_chs, kernel_size, drop_path=dpr[j], **block_kwargs) for j in range(depth)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class ShiftWiseNet(MsconvModel):
    """ShiftWise v2 backbone/classifier (timm model contract)."""

    family = 'shiftwise'
    final_norm_group = r'^head\.norm'

    @factory_kwargs
    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = 'avg',
        depths: Sequence[int] = (3, 3, 18, 3),
        dims: Sequence[int] = (80, 160, 320, 640),
        kernel_sizes: Sequence[int] = (51, 49, 47, 13),
        small_kernel: int = 3,
        ghost_ratio: float = 0.23,
        n_paths: int = 2,
        n_reps: int = 4,
        seed: int = 123,
        mlp_ratio: int = 4,
        layer_scale_init_value: float = 1e-6,
        head_init_scale: float = 1.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        channels_last: bool = True,
    ) -> None:
        """``channels_last`` keeps activations in channels_last memory (NCHW shapes, NHWC strides): the depthwise
        strip convs run several times faster that way on CPU and the channels-last Linears need no copies.
        Values are the same either way."""
        super().__init__()
        self.check_pooling(num_classes, global_pool)
        depths, dims, kernel_sizes = tuple(depths), tuple(dims), tuple(kernel_sizes)
        if not (len(depths) == len(dims) == len(kernel_sizes) == 4):
            raise ValueError(
                f"depths, dims and kernel_sizes must each have 4 entries (one per stage), got depths={depths}, "
                f"dims={dims}, kernel_sizes={kernel_sizes}"
            )
        if any(d % 2 for d in dims) or min(dims) < 4:
            raise ValueError(f"dims must be even ints >= 4 (the stem halves dims[0]), got {dims}")
        if not (0.0 <= drop_path_rate < 1.0):
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.channels_last = channels_last
        self.min_input_size = 32  # total stride
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0] // 2, kernel_size=3, stride=2, padding=1),
            LayerNorm2d(dims[0] // 2, eps=1e-6),
            nn.GELU(),
            nn.Conv2d(dims[0] // 2, dims[0], kernel_size=3, stride=2, padding=1),
            LayerNorm2d(dims[0], eps=1e-6),
        )
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device='cpu').split(list(depths))]
        stages, self.feature_info = [], []
        prev, reduction = dims[0], 4
        for i in range(4):
            if i > 0:
                reduction *= 2
            stages.append(
                ShiftWiseStage(
                    prev,
                    dims[i],
                    depths[i],
                    kernel_sizes[i],
                    downsample=i > 0,
                    drop_path_rates=dpr[i],
                    small_kernel=small_kernel,
                    ghost_ratio=ghost_ratio,
                    n_paths=n_paths,
                    n_reps=n_reps,
                    seed=seed,
                    mlp_ratio=mlp_ratio,
                    layer_scale_init_value=layer_scale_init_value,
                )
            )
            self.feature_info.append(dict(num_chs=dims[i], reduction=reduction, module=f'stages.{i}'))
            prev = dims[i]
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = dims[-1]
        self.head = NormMlpClassifierHead(
            self.num_features,
            num_classes,
            pool_type=global_pool,
            drop_rate=drop_rate,
            norm_layer=partial(LayerNorm2d, eps=1e-6),
        )
        self.apply(_init_weights)
        if isinstance(self.head.fc, nn.Linear):
            self.head.fc.weight.data.mul_(head_init_scale)
            self.head.fc.bias.data.mul_(head_init_scale)

    @torch.jit.ignore
    def force_weight_decay(self) -> Set[str]:
        """Parameters decayed although they are 1-D: the GRN gamma/beta, which are 4-D ``(1, 1, 1, C)`` in the
        official model and so are not excluded by its 1-D rule (official ``optim_factory.py:80``). Their shapes here
        stay 1-D (checkpoint conversion reshapes them); the training parameter groups read this list."""
        return {n for n, _ in self.named_parameters() if n.rsplit('.', 2)[-2] == 'grn'}

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False):
        global_pool = self.pooling_for(num_classes, global_pool)
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, reset_other=reset_other, in_features=self.num_features)
        self._match_head_to_model()
        self.head_hidden_size = self.head.num_features

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end or prune_norm:
            self.reset_classifier(0, '', reset_other=True)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self.check_input(x)
        return self.stages(self._forward_stem(x))

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)


def _init_weights(m: nn.Module) -> None:
    # the official init: trunc_normal(std=.02) for every conv/linear weight (the small SW kernels included)
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, ShiftWiseConv2d) and not m.deployed:
        trunc_normal_(m.weight, std=0.02)


_BLOCK_RENAMES = (
    (r'large_kernel\.', 'conv.'),
    (r'se\.down\.', 'se.fc1.'),
    (r'se\.up\.', 'se.fc2.'),
    (r'pwconv1\.1\.', 'fc1.'),
    (r'act\.1\.gamma', 'grn.weight'),
    (r'act\.1\.beta', 'grn.bias'),
    (r'pwconv2\.0\.', 'fc2.'),
    (r'pwconv2\.2\.', 'norm2.'),
    (r'gamma', 'ls.gamma'),
)


def checkpoint_filter_fn(
    state_dict: Dict[str, torch.Tensor],
    model: Optional[nn.Module] = None,
) -> Dict[str, torch.Tensor]:
    """Official ShiftWise_v2 (or single ShifthWiseConv2dImplicit) state dict -> msconv keys. Pure; identity on
    msconv keys. The official rep-then-ghost channel order is kept by our layer, so no tensor is permuted."""
    if 'model' in state_dict and isinstance(state_dict['model'], dict):
        state_dict = state_dict['model']
    out: Dict[str, torch.Tensor] = {}
    for key, val in state_dict.items():
        if key.startswith('module.'):
            key = key[len('module.') :]
        m = re.match(r'downsample_layers\.(\d+)\.(.*)', key)
        if m:
            i = int(m.group(1))
            key = f'stem.{m.group(2)}' if i == 0 else f'stages.{i}.downsample.{m.group(2)}'
        m = re.match(r'stages\.(\d+)\.(\d+)\.(.*)', key)
        if m:
            rest = m.group(3)
            for pat, rep in _BLOCK_RENAMES:
                if re.match(pat, rest):
                    rest = re.sub('^' + pat, rep, rest)
                    break
            if rest.startswith('grn.'):
                val = val.reshape(-1)
            key = f'stages.{m.group(1)}.blocks.{m.group(2)}.{rest}'
        if key in ('norm.weight', 'norm.bias'):
            key = 'head.' + key
        elif key in ('head.weight', 'head.bias'):
            key = 'head.fc.' + key.split('.')[1]
        out[key] = val
    return convert_official_op(out)


register_converter('shiftwise', checkpoint_filter_fn)


def _create_shiftwise(variant: str, pretrained: bool = False, **kwargs) -> ShiftWiseNet:
    return build_model_with_cfg(
        ShiftWiseNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs) -> dict:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'mean': (0.485, 0.456, 0.406),
        'std': (0.229, 0.224, 0.225),
        'first_conv': 'stem.0',
        'classifier': 'head.fc',
        'license': 'mit',
        'paper_ids': 'arXiv:2401.12736',
        'paper_name': 'ShiftwiseConv: Small Convolutional Kernel with Large Kernel Effect',
        'origin_url': 'https://github.com/lidc54/shift-wiseConv',
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        'shiftwise_tiny': _cfg(),
        'shiftwise_small': _cfg(),
        'shiftwise_base': _cfg(),
        'shiftwise_large': _cfg(),
        'test_shiftwise': _cfg(input_size=(3, 64, 64), pool_size=(2, 2), test_input_size=(3, 64, 64)),
    }
)

_SW_KERNELS = dict(kernel_sizes=(51, 49, 47, 13), small_kernel=3)
_PAPER = 'ShiftwiseConv (CVPR 2025)'


@register_model('shiftwise', paper_top1=83.39, paper=_PAPER)  # the official README's SW-T (300 epochs)
def shiftwise_tiny(pretrained: bool = False, **kwargs) -> ShiftWiseNet:
    """SW-T: depths 3/3/18/3, dims 80/160/320/640 (31.8M params with 2 paths, 31.0M merged; 5.0 GMACs)."""
    args = dict(depths=(3, 3, 18, 3), dims=(80, 160, 320, 640), **_SW_KERNELS)
    return _create_shiftwise('shiftwise_tiny', pretrained, **dict(args, **kwargs))


@register_model('shiftwise', paper=_PAPER)
def shiftwise_small(pretrained: bool = False, **kwargs) -> ShiftWiseNet:
    """SW-S: depths 3/3/27/3, dims 96/192/384/768."""
    args = dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), **_SW_KERNELS)
    return _create_shiftwise('shiftwise_small', pretrained, **dict(args, **kwargs))


@register_model('shiftwise', paper=_PAPER)
def shiftwise_base(pretrained: bool = False, **kwargs) -> ShiftWiseNet:
    """SW-B: depths 3/3/27/3, dims 128/256/512/1024."""
    args = dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), **_SW_KERNELS)
    return _create_shiftwise('shiftwise_base', pretrained, **dict(args, **kwargs))


@register_model('shiftwise', paper=_PAPER)
def shiftwise_large(pretrained: bool = False, **kwargs) -> ShiftWiseNet:
    """SW-L: depths 3/3/27/3, dims 192/384/768/1536."""
    args = dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536), **_SW_KERNELS)
    return _create_shiftwise('shiftwise_large', pretrained, **dict(args, **kwargs))


@register_model('shiftwise')
def test_shiftwise(pretrained: bool = False, **kwargs) -> ShiftWiseNet:
    """Tiny SW for tests (64x64 input): the official micro configuration of the fixtures."""
    args = dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), kernel_sizes=(13, 11, 9, 7), small_kernel=3)
    return _create_shiftwise('test_shiftwise', pretrained, **dict(args, **kwargs))
