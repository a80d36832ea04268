"""Triton depthwise-conv kernels against the float64 reference, run in Triton's CPU interpreter.

Not collected by a plain ``pytest`` run (the name does not start with ``test_``): Triton decides at import time
whether it interprets, so ``tests/test_kernels.py::test_triton_kernels_in_interpreter`` runs this file in a
subprocess with ``TRITON_INTERPRET=1``. To run it directly:

    TRITON_INTERPRET=1 PYTHONPATH=src python -m pytest -q tests/triton_interp_cases.py

Tolerances. The kernels accumulate in fp32 and round once to the output dtype, so against the exact (float64)
result of the same rounded inputs every output is within one ulp of its dtype (``rtol = finfo(dtype).eps``,
twice the rounding bound) plus the fp32 accumulation error (``atol = 1e-5``); fp32 uses torch's own fp32
defaults (``rtol = 1.3e-6, atol = 1e-5``).
"""

from __future__ import annotations

import math

import pytest
import torch

from msconv.kernels import depthwise as dw

if not dw.interpreter_active():
    raise RuntimeError("run this file with TRITON_INTERPRET=1 in the environment (see the module docstring)")

B, C, H, W = 2, 8, 9, 11
TOL = {
    torch.float32: dict(rtol=1.3e-6, atol=1e-5),
    torch.float16: dict(rtol=torch.finfo(torch.float16).eps, atol=1e-5),
    torch.bfloat16: dict(rtol=torch.finfo(torch.bfloat16).eps, atol=1e-5),
}


def _inputs(kh, kw, dtype, channels_last, bias, gks=None, interleaved=False, channels=C):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, channels, H, W, generator=g)
    w = torch.randn(channels, 1, kh, kw, generator=g) / math.sqrt(kh * kw)
    if gks is not None:  # zero outside each channel's window, as an MHMC merged kernel is
        w = w * dw._tap_mask(w, gks, interleaved)
    b = torch.randn(channels, generator=g) if bias else None
    x, w = x.to(dtype), w.to(dtype)
    b = b.to(dtype) if b is not None else None
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, w, b


def _check(x, w, b, padding, gks=None, interleaved=False):
    """Triton forward + backward vs the float64 reference on the same (rounded) inputs."""
    dtype = x.dtype
    xs = x.detach().requires_grad_(True)
    ws = w.detach().requires_grad_(True)
    bs = b.detach().requires_grad_(True) if b is not None else None
    y = dw.depthwise_conv2d(xs, ws, bs, padding, gks, interleaved, backend='triton')
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    leaves = [xs, ws] + ([bs] if bs is not None else [])
    grads = torch.autograd.grad(y, leaves, gy)

    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(True) if b is not None else None
    y64 = dw.depthwise_conv2d_reference(x64, w64, b64, padding, gks, interleaved)
    grads64 = torch.autograd.grad(y64, [x64, w64] + ([b64] if b64 is not None else []), gy.double())

    assert y.dtype == dtype and y.shape == y64.shape
    assert y.is_contiguous(memory_format=torch.channels_last) == dw._is_channels_last(x)
    for name, ours, ref in zip(['y', 'grad_x', 'grad_w', 'grad_b'], [y, *grads], [y64, *grads64]):
        assert ours.dtype == dtype, name
        torch.testing.assert_close(ours.double(), ref, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    return grads


@pytest.mark.parametrize('k, channels_last', [(3, False), (5, False), (7, False), (9, False), (3, True), (9, True)])
def test_square(k, channels_last):
    # 4 channels keep the interpreter quick (the channel-block masking is covered by the C = 8 cases)
    _check(*_inputs(k, k, torch.float32, channels_last, bias=k % 4 == 1, channels=4), padding=k // 2)


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize(
    'kh, kw, padding',
    [
        (3, 13, (1, 1, 5, 7)),  # horizontal strip, long axis offsets [-5, 7] (asymmetric footprint)
        (13, 3, (6, 4, 1, 1)),  # vertical strip taller than the 9-row input, offsets [-6, 6] + asymmetric pad
    ],
)
def test_strip_asymmetric(kh, kw, padding, channels_last):
    _check(*_inputs(kh, kw, torch.float32, channels_last, bias=True), padding=padding)


@pytest.mark.parametrize('interleaved, channels_last', [(False, False), (True, True), (True, False)])
def test_mixed_kernel_sizes(interleaved, channels_last):
    gks = (3, 5, 7, 9)
    x, w, b = _inputs(9, 9, torch.float32, channels_last, bias=True, gks=gks, interleaved=interleaved)
    _, gw, _ = _check(x, w, b, 4, gks, interleaved)
    # the taps outside each channel's own window are structural zeros: zero gradient
    outside = dw._tap_mask(w, gks, interleaved) == 0
    assert outside.any() and (gw[outside] == 0).all()


def test_mixed_matches_separate_heads():
    """The mixed mode is MHMC: per head its own k x k conv, outputs in head-major order."""
    gks = (3, 5, 7, 9)
    x, w, b = _inputs(9, 9, torch.float32, False, bias=True, gks=gks)
    y = dw.depthwise_conv2d(x, w, b, 4, gks, backend='triton')
    parts = []
    for i, k in enumerate(gks):
        lo = (9 - k) // 2
        sl = slice(i * C // 4, (i + 1) * C // 4)
        parts.append(
            torch.nn.functional.conv2d(
                x[:, sl], w[sl, :, lo : lo + k, lo : lo + k], b[sl], padding=k // 2, groups=C // 4
            )
        )
    torch.testing.assert_close(y, torch.cat(parts, 1), **TOL[torch.float32])


def test_padding_wider_than_kernel_and_strided_input():
    # padding > K - 1 makes the grad_input correlation crop (negative padding inside); a sliced, non-dense input
    x, w, b = _inputs(3, 5, torch.float32, False, bias=False)
    _check(x, w, b, (3, 0, 5, 1))
    xbig = torch.randn(B, C, H, 2 * W)
    _check(xbig[..., ::2], w, b, (1, 1, 2, 2))


@pytest.mark.parametrize(
    'dtype, kh, kw, padding, gks, interleaved, channels_last',
    [
        (torch.float16, 3, 3, 1, None, False, False),
        (torch.bfloat16, 3, 13, (1, 1, 5, 7), None, False, True),
        (torch.float16, 9, 9, 4, (3, 5, 7, 9), True, True),
        (torch.bfloat16, 9, 9, 4, (3, 5, 7, 9), False, False),
    ],
)
def test_low_precision(dtype, kh, kw, padding, gks, interleaved, channels_last):
    x, w, b = _inputs(kh, kw, dtype, channels_last, bias=True, gks=gks, interleaved=interleaved)
    _check(x, w, b, padding, gks, interleaved)


def test_triton_backend_compiles_as_one_op():
    """backend='triton' under torch.compile(fullgraph): the registered custom op, one Triton call, no graph break."""
    assert dw.triton_available('cpu')
    calls = []
    real = dw._triton_forward

    def counting(*args):
        calls.append(1)
        return real(*args)

    x, w, b = _inputs(9, 9, torch.float32, True, bias=True, gks=(3, 5, 7, 9), interleaved=True)
    f = torch.compile(
        lambda x, w, b: dw.depthwise_conv2d(x, w, b, 4, (3, 5, 7, 9), True, backend='triton'),
        fullgraph=True,
        backend='aot_eager',
    )
    dw._triton_forward = counting
    try:
        y = f(x, w, b)
    finally:
        dw._triton_forward = real
    assert len(calls) == 1
    torch.testing.assert_close(y, dw.depthwise_conv2d_reference(x, w, b, 4, (3, 5, 7, 9), True), **TOL[torch.float32])


def test_gate_runs_triton_eagerly_and_the_reference_in_reference_forms():
    """msconv.depthwise_conv2d asks the form gate: Triton in eager calls (the interpreter makes it available on CPU),
    the PyTorch reference inside reference_forms(); the two agree."""
    from msconv.layers import fast_ops, forms

    calls = []
    real = dw._triton_forward

    def counting(*args):
        calls.append(1)
        return real(*args)

    x, w, b = _inputs(9, 9, torch.float32, False, bias=True, gks=(3, 5, 7, 9), interleaved=True)
    dw._triton_forward = counting
    try:
        y = fast_ops.depthwise_conv2d(x, w, b, 4, (3, 5, 7, 9), True)
        with forms.reference_forms():
            y_ref = fast_ops.depthwise_conv2d(x, w, b, 4, (3, 5, 7, 9), True)
    finally:
        dw._triton_forward = real
    assert len(calls) == 1
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])


def test_int64_indexing_path(monkeypatch):
    """The 64-bit index math (taken for tensors with offsets >= 2**31) computes the same thing."""
    monkeypatch.setattr(dw, '_needs_int64', lambda *tensors: True)
    _check(*_inputs(13, 3, torch.float32, False, bias=True), padding=(6, 4, 1, 1))
    _check(*_inputs(5, 5, torch.float32, True, bias=False, gks=(3, 5), interleaved=True), 2, (3, 5), True)


def test_mixed_block_uniform_channels_last(monkeypatch):
    """Channel blocks inside one group (here 2 channels per block, 2 per group): the scalar-window mode."""
    monkeypatch.setitem(dw.LAUNCH_OVERRIDES, 'fwd', {'nhwc': dict(BR=2, BW=8, BC=2, num_warps=4)})
    monkeypatch.setitem(dw.LAUNCH_OVERRIDES, 'wgrad', {'nhwc': dict(BP=4, BC=2, num_warps=4)})
    gks = (3, 5, 7, 9)
    taps = dw._taps_table((9, 9), gks, C, False, False, torch.device('cpu'))
    assert dw._mixed_mode(taps, 2) == 2 and dw._mixed_mode(taps, 4) == 1 and dw._mixed_mode(None, 2) == 0
    x, w, b = _inputs(9, 9, torch.float32, True, bias=True, gks=gks)
    _, gw, _ = _check(x, w, b, 4, gks)
    assert (gw[dw._tap_mask(w, gks, False) == 0] == 0).all()
