"""msconv.kernels.depthwise: argument checks, the PyTorch reference, the backend ``msconv.depthwise_conv2d`` picks
through the form gate, and (in a subprocess under Triton's CPU interpreter) the Triton kernels against the reference
(``tests/triton_interp_cases.py``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from msconv.kernels import depthwise as dw
from msconv.kernels.depthwise import depthwise_conv2d, depthwise_conv2d_reference
from msconv.layers import fast_ops, forms

REPO = Path(__file__).resolve().parents[1]


def _x(c=8, h=9, w=11):
    return torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))


# ---- the reference ---------------------------------------------------------------------------------------------


def test_reference_asymmetric_padding_is_pad_then_valid_conv():
    x, w = _x(), torch.randn(8, 1, 3, 13)
    y = depthwise_conv2d_reference(x, w, None, (1, 1, 5, 7))
    assert y.shape == (2, 8, 9, 11)
    torch.testing.assert_close(y, F.conv2d(F.pad(x, (5, 7, 1, 1)), w, groups=8), rtol=0, atol=0)


@pytest.mark.parametrize('interleaved', [False, True])
def test_reference_mixed_mode_is_per_group_convolutions(interleaved):
    """Each channel group g convolves with the centred k_g x k_g window only (MHMC), in either channel order."""
    gks, C = (3, 5, 7, 9), 8
    x, w, b = _x(C), torch.randn(C, 1, 9, 9), torch.randn(C)
    y = depthwise_conv2d_reference(x, w, b, 4, gks, interleaved)
    for g, k in enumerate(gks):
        idx = torch.arange(g, C, 4) if interleaved else torch.arange(g * 2, g * 2 + 2)
        lo = (9 - k) // 2
        ref = F.conv2d(x[:, idx], w[idx, :, lo : lo + k, lo : lo + k], b[idx], padding=k // 2, groups=len(idx))
        torch.testing.assert_close(y[:, idx], ref)


def test_channel_kernel_sizes_orders():
    assert dw.channel_kernel_sizes((3, 5), 4) == [3, 3, 5, 5]
    assert dw.channel_kernel_sizes((3, 5), 4, interleaved=True) == [3, 5, 3, 5]


@pytest.mark.parametrize(
    'padding, expected',
    [
        (2, (2, 2, 2, 2)),
        ((1, 3), (1, 1, 3, 3)),
        ((0, 1, 2, 3), (0, 1, 2, 3)),
        ('same', (1, 2, 0, 0)),
        ('valid', (0, 0, 0, 0)),
    ],
)
def test_resolve_padding(padding, expected):
    assert dw.resolve_padding(padding, (4, 1)) == expected


# ---- argument checks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'kwargs, match',
    [
        (dict(x=torch.randn(8, 9, 11)), r'x must be a \(B, C, H, W\)'),
        (dict(weight=torch.randn(8, 2, 3, 3)), r'weight must be a depthwise \(C, 1, KH, KW\)'),
        (dict(weight=torch.randn(4, 1, 3, 3)), r'weight must be a depthwise'),
        (dict(bias=torch.randn(4)), r'bias must be None or a \(8,\)'),
        (dict(padding=-1), r'padding must be a non-negative'),
        (dict(padding=(1, 2, 3)), r'padding must be'),
        (dict(padding='full'), r'padding must be'),
        (dict(weight=torch.randn(8, 1, 13, 3), padding=0), r'too small'),
        (dict(group_kernel_sizes=(3, 5, 7)), r'group_kernel_sizes must hold G >= 1 sizes with G dividing'),
        (dict(group_kernel_sizes=(3, 4)), r'centred'),
        (dict(group_kernel_sizes=(3, 11)), r'1 <= k <= min'),
        (dict(weight=torch.randn(8, 1, 3, 3, dtype=torch.float64)), r'share one dtype'),
        (dict(backend='cuda'), r"backend must be 'triton' or 'torch'"),
        (dict(backend='auto'), r"msconv.depthwise_conv2d chooses between them through msconv.layers.forms"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    args = dict(x=_x(), weight=torch.randn(8, 1, 3, 3), bias=None, padding=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        depthwise_conv2d(**args)


# ---- dispatch --------------------------------------------------------------------------------------------------


def _forbid_triton(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the Triton path was taken")

    monkeypatch.setattr(dw, '_triton_forward', boom)


def test_gate_falls_back_to_torch_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(dw, 'interpreter_active', lambda: False)
    _forbid_triton(monkeypatch)
    assert not dw.triton_available('cpu')
    x, w, b = _x(), torch.randn(8, 1, 3, 13), torch.randn(8)
    y = fast_ops.depthwise_conv2d(x, w, b, (1, 1, 5, 7))
    torch.testing.assert_close(y, F.conv2d(F.pad(x, (5, 7, 1, 1)), w, b, groups=8), rtol=0, atol=0)
    with pytest.raises(ValueError, match='TRITON_INTERPRET=1'):
        depthwise_conv2d(x, w, b, (1, 1, 5, 7), backend='triton')


def test_disable_env_var_and_float64_use_torch(monkeypatch):
    monkeypatch.setattr(dw, 'interpreter_active', lambda: True)  # as if the interpreter were on
    monkeypatch.setenv('MSCONV_DISABLE_TRITON', '1')
    assert not dw.triton_available('cpu') and not dw.triton_available('cuda')
    _forbid_triton(monkeypatch)
    x, w = _x(), torch.randn(8, 1, 3, 3)
    torch.testing.assert_close(fast_ops.depthwise_conv2d(x, w, None, 1), F.conv2d(x, w, padding=1, groups=8))
    monkeypatch.setenv('MSCONV_DISABLE_TRITON', '0')
    assert dw.triton_available('cpu') == dw.HAS_TRITON
    x64, w64 = x.double(), w.double()  # float64 never goes to Triton
    torch.testing.assert_close(fast_ops.depthwise_conv2d(x64, w64, None, 1), F.conv2d(x64, w64, padding=1, groups=8))


@pytest.mark.skipif(not dw.HAS_TRITON, reason='triton is not installed')
def test_gate_steps_aside_from_triton_under_captures_and_reference_forms(monkeypatch):
    """msconv.depthwise_conv2d runs Triton only where the gate allows it: with Triton available (as if the
    interpreter were on), eager calls take the Triton path, reference_forms(), FX tracing and compile do not."""
    monkeypatch.setattr(dw, 'interpreter_active', lambda: True)
    monkeypatch.delenv('MSCONV_DISABLE_TRITON', raising=False)
    _forbid_triton(monkeypatch)
    x, w = _x(), torch.randn(8, 1, 3, 3)
    ref = F.conv2d(x, w, padding=1, groups=8)
    with pytest.raises(AssertionError, match='the Triton path was taken'):
        fast_ops.depthwise_conv2d(x, w, None, 1)
    with forms.reference_forms():
        torch.testing.assert_close(fast_ops.depthwise_conv2d(x, w, None, 1), ref)
    with torch.no_grad():
        traced = torch.jit.trace(lambda t: fast_ops.depthwise_conv2d(t, w, None, 1), x, check_trace=False)
        torch.testing.assert_close(traced(x), ref)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: fast_ops.depthwise_conv2d(t, w, None, 1), fullgraph=True, backend='eager')
    torch.testing.assert_close(compiled(x), ref)


@pytest.mark.skipif(dw.interpreter_active(), reason='checks the CPU fallback; under the interpreter it is Triton')
def test_reference_path_compiles_without_graph_break():
    """msconv.depthwise_conv2d on CPU (the gate's decision included) traces into one graph."""
    x = _x().requires_grad_(True)
    w = torch.randn(8, 1, 9, 9, requires_grad=True)
    f = torch.compile(
        lambda x, w: fast_ops.depthwise_conv2d(x, w, None, 4, (3, 5, 7, 9), True), fullgraph=True, backend='aot_eager'
    )
    y = f(x, w)
    y.square().sum().backward()
    outside = dw._tap_mask(w, (3, 5, 7, 9), True) == 0  # 2 channels each of k = 3, 5, 7: 2 * (72 + 56 + 32) taps
    assert int(outside.sum()) == 320 and (w.grad[outside] == 0).all() and (w.grad[~outside] != 0).all()
    torch.testing.assert_close(y, depthwise_conv2d_reference(x, w, None, 4, (3, 5, 7, 9), True))


# ---- the Triton kernels, under the interpreter -----------------------------------------------------------------


@pytest.mark.skipif(not dw.HAS_TRITON, reason='triton is not installed')
def test_triton_kernels_in_interpreter():
    """Runs tests/triton_interp_cases.py in a fresh interpreter with TRITON_INTERPRET=1 (Triton decides at import
    time whether it interprets, so it cannot be switched on inside this process)."""
    env = dict(
        os.environ,
        TRITON_INTERPRET='1',
        PYTHONPATH=os.pathsep.join(
            [str(REPO / 'src')] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else [])
        ),
    )
    env.pop('MSCONV_DISABLE_TRITON', None)
    env.pop('PYTEST_XDIST_WORKER', None)
    proc = subprocess.run(
        [
            sys.executable,
            '-m',
            'pytest',
            '-q',
            '-p',
            'no:cacheprovider',
            '-p',
            'no:xdist',
            str(REPO / 'tests' / 'triton_interp_cases.py'),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = re.search(r'(\d+) passed', out)
    assert passed and int(passed.group(1)) >= 22 and 'failed' not in out and 'skipped' not in out, out[-3000:]


def _nvidia_compiler_available() -> bool:
    if not dw.HAS_TRITON or dw.interpreter_active():
        return False
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401

        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _nvidia_compiler_available(), reason="triton's NVIDIA compiler backend is not available")
@pytest.mark.parametrize(
    'kind, channels_last, mixed, dtype',
    [
        ('fwd', False, 2, 'fp16'),
        ('fwd', True, 0, 'bf16'),
        ('fwd', True, 1, 'fp32'),
        ('wgrad', True, 1, 'fp32'),
        ('wgrad', True, 2, 'bf16'),
        ('wgrad', False, 0, 'fp16'),
    ],
)
def test_kernels_compile_for_sm90_offline(kind, channels_last, mixed, dtype):
    """The interpreter does not run Triton's compiler: build the real GPU binary (ptxas, no GPU needed) at the
    default launch configurations and each MIXED mode (0: all taps, 1: per-channel windows, 2: per-block
    window)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fwd, wgrad = dw._kernels(False)
    if kind == 'fwd':
        fn, ptrs = fwd, dict(x_ptr=dtype, w_ptr=dtype, b_ptr=dtype, y_ptr=dtype, taps_ptr='i32')
        cfg = dw._fwd_config(channels_last, 80, 64 * 56, 56)
        consts = dict(HAS_BIAS=True, MIXED=mixed, INT64=False, BR=cfg['BR'], BW=cfg['BW'], BC=cfg['BC'])
    else:
        fn, ptrs = wgrad, dict(x_ptr=dtype, g_ptr=dtype, pw_ptr='fp32', pb_ptr='fp32', taps_ptr='i32')
        tp = 128 if mixed else 256  # 9x9 -> 81 taps, 3x51 -> 153 taps
        cfg = dw._wgrad_config(channels_last, 80, tp)
        consts = dict(MIXED=mixed, INT64=False, BP=cfg['BP'], BC=cfg['BC'], TP=tp)
    signature = {name: 'i32' for name in fn.arg_names}
    signature.update({name: '*' + t for name, t in ptrs.items()})
    signature.update({name: 'constexpr' for name in consts})
    compiled = triton.compile(
        ASTSource(fn, signature, consts),
        target=GPUTarget('cuda', 90, 32),
        options=dict(num_warps=cfg['num_warps'], enable_fp_fusion=True),
    )
    assert len(compiled.asm['cubin']) > 0


def test_autocast_runs_in_the_autocast_dtype():
    x, w, b = _x(), torch.randn(8, 1, 3, 3), torch.randn(8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = depthwise_conv2d(x, w, b, 1, backend='torch')
        ref = F.conv2d(x, w, b, padding=1, groups=8)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref)
