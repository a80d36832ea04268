"""Depthwise 2-D convolution (groups = C, stride 1) with Triton kernels and a PyTorch reference.

One operator serves the two multi-scale designs:

* SMT's Multi-Head Mixed Convolution (MHMC): channel group ``g`` uses its own odd ``k_g x k_g`` kernel, stored
  centred and zero-padded in one ``(C, 1, K, K)`` weight (``K = max k_g``). With ``group_kernel_sizes`` the
  Triton kernel visits only each channel's own ``k_g x k_g`` taps, in a single launch.
* ShiftwiseConv's closed form (``shiftwise.md`` section 2.4): depthwise correlations with long thin strips
  (e.g. ``3 x 51`` / ``51 x 3``) whose footprint may be asymmetric, hence per-side padding. Its folded
  inference form runs as two such strips.

``depthwise_conv2d`` checks its arguments, then runs the backend it is given:

* ``'torch'`` (default): the reference, ``F.conv2d(..., groups=C)`` (with ``F.pad`` for asymmetric padding); this
  is the definition every fast path is tested against.
* ``'triton'``: the kernels below (forward, grad_input, grad_weight + grad_bias), fp32/fp16/bf16 inputs with
  fp32 accumulation, NCHW or channels_last memory (any strides: the kernels take them as arguments). CPU
  tensors are accepted when Triton runs in its interpreter (``TRITON_INTERPRET=1`` set before triton is
  imported): exact but very slow, meant for tests.

Which of the two should run (Triton where it is importable for the input's device, ``MSCONV_DISABLE_TRITON`` is
unset and no graph capture or ``reference_forms()`` is active) is not decided here but by msconv's form gate:
``msconv.depthwise_conv2d`` (``msconv.layers.fast_ops.depthwise_conv2d``) asks it and calls this function with the
answer. :func:`triton_available` is the part of that question this package answers.

The Triton path is registered as ``torch.ops.msconv.depthwise_conv2d`` (``torch.library.custom_op`` with a fake
implementation and an autograd formula), so ``torch.compile(fullgraph=True)`` traces through it without a graph
break; the compiled graph calls the Triton kernels as one opaque op. Double backward is not supported on the
Triton path (the reference path supports it).
"""

from __future__ import annotations

import functools
import os
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

try:  # Triton is optional: without it every call takes the reference path.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    'depthwise_conv2d',
    'depthwise_conv2d_reference',
    'triton_available',
    'interpreter_active',
    'resolve_padding',
    'channel_kernel_sizes',
]

Padding = Union[int, str, Sequence[int]]
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# Argument handling (shared by both backends)
# ---------------------------------------------------------------------------------------------------------------


def resolve_padding(padding: Padding, kernel_size: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` from an int, ``(pad_h, pad_w)``, ``(top, bottom, left, right)`` or
    ``'same'`` (PyTorch's convention: for an even kernel the extra row/column of padding goes bottom/right)."""
    kh, kw = kernel_size
    if isinstance(padding, str):
        if padding == 'same':
            return ((kh - 1) // 2, kh - 1 - (kh - 1) // 2, (kw - 1) // 2, kw - 1 - (kw - 1) // 2)
        if padding == 'valid':
            return (0, 0, 0, 0)
        raise ValueError(
            f"padding must be an int, 'same', 'valid', (pad_h, pad_w) or (top, bottom, left, right), got {padding!r}"
        )
    if isinstance(padding, int):
        pads = (padding,) * 4
    else:
        pads = tuple(padding)
        if len(pads) == 2:
            pads = (pads[0], pads[0], pads[1], pads[1])
    if len(pads) != 4 or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in pads):
        raise ValueError(
            f"padding must be a non-negative int, (pad_h, pad_w) or (top, bottom, left, right) "
            f"of non-negative ints, got {padding!r}"
        )
    return pads  # type: ignore[return-value]


def channel_kernel_sizes(group_kernel_sizes: Sequence[int], channels: int, interleaved: bool = False) -> List[int]:
    """The kernel size of every channel: ``G = len(group_kernel_sizes)`` groups of ``C / G`` channels, group ``g``
    being channels ``[g*C/G, (g+1)*C/G)`` (head-major) or, with ``interleaved``, channels ``j*G + g``.
    ``G == C`` gives a free per-channel map."""
    g = len(group_kernel_sizes)
    if interleaved:
        return [int(group_kernel_sizes[c % g]) for c in range(channels)]
    per = channels // g
    return [int(group_kernel_sizes[c // per]) for c in range(channels)]


def _check_group_kernel_sizes(group_kernel_sizes, channels: int, kernel_size: Tuple[int, int]) -> List[int]:
    gks = list(group_kernel_sizes)
    kh, kw = kernel_size
    if len(gks) == 0 or channels % len(gks) != 0:
        raise ValueError(
            f"group_kernel_sizes must hold G >= 1 sizes with G dividing the channel count {channels}, got {tuple(gks)}"
        )
    for k in gks:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > min(kh, kw) or (kh - k) % 2 or (kw - k) % 2:
            raise ValueError(
                f"group_kernel_sizes entries must be ints k with 1 <= k <= min(KH, KW) and "
                f"(KH - k), (KW - k) even (centred in the {kh}x{kw} weight), got {tuple(gks)}"
            )
    return gks


def _check_inputs(x, weight, bias, padding, group_kernel_sizes):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(
            f"x must be a (B, C, H, W) tensor, got "
            f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
        )
    C = x.shape[1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[0] != C or weight.shape[1] != 1:
        raise ValueError(
            f"weight must be a depthwise (C, 1, KH, KW) tensor with C = {C}, got "
            f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}"
        )
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (C,)):
        raise ValueError(
            f"bias must be None or a ({C},) tensor, got "
            f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}"
        )
    ks = (int(weight.shape[2]), int(weight.shape[3]))
    pads = resolve_padding(padding, ks)
    H, W = x.shape[2], x.shape[3]
    ho, wo = H + pads[0] + pads[1] - ks[0] + 1, W + pads[2] + pads[3] - ks[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(
            f"padding {pads} (top, bottom, left, right) is too small for a {ks[0]}x{ks[1]} kernel on a "
            f"{H}x{W} input: the output would be {ho}x{wo}"
        )
    gks = None if group_kernel_sizes is None else _check_group_kernel_sizes(group_kernel_sizes, C, ks)
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(
            f"x, weight and bias must share one dtype, got {x.dtype}, {weight.dtype}"
            f"{'' if bias is None else ', ' + str(bias.dtype)}"
        )
    return pads, gks


def _tap_mask(weight: torch.Tensor, gks: Sequence[int], interleaved: bool) -> torch.Tensor:
    """1 on each channel's own centred k x k taps, 0 elsewhere, shaped like ``weight`` (traceable by dynamo)."""
    C, _, kh, kw = weight.shape
    k = torch.tensor(channel_kernel_sizes(gks, C, interleaved), device=weight.device)[:, None]  # (C, 1)
    i = torch.arange(kh, device=weight.device)[None, :]
    j = torch.arange(kw, device=weight.device)[None, :]
    rows = (2 * i >= kh - k) & (2 * i < kh + k)  # (C, KH)
    cols = (2 * j >= kw - k) & (2 * j < kw + k)  # (C, KW)
    return (rows[:, :, None] & cols[:, None, :]).unsqueeze(1).to(weight.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------------


def depthwise_conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    padding: Padding = 0,
    group_kernel_sizes: Optional[Sequence[int]] = None,
    group_interleaved: bool = False,
) -> torch.Tensor:
    """The plain PyTorch definition: ``F.conv2d(F.pad(x, ...), weight * tap_mask, bias, groups=C)``.

    With ``group_kernel_sizes`` the taps outside each channel's centred ``k x k`` window are treated as structural
    zeros (the weight is multiplied by the tap mask), so their gradient is zero, as on Triton."""
    pads, gks = _check_inputs(x, weight, bias, padding, group_kernel_sizes)
    return _reference(x, weight, bias, pads, gks, group_interleaved)


def _conv_padded(x, weight, bias, pads):
    """Depthwise correlation with per-side padding (negative values crop)."""
    top, bottom, left, right = pads
    if top == bottom and left == right and top >= 0 and left >= 0:
        return F.conv2d(x, weight, bias, padding=(top, left), groups=x.shape[1])
    return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, groups=x.shape[1])


def _reference(x, weight, bias, pads, gks, interleaved):
    if gks is not None:
        weight = weight * _tap_mask(weight, gks, interleaved)
    return _conv_padded(x, weight, bias, pads)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
#
# Both kernels index output/grad positions as a 2-D tile of (rows of the flattened B*HO, output columns), and a
# block of BC channels; memory is addressed through explicit strides, so NCHW (BC = 1, long tiles along W) and
# channels_last (BC channels contiguous) are the same code with a different launch configuration.
# Per-channel tap windows (the mixed-kernel-size mode) come as an int32 (C, 4) table of
# [kh_lo, kh_hi, kw_lo, kw_hi); taps outside a channel's window are never loaded. MIXED selects how:
#   0: no table, all KH x KW taps;
#   1: per-channel windows: the forward loops over the block's bounding window with weights the host zeroed
#      outside each channel's window (loads stay channel-uniform, hence vectorised: cheaper than per-channel
#      scalar loads); the weight gradient zeroes the taps outside each channel's window at the end;
#   2: every channel block lies in one group (the host checks): the block's window is read once as scalars, so
#      loads keep channel-uniform masks (vectorisable along contiguous channels) and loops skip the zero taps;
# ---------------------------------------------------------------------------------------------------------------


def _dw_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    taps_ptr,
    C,
    H,
    W,
    HO,
    WO,
    NROWS,
    KH,
    KW,
    pad_t,
    pad_l,
    sxb,
    sxc,
    sxh,
    sxw,
    syb,
    syc,
    syh,
    syw,
    HAS_BIAS: tl.constexpr,
    MIXED: tl.constexpr,
    INT64: tl.constexpr,
    BR: tl.constexpr,
    BW: tl.constexpr,
    BC: tl.constexpr,
):
    """y[b, c, oh, ow] = sum_{kh, kw} w[c, kh, kw] * x[b, c, oh + kh - pad_t, ow + kw - pad_l] (+ bias[c]).
    The weight comes transposed, (KH * KW, C), so that a tap's weights for a channel block are one vector load."""
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_col_tiles = tl.cdiv(WO, BW)
    p = tl.arange(0, BR * BW)
    r = (pid // n_col_tiles) * BR + p // BW  # row of the flattened (B * HO)
    ow = (pid % n_col_tiles) * BW + p % BW
    pos_ok = (r < NROWS) & (ow < WO)
    oh = r % HO
    b = r // HO
    c = pid_c * BC + tl.arange(0, BC)
    c_ok = c < C
    if INT64:  # element offsets beyond 2**31: 64-bit index math (else 32-bit, fewer registers)
        b = b.to(tl.int64)
        oh = oh.to(tl.int64)
        ow = ow.to(tl.int64)
        c = c.to(tl.int64)
    x_chan = c * sxc
    x_img = b * sxb
    if MIXED == 1:
        kh_start = tl.min(tl.load(taps_ptr + c * 4 + 0, mask=c_ok, other=KH), axis=0)
        kh_stop = tl.max(tl.load(taps_ptr + c * 4 + 1, mask=c_ok, other=0), axis=0)
        kw_start = tl.min(tl.load(taps_ptr + c * 4 + 2, mask=c_ok, other=KW), axis=0)
        kw_stop = tl.max(tl.load(taps_ptr + c * 4 + 3, mask=c_ok, other=0), axis=0)
    elif MIXED == 2:
        c0 = pid_c * BC
        kh_start = tl.load(taps_ptr + c0 * 4 + 0)
        kh_stop = tl.load(taps_ptr + c0 * 4 + 1)
        kw_start = tl.load(taps_ptr + c0 * 4 + 2)
        kw_stop = tl.load(taps_ptr + c0 * 4 + 3)
    else:
        kh_start = 0
        kh_stop = KH
        kw_start = 0
        kw_stop = KW
    acc = tl.zeros((BR * BW, BC), dtype=tl.float32)
    for kh in range(kh_start, kh_stop):
        ih = oh + kh - pad_t
        row_ok = pos_ok & (ih >= 0) & (ih < H)
        row_off = x_img + ih * sxh
        for kw in range(kw_start, kw_stop):
            iw = ow + kw - pad_l
            ok = row_ok & (iw >= 0) & (iw < W)
            # masks stay uniform over channels (vectorised loads); for MIXED == 1 the host zeroed the weights
            # outside each channel's window, so the block's bounding window gives the same sums
            wv = tl.load(w_ptr + (kh * KW + kw) * C + c, mask=c_ok, other=0.0).to(tl.float32)
            xv = tl.load(
                x_ptr + (row_off + iw * sxw)[:, None] + x_chan[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0
            ).to(tl.float32)
            acc += xv * wv[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    y_off = (b * syb + oh * syh + ow * syw)[:, None] + (c * syc)[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=pos_ok[:, None] & c_ok[None, :])


def _dw_wgrad_kernel(
    x_ptr,
    g_ptr,
    pw_ptr,
    pb_ptr,
    taps_ptr,
    C,
    H,
    W,
    HO,
    WO,
    NPOS,
    CHUNK,
    KH,
    KW,
    pad_t,
    pad_l,
    sxb,
    sxc,
    sxh,
    sxw,
    sgb,
    sgc,
    sgh,
    sgw,
    MIXED: tl.constexpr,
    INT64: tl.constexpr,
    BP: tl.constexpr,
    BC: tl.constexpr,
    TP: tl.constexpr,
):
    """Partial sums over one chunk of CHUNK output positions (flattened B*HO*WO) of
    gw[c, kh, kw] = sum g[b, c, oh, ow] * x[b, c, oh + kh - pad_t, ow + kw - pad_l] and gb[c] = sum g[b, c, oh, ow].
    All KH*KW taps (padded to TP) are a tensor axis, so the accumulators stay in registers across the chunk.
    Writes pw[chunk, tap, c] and pb[chunk, c]; the host sums over chunks (deterministic, no atomics)."""
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BC + tl.arange(0, BC)
    c_ok = c < C
    c_idx = c
    if INT64:
        c_idx = c.to(tl.int64)
    x_chan = c_idx * sxc
    g_chan = c_idx * sgc
    t = tl.arange(0, TP)
    kh = t // KW
    kw = t % KW
    tap_ok = (t < KH * KW)[:, None] & c_ok[None, :]  # (TP, BC)
    load_ok = tap_ok  # channel-uniform, so loads vectorise along contiguous channels
    if MIXED == 1:
        h_lo = tl.load(taps_ptr + c * 4 + 0, mask=c_ok, other=0)
        h_hi = tl.load(taps_ptr + c * 4 + 1, mask=c_ok, other=0)
        w_lo = tl.load(taps_ptr + c * 4 + 2, mask=c_ok, other=0)
        w_hi = tl.load(taps_ptr + c * 4 + 3, mask=c_ok, other=0)
        tap_ok = (
            tap_ok
            & (kh[:, None] >= h_lo[None, :])
            & (kh[:, None] < h_hi[None, :])
            & (kw[:, None] >= w_lo[None, :])
            & (kw[:, None] < w_hi[None, :])
        )
    elif MIXED == 2:
        c0 = pid_c * BC
        in_window = (
            (kh >= tl.load(taps_ptr + c0 * 4 + 0))
            & (kh < tl.load(taps_ptr + c0 * 4 + 1))
            & (kw >= tl.load(taps_ptr + c0 * 4 + 2))
            & (kw < tl.load(taps_ptr + c0 * 4 + 3))
        )
        tap_ok = tap_ok & in_window[:, None]
        load_ok = tap_ok
    acc = tl.zeros((TP, BC), dtype=tl.float32)
    acc_b = tl.zeros((BC,), dtype=tl.float32)
    start = pid * CHUNK
    stop = tl.minimum(start + CHUNK, NPOS)
    for p0 in range(start, stop, BP):
        n = p0 + tl.arange(0, BP)
        pos_ok = n < stop
        ow = n % WO
        rr = n // WO
        oh = rr % HO
        b = rr // HO
        if INT64:
            b = b.to(tl.int64)
            oh = oh.to(tl.int64)
            ow = ow.to(tl.int64)
        g_off = (b * sgb + oh * sgh + ow * sgw)[:, None] + g_chan[None, :]
        g = tl.load(g_ptr + g_off, mask=pos_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)  # (BP, BC)
        acc_b += tl.sum(g, axis=0)
        ih = oh[:, None] + kh[None, :] - pad_t  # (BP, TP)
        iw = ow[:, None] + kw[None, :] - pad_l
        ok = pos_ok[:, None] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_off = b[:, None] * sxb + ih * sxh + iw * sxw  # (BP, TP)
        xv = tl.load(
            x_ptr + x_off[:, :, None] + x_chan[None, None, :], mask=ok[:, :, None] & load_ok[None, :, :], other=0.0
        ).to(tl.float32)  # (BP, TP, BC)
        acc += tl.sum(xv * g[:, None, :], axis=0)
    if MIXED == 1:  # taps outside a channel's window were summed over channel-uniform loads: zero them
        acc = tl.where(tap_ok, acc, 0.0)
    out_off = (pid * (KH * KW) + t)[:, None].to(tl.int64) * C + c[None, :]
    tl.store(pw_ptr + out_off, acc, mask=(t < KH * KW)[:, None] & c_ok[None, :])
    tl.store(pb_ptr + pid * C + c, acc_b, mask=c_ok)


def interpreter_active() -> bool:
    """Whether Triton runs in its CPU interpreter: ``TRITON_INTERPRET=1`` was set when triton was imported
    (triton decides this for its own library functions at import time)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.cdiv, InterpretedFunction)


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """The two kernels, compiled for the GPU or wrapped for Triton's CPU interpreter (built on first use)."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_dw_fwd_kernel), InterpretedFunction(_dw_wgrad_kernel)
    return triton.jit(_dw_fwd_kernel), triton.jit(_dw_wgrad_kernel)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.shape[1] > 1 and t.stride(1) == 1 and t.is_contiguous(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=16)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Launch configurations: {'fwd' | 'wgrad': {'nchw' | 'nhwc': dict}} may be overridden (benchmarks sweep them).
LAUNCH_OVERRIDES: dict = {}


def _channel_block(C: int, cap: int) -> int:
    """Channels per program on channels_last: the largest power of two <= cap dividing C if it is >= 8 (no
    masked lanes: C = 80 -> 16), else the power of two covering C (capped)."""
    div = cap
    while div > 1 and C % div:
        div //= 2
    return div if div >= 8 else min(cap, _next_pow2(C))


def _fwd_config(channels_last: bool, C: int, rows: int, WO: int) -> dict:
    """Tile of BR output rows (of the flattened B*HO) x BW columns x BC channels, about 1024 outputs."""
    cfg = LAUNCH_OVERRIDES.get('fwd', {}).get('nhwc' if channels_last else 'nchw')
    if cfg:
        return dict(cfg)
    if channels_last:
        bc = _channel_block(C, 64)
        bw = min(8, _next_pow2(WO))
        return dict(BR=max(1, min(1024 // (bc * bw), _next_pow2(rows))), BW=bw, BC=bc, num_warps=4)
    bw = max(16, min(64, _next_pow2(WO)))
    return dict(BR=max(1, min(1024 // bw, _next_pow2(rows))), BW=bw, BC=1, num_warps=4)


def _wgrad_config(channels_last: bool, C: int, taps_p2: int) -> dict:
    """BP positions x TP taps x BC channels per step, about 2048 products (int32 indexing: ~80-130 registers
    per thread on sm_90 at 4 warps, checked offline with ptxas)."""
    cfg = LAUNCH_OVERRIDES.get('wgrad', {}).get('nhwc' if channels_last else 'nchw')
    if cfg:
        return dict(cfg)
    if channels_last:
        bc = _channel_block(C, 16)
        bp = max(1, 2048 // (taps_p2 * bc))
    else:
        bc, bp = 1, max(8, min(256, 2048 // taps_p2))
    return dict(BP=bp, BC=bc, num_warps=8 if bp * taps_p2 * bc >= 4096 else 4)


@functools.lru_cache(maxsize=64)
def _taps_table_cpu(
    kernel_size: Tuple[int, int], gks: Tuple[int, ...], channels: int, interleaved: bool, flipped: bool
) -> torch.Tensor:
    kh, kw = kernel_size
    rows = []
    for k in channel_kernel_sizes(gks, channels, interleaved):
        lo_h, lo_w = (kh - k) // 2, (kw - k) // 2
        rows.append([lo_h, lo_h + k, lo_w, lo_w + k])
    table = torch.tensor(rows, dtype=torch.int32)
    if flipped:  # window of the kernel flipped in both axes
        table = torch.stack([kh - table[:, 1], kh - table[:, 0], kw - table[:, 3], kw - table[:, 2]], 1)
    return table.contiguous()


_TAPS_DEVICE_CACHE: dict = {}


def _taps_table(kernel_size, gks, channels, interleaved, flipped, device) -> torch.Tensor:
    key = (kernel_size, tuple(gks), channels, interleaved, flipped, str(device))
    table = _TAPS_DEVICE_CACHE.get(key)
    if table is None:
        table = _taps_table_cpu(kernel_size, tuple(gks), channels, interleaved, flipped).to(device)
        _TAPS_DEVICE_CACHE[key] = table
    return table


def _layout(x: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """x itself when NCHW- or channels_last-contiguous, else a contiguous copy; and whether it is channels_last."""
    if _is_channels_last(x):
        return x, True
    return x.contiguous(), False


def _launch_fwd(x, weight, bias, pads, out_hw, taps) -> torch.Tensor:
    """Runs the forward kernel; ``pads`` = (top, left) may be negative, ``out_hw`` the output size."""
    x, cl = _layout(x)
    B, C, H, W = x.shape
    KH, KW = weight.shape[2], weight.shape[3]
    HO, WO = out_hw
    y = torch.empty(
        (B, C, HO, WO),
        device=x.device,
        dtype=x.dtype,
        memory_format=torch.channels_last if cl else torch.contiguous_format,
    )
    w = weight.reshape(C, KH * KW).t().contiguous()  # (taps, C): a tap's weights are contiguous over channels
    cfg = _fwd_config(cl, C, B * HO, WO)
    fwd, _ = _kernels(interpreter_active())
    grid = (triton.cdiv(B * HO, cfg['BR']) * triton.cdiv(WO, cfg['BW']), triton.cdiv(C, cfg['BC']))
    extra = {} if interpreter_active() else dict(num_warps=cfg['num_warps'])
    with _device_guard(x):
        fwd[grid](
            x,
            w,
            bias if bias is not None else w,
            y,
            taps if taps is not None else w,
            C,
            H,
            W,
            HO,
            WO,
            B * HO,
            KH,
            KW,
            pads[0],
            pads[1],
            *x.stride(),
            *y.stride(),
            HAS_BIAS=bias is not None,
            MIXED=_mixed_mode(taps, cfg['BC']),
            INT64=_needs_int64(x, y),
            BR=cfg['BR'],
            BW=cfg['BW'],
            BC=cfg['BC'],
            **extra,
        )
    return y


def _launch_wgrad(x, grad_out, kernel_size, pads, taps) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_weight as fp32 (C, 1, KH, KW), grad_bias as fp32 (C,))."""
    x, cl = _layout(x)
    g = grad_out.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    B, C, H, W = x.shape
    HO, WO = g.shape[2], g.shape[3]
    KH, KW = kernel_size
    tp = _next_pow2(KH * KW)
    cfg = _wgrad_config(cl, C, tp)
    n_pos = B * HO * WO
    c_blocks = triton.cdiv(C, cfg['BC'])
    target = 4 * _num_sms(x.device.index or 0) if x.device.type == 'cuda' else 2
    n_chunks = max(1, min(triton.cdiv(n_pos, cfg['BP']), triton.cdiv(target, c_blocks)))
    chunk = triton.cdiv(triton.cdiv(n_pos, n_chunks), cfg['BP']) * cfg['BP']
    n_chunks = triton.cdiv(n_pos, chunk)
    pw = torch.empty((n_chunks, KH * KW, C), device=x.device, dtype=torch.float32)
    pb = torch.empty((n_chunks, C), device=x.device, dtype=torch.float32)
    _, wgrad = _kernels(interpreter_active())
    extra = {} if interpreter_active() else dict(num_warps=cfg['num_warps'])
    with _device_guard(x):
        wgrad[(n_chunks, c_blocks)](
            x,
            g,
            pw,
            pb,
            taps if taps is not None else pb,
            C,
            H,
            W,
            HO,
            WO,
            n_pos,
            chunk,
            KH,
            KW,
            pads[0],
            pads[1],
            *x.stride(),
            *g.stride(),
            MIXED=_mixed_mode(taps, cfg['BC']),
            INT64=_needs_int64(x, g),
            BP=cfg['BP'],
            BC=cfg['BC'],
            TP=tp,
            **extra,
        )
    grad_w = pw.sum(0).t().contiguous().reshape(C, 1, KH, KW)
    return grad_w, pb.sum(0)


def _mixed_mode(taps: Optional[torch.Tensor], block_c: int) -> int:
    """The kernels' MIXED switch: 0 without a tap table, 2 when every block of ``block_c`` channels shares one tap
    window (contiguous groups of a multiple of ``block_c`` channels, or ``block_c == 1``), 1 otherwise."""
    if taps is None:
        return 0
    return 2 if _blocks_uniform(taps, block_c) else 1


_UNIFORM_CACHE: dict = {}


def _blocks_uniform(taps: torch.Tensor, block_c: int) -> bool:
    key = (taps.data_ptr(), tuple(taps.shape), block_c)
    if key not in _UNIFORM_CACHE:  # taps tables are cached and never freed, so the pointer is a stable key
        rows = taps.cpu()
        _UNIFORM_CACHE[key] = block_c == 1 or all(
            bool((rows[i : i + block_c] == rows[i]).all()) for i in range(0, rows.shape[0], block_c)
        )
    return _UNIFORM_CACHE[key]


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether some element offset (in elements, of any of the tensors) can reach 2**31."""
    return any(sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) >= 2**31 - 1 for t in tensors)


def _device_guard(x: torch.Tensor):
    if x.device.type == 'cuda':
        return torch.cuda.device(x.device)
    import contextlib

    return contextlib.nullcontext()


def _triton_forward(x, weight, bias, padding: List[int], gks: Optional[List[int]], interleaved: bool):
    top, bottom, left, right = padding
    KH, KW = weight.shape[2], weight.shape[3]
    out_hw = (x.shape[2] + top + bottom - KH + 1, x.shape[3] + left + right - KW + 1)
    taps = None
    if gks is not None:
        taps = _taps_table((KH, KW), gks, x.shape[1], interleaved, False, x.device)
        weight = weight * _tap_mask(weight, gks, interleaved)  # structural zeros, read by MIXED == 1
    return _launch_fwd(x, weight, bias, (top, left), out_hw, taps)


def _triton_backward(grad_out, x, weight, padding, gks, interleaved, need_input, need_weight):
    top, bottom, left, right = padding
    KH, KW = weight.shape[2], weight.shape[3]
    C = x.shape[1]
    grad_x = grad_w = grad_b = None
    fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    grad_out = grad_out.contiguous(memory_format=fmt)  # grad_x and the wgrad loads follow x's layout
    if need_input:  # correlation of grad_out with the flipped kernel, padding (KH-1-top, KW-1-left)
        taps, w = None, weight
        if gks is not None:
            taps = _taps_table((KH, KW), gks, C, interleaved, True, x.device)
            w = weight * _tap_mask(weight, gks, interleaved)
        grad_x = _launch_fwd(
            grad_out, w.flip(2, 3), None, (KH - 1 - top, KW - 1 - left), (x.shape[2], x.shape[3]), taps
        )
    if need_weight:
        taps = None if gks is None else _taps_table((KH, KW), gks, C, interleaved, False, x.device)
        grad_w, grad_b = _launch_wgrad(x, grad_out, (KH, KW), (top, left), taps)
        grad_w, grad_b = grad_w.to(weight.dtype), grad_b.to(weight.dtype)
    return grad_x, grad_w, grad_b


# ---------------------------------------------------------------------------------------------------------------
# torch.library registration: one opaque op for torch.compile, with its autograd formula
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op('msconv::depthwise_conv2d', mutates_args=())
def _dw_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    padding: List[int],
    group_kernel_sizes: Optional[List[int]],
    group_interleaved: bool,
) -> torch.Tensor:
    return _triton_forward(x, weight, bias, padding, group_kernel_sizes, group_interleaved)


@_dw_op.register_fake
def _(x, weight, bias, padding, group_kernel_sizes, group_interleaved):
    top, bottom, left, right = padding
    B, C, H, W = x.shape
    ho, wo = H + top + bottom - weight.shape[2] + 1, W + left + right - weight.shape[3] + 1
    cl = _is_channels_last(x)
    return torch.empty(
        (B, C, ho, wo),
        device=x.device,
        dtype=x.dtype,
        memory_format=torch.channels_last if cl else torch.contiguous_format,
    )


@torch.library.custom_op('msconv::depthwise_conv2d_backward', mutates_args=())
def _dw_bwd_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    padding: List[int],
    group_kernel_sizes: Optional[List[int]],
    group_interleaved: bool,
    output_mask: List[bool],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gx, gw, gb = _triton_backward(
        grad_out,
        x,
        weight,
        padding,
        group_kernel_sizes,
        group_interleaved,
        output_mask[0],
        output_mask[1] or output_mask[2],
    )
    empty = x.new_empty(0)
    return (
        gx if gx is not None else empty,
        gw if gw is not None else empty.to(weight.dtype),
        gb if gb is not None else empty.to(weight.dtype),
    )


@_dw_bwd_op.register_fake
def _(grad_out, x, weight, padding, group_kernel_sizes, group_interleaved, output_mask):
    fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    gx = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=fmt) if output_mask[0] else x.new_empty(0)
    need_w = output_mask[1] or output_mask[2]
    gw = weight.new_empty(weight.shape) if need_w else weight.new_empty(0)
    gb = weight.new_empty(weight.shape[0]) if need_w else weight.new_empty(0)
    return gx, gw, gb


def _setup_context(ctx, inputs, output):
    x, weight, bias, padding, gks, interleaved = inputs
    ctx.save_for_backward(x, weight)
    ctx.padding, ctx.gks, ctx.interleaved = padding, gks, interleaved
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    if not any(mask):
        return None, None, None, None, None, None
    gx, gw, gb = _dw_bwd_op(grad_out, x, weight, ctx.padding, ctx.gks, ctx.interleaved, mask)
    return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None, None, None)


_dw_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------


def triton_available(device: Union[str, torch.device] = 'cuda') -> bool:
    """Whether the Triton kernels can run on ``device`` here: ``triton`` imports, ``MSCONV_DISABLE_TRITON`` is unset
    (or ``0``), and the device is CUDA (or CPU under Triton's interpreter)."""
    if not HAS_TRITON or os.environ.get('MSCONV_DISABLE_TRITON', '0') not in ('', '0'):
        return False
    if interpreter_active():
        return torch.device(device).type in ('cpu', 'cuda')
    return torch.device(device).type == 'cuda' and torch.cuda.is_available()


def depthwise_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    padding: Padding = 0,
    group_kernel_sizes: Optional[Sequence[int]] = None,
    group_interleaved: bool = False,
    backend: str = 'torch',
) -> torch.Tensor:
    """Depthwise 2-D cross-correlation, stride 1 (``F.conv2d(x, weight, bias, groups=C)`` with per-side padding).

    Args:
        x: (B, C, H, W) input, NCHW or channels_last memory (the output keeps the input's memory format on the
            Triton path).
        weight: (C, 1, KH, KW) kernel, any KH, KW (e.g. 3x3..9x9, 3x51 strips).
        bias: optional (C,).
        padding: int, (pad_h, pad_w), (top, bottom, left, right) or 'same'/'valid'. Output size is
            ``(H + top + bottom - KH + 1, W + left + right - KW + 1)``.
        group_kernel_sizes: mixed-kernel-size mode (SMT's MHMC). ``G`` sizes, ``G`` dividing C; channel group
            ``g`` uses only the centred ``k_g x k_g`` window of ``weight`` (``KH - k_g`` and ``KW - k_g`` even);
            taps outside it are structural zeros (never read on Triton, zero gradient on both backends).
        group_interleaved: groups are channels ``[g*C/G, (g+1)*C/G)`` (False, head-major) or ``j*G + g``
            (True, SMT's interleaved order). ``G == C`` is a free per-channel map.
        backend: 'torch' or 'triton' (see the module docstring; ``msconv.depthwise_conv2d`` picks one through
            msconv's form gate).
    """
    if backend not in ('triton', 'torch'):
        raise ValueError(
            f"backend must be 'triton' or 'torch' (msconv.depthwise_conv2d chooses between them through "
            f"msconv.layers.forms), got {backend!r}"
        )
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    pads, gks = _check_inputs(x, weight, bias, padding, group_kernel_sizes)
    if backend == 'triton':
        if not HAS_TRITON:
            raise ValueError("backend='triton' needs the triton package, which is not importable")
        if x.dtype not in _TRITON_DTYPES:
            raise ValueError(f"backend='triton' supports float32, float16 and bfloat16 inputs, got {x.dtype}")
        if not (x.device.type == 'cuda' or (x.device.type == 'cpu' and interpreter_active())):
            raise ValueError(
                f"backend='triton' runs on CUDA tensors, or on CPU tensors in Triton's interpreter "
                f"(TRITON_INTERPRET=1 set before triton is imported); got a {x.device.type} tensor "
                f"with the interpreter {'on' if interpreter_active() else 'off'}"
            )
        return _dw_op(x, weight, bias, list(pads), gks, bool(group_interleaved))
    return _reference(x, weight, bias, pads, gks, group_interleaved)
