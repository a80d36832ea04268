"""Shared test helpers: the official fixtures in ../shared/fixtures, thread settings, tiny inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('MSCONV_SHARED', REPO.parent / 'shared'))
FIXTURES = SHARED / 'fixtures'

collect_ignore = ["timm_contract"]  # timm's own model tests: run by tests/timm_contract/run.py (make timm-tests)

if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)  # two xdist workers on two cores: no oversubscription


def load_fixture(family: str, name: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Tensors (floating ones cast to float32, as the fixture READMEs prescribe) and the json metadata."""
    from safetensors.torch import load_file

    base = FIXTURES / family / name
    if not base.with_suffix('.safetensors').is_file():
        raise FileNotFoundError(
            f"official fixture {base}.safetensors not found: set MSCONV_SHARED to the folder holding fixtures/"
        )
    tensors = load_file(str(base.with_suffix('.safetensors')))
    tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}
    meta = json.loads(base.with_suffix('.json').read_text())
    return tensors, meta


def official_state_dict(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The ``state_dict.<official key>`` entries of a fixture, with the prefix removed."""
    p = 'state_dict.'
    return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (the engine tests start subprocesses and data workers of their own)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=['blas', 'onednn'])
def gemm(request):
    """Run a test twice: every ``msconv.layers.Linear`` GEMM on BLAS (``F.linear``), then on oneDNN, whatever the
    autotuner would choose (with autograd on too)."""
    from msconv.layers import forms

    with forms.forced_choices(linear=request.param):
        yield request.param


@contextmanager
def onednn_enabled(enabled: bool) -> Iterator[None]:
    """Turn oneDNN on or off for a block (``torch.backends.mkldnn.flags`` would also reset its TF32 flag, which
    warns on builds without Intel GPU support)."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def run_training(
    args: List[str], out: Path, name: str, nproc: int = 1, timeout: int = 300
) -> Tuple[subprocess.CompletedProcess, tuple, List[dict]]:
    """``python -m msconv ARGS --name NAME`` (under ``torchrun --standalone`` with ``nproc`` gloo processes when
    ``nproc > 1``), one OpenMP thread, this checkout's ``src`` first; asserts it exited 0 and returns the process,
    the run folder ``out/NAME``'s last checkpoint (``load_checkpoint``) and its ``metrics.jsonl`` records."""
    from msconv.engine.checkpoint import list_checkpoints, load_checkpoint

    launcher = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc)] if nproc > 1 else []
    proc = subprocess.run(
        [sys.executable, *launcher, '-m', 'msconv', *args, '--name', name],
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / 'src'), OMP_NUM_THREADS='1'),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = out / name
    records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    return proc, load_checkpoint(list_checkpoints(run)[-1]), records


def assert_trained_alike(single: tuple, ddp: tuple, steps: int, atol: float = 1e-6) -> Tuple[dict, dict]:
    """Two ``run_training`` results (checkpoint, records) of the same run, in one process and under torchrun: the
    same step count and weights (1e-5, ``atol``), the same training losses (which moved); returns each run's last
    validation record (single, ddp)."""
    (a, rec_single), (b, rec_ddp) = single, ddp
    assert a[2]['step'] == b[2]['step'] == steps
    for k, v in a[0]['model'].items():
        torch.testing.assert_close(b[0]['model'][k], v, rtol=1e-5, atol=atol, msg=lambda m: f"{k}: {m}")
    tr = {n: [r['loss'] for r in rs if r['kind'] == 'train'] for n, rs in (('single', rec_single), ('ddp', rec_ddp))}
    assert len(tr['single']) == steps and tr['single'][0] != tr['single'][-1]
    assert tr['single'] == pytest.approx(tr['ddp'], rel=1e-5)
    return tuple([r for r in rs if r['kind'] == 'val'][-1] for rs in (rec_single, rec_ddp))


# The options of every config.yaml msconv wrote before each task had its own config section (04fee90 and earlier):
# one flat TrainConfig of 90 fields, whatever the task.
OLD_CONFIG_OPTIONS = (
    'model model_kwargs init_checkpoint task preset data image_size num_workers bad_image_threshold face_val_bins '
    'embedding_size margin margin_s margin_m epochs max_steps batch_size accum_steps opt lr warmup_lr min_lr '
    'lr_base_size weight_decay opt_eps opt_betas sched warmup_epochs clip_grad drop_path smoothing mixup cutmix '
    'mixup_prob mixup_switch_prob mixup_mode auto_augment color_jitter re_prob re_mode re_count hflip scale ratio '
    'interpolation crop_pct device amp amp_dtype channels_last ema ema_decay ema_warmup sync_bn seed deterministic '
    'sparsity arch dense_kwargs det_scales det_max_size det_crop seg_scale seg_ratio_range seg_crop seg_num_classes '
    'seg_reduce_zero_label seg_eval_ms seg_eval_flip eval_max_images norm_eval warmup_iters total_iters '
    'lr_milestones decay_rate output name ckpt_every keep_last resume overwrite eval_every log_every progress '
    'nan_policy plot warmup_prefix per_gpu_batch class_map keep_best'
).split()


def write_old_config(run_dir: Path) -> dict:
    """Rewrite ``run_dir/config.yaml`` as msconv wrote it before the task sections: every one of the 90 options, the
    run's own values and the other tasks' defaults of that time (``arch`` None outside the dense tasks)."""
    import dataclasses

    import yaml

    from msconv.engine import TASKS, TrainConfig

    classes = [TrainConfig] + [t.config_class for t in TASKS.values()]
    defaults = {f.name: dataclasses.asdict(c())[f.name] for c in reversed(classes) for f in dataclasses.fields(c)}
    lost = [name for name in OLD_CONFIG_OPTIONS if name not in defaults]
    assert not lost, f"options of old config.yaml files that no task knows any more: {lost}"
    path = Path(run_dir) / 'config.yaml'
    own = yaml.safe_load(path.read_text())
    old = {}
    for name in OLD_CONFIG_OPTIONS:
        value = own[name] if name in own else (None if name == 'arch' else defaults[name])
        old[name] = list(value) if isinstance(value, tuple) else value
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    return old


@pytest.fixture
def clean_tuner(monkeypatch):
    """The autotuner with no choices, no disk cache and the environment's switches unset."""
    from msconv.layers import forms

    monkeypatch.setattr(forms, '_CHOICES', {})
    monkeypatch.setattr(forms, '_DISK', None)
    monkeypatch.delenv('MSCONV_CACHE_DIR', raising=False)
    monkeypatch.delenv('MSCONV_AUTOTUNE', raising=False)
    yield


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affines, so that a form folding or skipping them would show."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def randomize_shiftwise(module: torch.nn.Module) -> torch.nn.Module:
    """Random BN statistics and affines, layer scales and GRN affines far from their inits (whose zeros and 1e-6
    would hide gradient errors)."""
    randomize_bn(module)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith('ls.gamma') or '.grn.' in f'.{name}':
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return module


def form_step(module: torch.nn.Module, x: torch.Tensor, u: torch.Tensor, reference: bool, seed=None) -> tuple:
    """One forward and the backward of ``(module(x) * u).sum()``, in the plain forms (``reference``) or not:
    the output, the gradients (the input's under ``'input'``) and the floating buffers after (BatchNorm statistics).
    ``seed`` seeds torch's generator first (drop-path masks alike on both sides)."""
    x = x.clone().requires_grad_(True)
    if seed is not None:
        torch.manual_seed(seed)
    from msconv.layers import forms

    with forms.reference_forms(reference):
        y = module(x)
        (y * u).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    buffers = {n: b.clone() for n, b in module.named_buffers() if b.is_floating_point()}
    return y.detach(), dict(grads, input=x.grad), buffers


def graph_names(t: torch.Tensor) -> set:
    """The names of the autograd nodes reachable from ``t`` (which training form built the graph)."""
    names, todo, seen = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names
