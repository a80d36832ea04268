"""``msconv.train``: the training loop, built from timm's parts.

timm supplies the optimizer (AdamW, no weight decay on norms/biases/``no_weight_decay()``), the per-step
warm-up + cosine schedule, Mixup/CutMix, label smoothing, RandAugment and random erasing (the transforms), drop
path (inside the models) and ModelEmaV3. This file wires them together with AMP, gradient accumulation,
channels_last, torchrun DDP, crash-safe checkpoints, NaN guards and metric records (CSV, JSONL, curves.png and, with
``tensorboard``, TensorBoard scalars written by rank 0); ``compile`` runs the training forward through
``torch.compile`` (after DDP, as timm's train.py) and ``grad_checkpointing`` asks the task's backbone to recompute its
stages in the backward pass.

Reproducibility: each optimizer step reseeds the Python/numpy/torch generators from ``(seed, rank, step)`` and each
sample is augmented from ``(seed, epoch, index)``, so a run resumed from a mid-epoch checkpoint is bit-identical
to one that never stopped, and a torchrun run sees the same global batches as a single-process run.
"""

from __future__ import annotations

import copy
import math
import os
import random
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from .._extras import require
from ..data.loader import build_loader
from ..data.skips import skipped_files
from ..layers.forms import autotune_choices, restore_autotune_choices
from ..tools.tensorboard_log import TensorBoardWriter
from .build import data_config
from .checkpoint import (
    SKIP_LIST,
    CheckpointError,
    RunWriteError,
    atomic_write_bytes,
    checkpoint_step,
    checkpoint_weights_verify,
    clean_temporaries,
    clear_run,
    get_rng_state,
    holds_run,
    latest_good_checkpoint,
    list_best_checkpoints,
    list_checkpoints,
    load_checkpoint,
    save_best_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from .config import TrainConfig, resolve_config, save_config, split_global_batch
from .distributed import (
    DistInfo,
    check_same_config,
    cleanup_distributed,
    dist_timeout_seconds,
    init_distributed,
    job_failure,
    resolve_device,
    sync_bn_plan,
)
from .evaluate import autocast_context
from .lock import RunLock
from .metrics import MetricsLog, Progress, plot_curves, plots_missing, read_metrics, top1_summary
from .recipes import preset_info
from .sparsity import SparsityScheduler
from .tasks import RunContext, create_task

TENSORBOARD_DIR = 'tensorboard'  # <run>/tensorboard: the event files of --tensorboard

__all__ = ['train', 'NonFiniteLossError']


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf and ``nan_policy='abort'``: no update, EMA or checkpoint was written from it."""


def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**31 - 1)


def _reseed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds the CUDA generators


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> Tuple[Optional[torch.dtype], Optional[str]]:
    """The autocast dtype of this run (None: fp32) and, when it differs from what the config asks for, why.

    'float16' (the official mode of SMT and SCSC: fp16 autocast + GradScaler) needs CUDA; on CPU the run trains
    in fp32 and says so (CPU fp16 autocast is slow or unsupported for many ops, and GradScaler is CUDA-only);
    ``amp_dtype='bfloat16'`` gives bf16 autocast on CPU too."""
    if not cfg.amp:
        return None, None
    if cfg.amp_dtype == 'bfloat16':
        return torch.bfloat16, None
    if cfg.amp_dtype == 'float16':
        if device.type != 'cuda':
            return None, (
                f"amp_dtype 'float16' (fp16 autocast + GradScaler, the official mixed precision) needs CUDA; on "
                f"{device.type} this run trains in fp32 (--amp-dtype bfloat16 for bf16 autocast, --no-amp to silence)"
            )
        return torch.float16, None
    if device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        return torch.float16, None
    return torch.bfloat16, None


class _StopFlag:
    """SIGTERM / Ctrl-C: finish the current step, checkpoint, exit. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _error_kind(e: BaseException) -> type:
    """The built-in class a failure on rank 0 is reported as on the other ranks (the command line prints a
    ValueError or OSError as one line)."""
    return next((k for k in (ValueError, OSError, FloatingPointError) if isinstance(e, k)), RuntimeError)


def _unwrap(model: nn.Module) -> nn.Module:
    return (
        model.module if hasattr(model, 'module') and isinstance(model, nn.parallel.DistributedDataParallel) else model
    )


def train(config: Union[TrainConfig, Mapping[str, Any], str, Path, None] = None, **overrides: Any) -> Dict[str, Any]:
    """Train a model; returns a summary dict (run_dir, final/best top-1, steps, img/s, checkpoint, curves).

    Args:
        config: a ``TrainConfig``, a dict of its fields, or a YAML file path.
        **overrides: fields that take precedence over ``config`` (e.g. ``model='smt_tiny', epochs=10``).

    Under ``torchrun`` every process calls this; rank 0 writes logs and checkpoints.
    """
    cfg = resolve_config(config, overrides)
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    device = resolve_device(cfg.device, local_rank)
    info = init_distributed(device, timeout_s=cfg.dist_timeout)
    try:
        check_same_config(cfg.to_dict(), info)  # before any other collective: a mismatch would put them out of step
        return _Trainer(cfg, device, info).run()
    except RuntimeError as e:
        failure = job_failure(e, info, dist_timeout_seconds(cfg.dist_timeout))
        if failure is None:
            raise
        raise failure from e
    finally:
        cleanup_distributed(info)


class _Trainer:
    def __init__(self, cfg: TrainConfig, device: torch.device, info: DistInfo):
        cfg = split_global_batch(cfg, info.world_size)  # --per-gpu-batch: accumulation makes up the global batch
        self.cfg, self.device, self.info = cfg, device, info
        if cfg.batch_size % info.world_size:
            raise ValueError(
                f"batch_size {cfg.batch_size} must be divisible by the number of processes ({info.world_size})"
            )
        self.local_bs = cfg.batch_size // info.world_size
        name = cfg.name or f"{cfg.model}-{Path(cfg.data).name if cfg.data != 'digits' else 'digits'}"
        self.run_dir = Path(cfg.output) / name
        self.log = MetricsLog(self.run_dir)
        self.lock: Optional[RunLock] = None
        self.task = create_task(cfg)
        self.tensorboard = None  # rank 0's TensorBoardWriter with cfg.tensorboard, once the run is prepared
        self.plotting = cfg.plot  # False when matplotlib is missing (said once)

    # ---------------------------------------------------------------------------------------------- setup
    def _print(self, msg: str) -> None:
        if self.info.is_main:
            if getattr(self, 'progress', None) is not None:
                self.progress.print(msg)
            else:
                print(msg, flush=True)

    def _build(self) -> None:
        cfg, device = self.cfg, self.device
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.amp_dtype, amp_note = _amp_dtype(cfg, device)
        if amp_note:
            self._print(amp_note)
        # Data first: the number of classes sizes the classifier.
        self.num_classes = self.task.num_classes()
        model = self.task.build_model(self.num_classes)
        self.data_cfg = data_config(self.task.backbone(model), cfg)
        self.train_set, self.val_set = self.task.build_datasets(self.data_cfg)
        self._setup_skips()  # refuses a split past bad_image_threshold before step 1
        convert, note = sync_bn_plan(cfg.sync_bn, device, self.info.world_size)
        if note:
            self._print(note)
        if convert:
            model = self.task.convert_sync_batchnorm(model)
        if cfg.grad_checkpointing:
            self.task.set_grad_checkpointing(model, True)
        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.n_params = sum(p.numel() for p in self.task.backbone(model).parameters())

        gen_seed = cfg.seed
        self.train_loader, self.train_sampler = build_loader(
            self.train_set,
            self.local_bs,
            shuffle=True,
            seed=gen_seed,
            num_workers=cfg.num_workers,
            world_size=self.info.world_size,
            rank=self.info.rank,
            drop_last=True,
            pin_memory=device.type == 'cuda',
            collate_fn=self.task.collate_fn,
        )
        self.val_loader = None
        if self.val_set is not None:
            self.val_loader, _ = build_loader(
                self.val_set,
                self.local_bs,
                shuffle=False,
                seed=gen_seed,
                num_workers=cfg.num_workers,
                world_size=self.info.world_size,
                rank=self.info.rank,
                pin_memory=device.type == 'cuda',
                collate_fn=self.task.collate_fn,
            )
        micro_per_epoch = len(self.train_set) // self.info.world_size // self.local_bs
        self.steps_per_epoch = micro_per_epoch // cfg.accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"batch_size {cfg.batch_size} x accum_steps {cfg.accum_steps} is larger than the training set "
                f"({len(self.train_set)} images): lower batch_size or accum_steps"
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)

        # Optimizer and schedule (timm). LRs are per lr_base_size images, scaled linearly to the global batch.
        scale = 1.0 if cfg.lr_base_size is None else cfg.batch_size * cfg.accum_steps / cfg.lr_base_size
        self.lr, warmup_lr, min_lr = cfg.lr * scale, cfg.warmup_lr * scale, cfg.min_lr * scale
        opt_kwargs = dict(eps=cfg.opt_eps, betas=tuple(cfg.opt_betas)) if 'adam' in cfg.opt.lower() else {}
        try:
            self.optimizer = create_optimizer_v2(
                self.task.param_groups(model),
                opt=cfg.opt,
                lr=self.lr,
                weight_decay=cfg.weight_decay,
                **opt_kwargs,
            )
        except (AssertionError, ValueError) as e:
            raise ValueError(f"opt {cfg.opt!r}: {e}") from e
        # warmup_prefix: the cosine covers the epochs after the warm-up (timm, SMT); without it the cosine spans all
        # epochs and the warm-up replaces its start (SCSC: timm CosineLRScheduler(t_initial=all steps, warmup_t)).
        warmup = cfg.warmup_epochs  # validated < epochs
        sched_kwargs = dict(
            sched=cfg.sched,
            num_epochs=cfg.epochs - warmup if cfg.warmup_prefix else cfg.epochs,
            warmup_epochs=warmup,
            warmup_lr=warmup_lr,
            min_lr=min_lr,
            warmup_prefix=cfg.warmup_prefix,
            step_on_epochs=False,
            updates_per_epoch=self.steps_per_epoch,
        )
        # task hook: iteration-based recipes (e.g. ADE20K 160k) change the schedule's length and shape
        sched_kwargs, self.total_steps = self.task.schedule(sched_kwargs, self.total_steps, self.steps_per_epoch)
        self.scheduler, _ = create_scheduler_v2(self.optimizer, **sched_kwargs)
        self.scaler = torch.amp.GradScaler('cuda', enabled=self.amp_dtype == torch.float16)

        self.task.build_criterion(self.num_classes)

        self.ema = None
        if cfg.ema:
            self.ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup, device=device)

        self.sparsity = None
        if cfg.sparsity:
            self.sparsity = self._build_sparsity(cfg.sparsity)

        self.ddp_model = model
        if self.info.enabled:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == 'cuda' else None, find_unused_parameters=False
            )
        if cfg.compile:  # the training forward only: evaluation, EMA and checkpoints use the plain self.model
            self.ddp_model = torch.compile(self.ddp_model)

    def _build_sparsity(self, options: Dict[str, Any]):
        options = dict(options)
        options.setdefault('seed', self.cfg.seed)
        try:
            return SparsityScheduler(
                self.model, total_steps=max(self.total_steps, 1), optimizer=self.optimizer, **options
            )
        except TypeError as e:
            raise ValueError(f"sparsity: bad option in {options}: {e}") from e

    @torch.no_grad()
    def _broadcast_scores(self, scores: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if not self.info.enabled:
            return scores
        dev = self.device if self.device.type == 'cuda' else torch.device('cpu')
        for name in sorted(scores):
            t = scores[name].to(dev)
            dist.broadcast(t, src=0)
            scores[name] = t.cpu()
        return scores

    def _snip_init(self) -> None:
        """The official SNIP initialisation of the sparsity masks: one training batch (epoch 0's first, before
        Mixup), plain cross-entropy on a deep copy of the model in fp32, ``|w * grad|`` scores (rank 0's, shared
        with every rank so that all draw the same masks) -> per-layer densities -> random masks."""
        self.train_sampler.set_epoch(0)
        self.train_loader.dataset.set_epoch(0)
        self.train_sampler.set_start(0)
        x, y = next(iter(self.train_loader))
        x, y = x.to(self.device), y.to(self.device)
        net = copy.deepcopy(self.model)
        net.train()
        net.zero_grad(set_to_none=True)
        with torch.enable_grad():
            out = self.task.forward(net, x, y)
            self.task.plain_loss(out, y).backward()
        scores = self._broadcast_scores(self.sparsity.snip_scores(net))
        del net
        self.sparsity.init_from_scores(scores)
        dense = f"; dense (>= 0.99): {len(self.sparsity.dense_layers)} layer(s)" if self.sparsity.dense_layers else ''
        self._print(
            f"sparsity: SNIP init over {len(self.sparsity._all_layers)} layer(s), sparsity "
            f"{self.sparsity.sparsity():.3f} (target {self.sparsity.target}){dense}"
        )

    def _recipe_lines(self) -> str:
        cfg = self.cfg
        info = preset_info(cfg.model, cfg.preset, getattr(cfg, 'arch', None))
        kind = 'official' if info['official'] else 'NOT an official recipe'
        glob = cfg.batch_size * cfg.accum_steps
        per = f"{self.local_bs} per process x {self.info.world_size} process(es) x accumulation {cfg.accum_steps}"
        base = 'absolute' if cfg.lr_base_size is None else f"{cfg.lr:g} per {cfg.lr_base_size}"
        scale = 1.0 if cfg.lr_base_size is None else glob / cfg.lr_base_size
        if self.amp_dtype is None:
            amp = 'fp32'
        else:
            amp = {torch.float16: 'fp16 + GradScaler', torch.bfloat16: 'bf16'}[self.amp_dtype]
        sched = 'prefix' if cfg.warmup_prefix else 'inside the cosine'
        sp = ''
        if cfg.sparsity:
            sp = ', sparsity ' + ' '.join(f"{k}={v}" for k, v in cfg.sparsity.items())
        own = self.task.recipe_line()
        runtime = (', torch.compile' if cfg.compile else '') + (
            ', grad checkpointing' if cfg.grad_checkpointing else ''
        )
        return (
            f"recipe: preset {cfg.preset!r} for {cfg.model} ({kind}; based on {info['based_on']})\n"
            f"  epochs {cfg.epochs}, global batch {glob} ({per}), lr {self.lr:.4g} ({base}), warm-up "
            f"{cfg.warmup_epochs:g} epochs from {cfg.warmup_lr * scale:.4g} ({sched}), min lr "
            f"{cfg.min_lr * scale:.4g}, {cfg.sched}, image {self.data_cfg['size']}\n"
            f"  {cfg.opt} wd {cfg.weight_decay:g} eps {cfg.opt_eps:g} betas {tuple(cfg.opt_betas)}, clip "
            f"{cfg.clip_grad}, drop path {cfg.drop_path:g}, hflip {cfg.hflip:g}, ema {cfg.ema}, precision {amp}, "
            f"sync_bn {cfg.sync_bn}{sp}{runtime}" + (f"\n  {self.task.name}: {own}" if own else '')
        )

    # ------------------------------------------------------------------------------------------- checkpoints
    def _state(self, step: int, epoch: int) -> Dict[str, Any]:
        state = {
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(),
            'scaler': self.scaler.state_dict(),
            'rng': get_rng_state(),
            'step': step,
            'epoch': epoch,
            # the forms the autotuner chose so far: a resumed run runs the same ones (bit-identical continuation)
            'autotune': autotune_choices(),
        }
        if self.sparsity is not None:
            state['sparsity'] = self.sparsity.state_dict()
        return state

    def _save(self, step: int, epoch: int, reason: str) -> Optional[Path]:
        return self._on_main(self._write_checkpoint, step, epoch, reason)

    def _ensure_run_dir(self) -> None:
        """Refuse to write into a run folder that vanished while the run was writing it (deleted, unmounted):
        recreating it would start a second, partial history beside whatever lock another process took since."""
        if not self.run_dir.is_dir():
            raise RunWriteError(
                f"run folder {str(self.run_dir)!r} is gone (deleted or unmounted while this run was writing it); "
                f"nothing more is written"
            )

    def _append(self, rec: Dict[str, Any]) -> None:
        self._ensure_run_dir()
        self.log.append(rec)
        if self.tensorboard is not None:
            self.tensorboard.write(rec)
            if rec.get('kind') == 'val':
                self.tensorboard.flush()

    def _open_tensorboard(self, step: int) -> None:
        """Rank 0's TensorBoard writer in ``<run>/tensorboard``. Resumed at ``step``: the events a crashed run wrote
        past it are purged (``purge_step``, as ``metrics.jsonl`` is cut back); a run that turns ``tensorboard`` on
        at a resume first gets the records it kept."""
        log_dir = self.run_dir / TENSORBOARD_DIR
        earlier = step > 0 and not log_dir.is_dir()
        self.tensorboard = TensorBoardWriter(log_dir, purge_step=step + 1 if step > 0 else None)
        if earlier:
            self.tensorboard.write_all(read_metrics(self.run_dir))
            self.tensorboard.flush()

    def _save_config(self) -> None:
        self._ensure_run_dir()
        save_config(self.cfg, self.run_dir / 'config.yaml')

    def _write_checkpoint(self, step: int, epoch: int, reason: str) -> Path:
        self._ensure_run_dir()
        weights = self.task.checkpoint_weights(self.model, self.ema.module if self.ema is not None else None)
        meta = {
            'epoch': epoch,
            'reason': reason,
            'model': self.cfg.model,
            'steps_per_epoch': self.steps_per_epoch,
            'config': self.cfg.to_dict(),
            'last_eval': self.last_eval,
        }
        path = save_checkpoint(
            self.run_dir, step, weights, self._state(step, epoch), meta, keep_last=self.cfg.keep_last
        )
        self.last_checkpoint = path
        if self.tensorboard is not None:
            self.tensorboard.flush()
        if self.plotting:
            self._plot()
        return path

    def _prepare_run_dir(self) -> Optional[tuple]:
        """Decide, before anything is written, which run this is; returns the checkpoint to resume or None.

        A new run never writes into a folder that holds another run (``overwrite`` replaces it); ``resume='auto'``
        continues the run in ``run_dir`` from its newest valid checkpoint and refuses when it has none (unless
        ``overwrite``) or when it is a run of another model or task; ``resume=PATH`` continues the run that
        checkpoint belongs to, and only that one. The folder is locked (``msconv.engine.lock``) before it is read
        when it exists, else once it is created: a second process meets a refusal.
        """
        cfg = self.cfg
        if cfg.resume not in (None, 'auto'):
            self._resume_owner(Path(cfg.resume))
        self._on_main(self._lock_run_dir, False)
        run_dir = self.run_dir
        hint = (
            "pass --resume auto to continue it, --overwrite to replace it, or --name NAME for a new run "
            "(Python: resume='auto' / overwrite=True / name=...)"
        )
        found = None
        if cfg.resume is None:
            if holds_run(run_dir) and not cfg.overwrite:
                raise ValueError(f"run folder {str(run_dir)!r} already holds a run; {hint}")
        elif cfg.resume == 'auto':
            checkpoints = list_checkpoints(run_dir)
            found = latest_good_checkpoint(run_dir)
            if found is None and holds_run(run_dir) and not cfg.overwrite:
                what = (
                    f"its checkpoints {[p.name for p in checkpoints]} are all corrupt"
                    if checkpoints
                    else "it has metrics or a config but no checkpoint"
                )
                raise ValueError(
                    f"resume: no valid checkpoint in run folder {str(run_dir)!r} ({what}); pass --overwrite to "
                    f"start this run afresh (its history is replaced), or --resume PATH to a good checkpoint"
                )
        else:
            path = Path(cfg.resume)
            if self._resume_owner(path) is None and holds_run(run_dir) and not cfg.overwrite:
                raise ValueError(
                    f"resume: {str(path)!r} is not in a run folder, and run folder {str(run_dir)!r} "
                    f"already holds another run; pass --overwrite to replace it, or --name NAME"
                )
            found = self._load_resume_checkpoint(path)
        if found is not None:
            self._check_same_run(found)
        self._on_main(self._lock_run_dir, True)
        if cfg.overwrite and found is None:
            self._on_main(self._clear_run_dir)
        return found

    def _resume_owner(self, path: Path) -> Optional[Path]:
        """The run folder the checkpoint ``path`` (given to ``resume``) belongs to, made this run's folder; None
        for a checkpoint outside a run folder. Refuses a path that does not exist and a checkpoint of another
        run folder than the one ``name`` asks for."""
        cfg = self.cfg
        if not path.exists():
            raise ValueError(
                f"resume: {str(path)!r} does not exist (expected 'auto', a run folder or a "
                f"<run>/checkpoints/step-N folder)"
            )
        owner = (
            path
            if (path / 'checkpoints').is_dir()
            else (path.parent.parent if path.parent.name == 'checkpoints' else None)
        )
        if owner is not None and owner.resolve() != self.run_dir.resolve():
            if cfg.name is not None:
                raise ValueError(
                    f"resume: checkpoint {str(path)!r} belongs to run folder {str(owner)!r}, not to "
                    f"{str(self.run_dir)!r} (--name {cfg.name}); continue that run with --name {owner.name} --output "
                    f"{owner.parent}, or start a new run from its weights with --init-checkpoint"
                )
            self.run_dir = owner
            self.log = MetricsLog(owner)
        return owner

    def _lock_run_dir(self, create: bool) -> None:
        """Hold the run folder's lock (rank 0): once it exists (``create``: making it)."""
        if self.lock is not None:
            return
        if not create and not self.run_dir.is_dir():
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(self.run_dir)
        lock.acquire()
        self.lock = lock

    def _clear_run_dir(self) -> None:
        if holds_run(self.run_dir):
            clear_run(self.run_dir)
            self._print(f"overwrite: removed the previous run's checkpoints, metrics and config in {self.run_dir}")

    def _clean_leftovers(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for p in clean_temporaries(self.run_dir):
            self._print(f"removed {p} (left by an interrupted run)")

    def _check_same_run(self, found: tuple) -> None:
        """Refuse to resume a checkpoint of another model or task (its weights cannot load into this one)."""
        path, meta = found[0], found[3]
        theirs = {'model': meta.get('model'), 'task': (meta.get('config') or {}).get('task')}
        ours = {'model': self.cfg.model, 'task': self.cfg.task}
        differ = [k for k in ('model', 'task') if theirs[k] is not None and theirs[k] != ours[k]]
        if differ:
            what = ', '.join(f"{k} {theirs[k]!r}" for k in differ)
            asked = ', '.join(f"{k} {ours[k]!r}" for k in differ)
            raise ValueError(
                f"resume: {str(path)!r} is a checkpoint of a run of {what}, not of {asked}: continue that run with "
                f"the same {' and '.join(differ)}, or start a new run with --name NAME (or --overwrite to replace it)"
            )

    def _load_resume_checkpoint(self, path: Path) -> tuple:
        if (path / 'checkpoints').is_dir():  # a run folder
            found = latest_good_checkpoint(path)
            if found is None:
                raise ValueError(f"resume: run folder {str(path)!r} holds no valid checkpoint")
            return found
        try:
            return (path, *load_checkpoint(path))
        except CheckpointError as e:
            self._print(f"resume: {e}")
            older = [
                p for p in list_checkpoints(path.parent.parent) if path.name.startswith('step-') and p.name < path.name
            ]
            for p in reversed(older):
                try:
                    found = (p, *load_checkpoint(p))
                    break
                except CheckpointError as e2:
                    self._print(f"resume: {e2}")
            else:
                raise ValueError(f"resume: {e}; and no earlier valid checkpoint was found") from e
            self._print(f"resume: falling back to the previous valid checkpoint {found[0]}")
            return found

    def _resume(self, found: Optional[tuple]) -> int:
        cfg = self.cfg
        if found is None:
            if cfg.resume == 'auto':
                self._print(f"resume: no checkpoint yet in {self.run_dir}, starting a new run")
            return 0
        path, weights, state, meta = found
        try:
            self.task.load_checkpoint_weights(self.model, self.ema.module if self.ema is not None else None, weights)
            self.optimizer.load_state_dict(state['optimizer'])
        except (RuntimeError, ValueError, KeyError) as e:  # another number of classes, other model_kwargs
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"resume: the weights of {str(path)!r} do not fit this run's {self.cfg.model!r} ({first}); resume "
                f"with the run's own options (its config.yaml), or start a new run with --name NAME"
            ) from e
        # The schedule is the config's (built from this command's options; timm's scheduler state would keep the
        # checkpoint's length): with unchanged options it is the same, changed ones are announced below.
        self.scaler.load_state_dict(state['scaler'])
        if self.sparsity is not None and 'sparsity' in state:
            self.sparsity.load_state_dict(state['sparsity'])
        set_rng_state(state['rng'])
        restore_autotune_choices(state.get('autotune') or {})
        step = int(state['step'])
        if meta.get('steps_per_epoch') not in (None, self.steps_per_epoch):
            raise ValueError(
                f"resume: checkpoint {str(path)!r} was made with {meta['steps_per_epoch']} steps per epoch, this run "
                f"has {self.steps_per_epoch}; keep batch_size, accum_steps and the data identical to resume"
            )
        self.last_eval = meta.get('last_eval')
        self._print(f"resumed from {path} (step {step}, {self._epoch_label(step)})")
        self._announce_changes(meta.get('config') or {}, state, step)
        self._on_main(self._drop_later_checkpoints, step)
        return step

    def _drop_later_checkpoints(self, step: int) -> None:
        """Checkpoints later than the resumed ``step`` are corrupt or from an abandoned continuation: none may
        outrank it. A corrupt one whose weights still verify is set aside as ``damaged-step-N`` (nothing lost), the
        others are removed; the metrics past ``step`` go."""
        for later in [p for p in list_checkpoints(self.run_dir) if checkpoint_step(p) > step]:
            try:
                load_checkpoint(later)
                valid = True
            except CheckpointError:
                valid = False
            if not valid and checkpoint_weights_verify(later):
                kept = later.with_name(f"damaged-{later.name}")
                shutil.rmtree(kept, ignore_errors=True)
                os.replace(later, kept)
                self._print(
                    f"resume: {later.name} cannot be resumed but its weights verify: kept as {kept} (msconv eval "
                    f"--checkpoint {kept / 'model.safetensors'}); continuing from step {step}"
                )
            else:
                shutil.rmtree(later, ignore_errors=True)
                self._print(f"resume: removed {later} (later than the resumed step {step})")
        self.log.truncate_after(step)

    # options that change how a run is watched or where it runs, not what it computes
    _RUN_CONTROL = {
        'resume',
        'overwrite',
        'progress',
        'log_every',
        'plot',
        'tensorboard',
        'compile',
        'grad_checkpointing',
        'num_workers',
        'device',
        'dist_timeout',
        'output',
        'name',
        'ckpt_every',
        'keep_last',
        'keep_best',
    }

    def _announce_changes(self, theirs: Dict[str, Any], state: Dict[str, Any], step: int) -> None:
        """One line naming the options this command changes from the checkpoint's run (the run continues with the
        new values; the learning-rate schedule is recomputed from them) and, when it moves, the learning rate of
        the next step before and after."""
        ours = self.cfg.to_dict()
        changed = [
            f"{k} {theirs[k]!r} -> {v!r}"
            for k, v in ours.items()
            if k in theirs and k not in self._RUN_CONTROL and theirs[k] != v
        ]
        if not changed:
            return
        saved_lr = ((state.get('optimizer') or {}).get('param_groups') or [{}])[0].get('lr')
        self.scheduler.step_update(num_updates=step)
        new_lr = self.optimizer.param_groups[0]['lr']
        lr = ''
        if saved_lr is not None and not math.isclose(saved_lr, new_lr, rel_tol=1e-9):
            lr = f"; the learning rate of step {step + 1} becomes {new_lr:.4g} (was {saved_lr:.4g})"
        self._print(
            f"resume: options changed since the checkpoint: {', '.join(changed)}; the run continues with the new "
            f"values and the schedule they give{lr}"
        )

    def _epoch_label(self, step: int) -> str:
        """1-based everywhere: 'epoch 2' once epoch 2 is complete, 'epoch 3 (4/6 steps)' while it runs."""
        done, offset = divmod(step, self.steps_per_epoch)
        return f"epoch {done}" if offset == 0 else f"epoch {done + 1} ({offset}/{self.steps_per_epoch} steps)"

    def _plot(self) -> None:
        try:
            plot_curves(read_metrics(self.run_dir), self.run_dir / 'curves.png', title=self.cfg.model)
            self.curves = self.run_dir / 'curves.png'
        except Exception as e:  # plotting must never stop training
            self._print(f"warning: could not draw curves.png: {e}")

    def _track_best(self, rec: Dict[str, Any], step: int) -> None:
        """Record the last and the best (highest top-1, the first such) evaluation; keep the best weights."""
        if rec.get('top1') is None:
            return
        self.last = {'top1': rec['top1'], 'step': step, 'epoch': step / self.steps_per_epoch}
        if self.best is not None and rec['top1'] <= self.best['top1']:
            return
        self.best = dict(self.last)
        if self.cfg.keep_best:
            path = self._on_main(self._write_best, step, rec)
            if path is not None:
                self.best['checkpoint'] = str(path)

    def _write_best(self, step: int, rec: Dict[str, Any]) -> Path:
        self._ensure_run_dir()
        weights = self.task.checkpoint_weights(self.model, self.ema.module if self.ema is not None else None)
        meta = {
            'epoch': self.best['epoch'],
            'top1': rec['top1'],
            'model': self.cfg.model,
            'config': self.cfg.to_dict(),
            'eval': rec,
        }
        return save_best_checkpoint(self.run_dir, step, weights, meta)

    def _restore_best(self, step: int) -> None:
        """After a resume at ``step``: last/best from the kept metrics; best folders of the abandoned future go."""
        summary = top1_summary(read_metrics(self.run_dir), self.steps_per_epoch, up_to_step=step)
        self.last, self.best = summary['last'], summary['best']
        if self.info.is_main:
            for p in list_best_checkpoints(self.run_dir):
                if int(p.name.split('-')[-1]) > step:
                    shutil.rmtree(p, ignore_errors=True)
                elif self.best is not None and int(p.name.split('-')[-1]) == self.best['step']:
                    self.best['checkpoint'] = str(p)

    # --------------------------------------------------------------------------------------------- evaluation
    def _evaluate(self, step: int, epoch: float) -> Dict[str, Any]:
        rec: Dict[str, Any] = {'kind': 'val', 'step': step, 'epoch': epoch}
        ctx = RunContext(
            self.device,
            self.amp_dtype,
            self.cfg.channels_last,
            self.info.world_size,
            self.info.rank,
            self.local_bs,
            self._print,
        )
        rec.update(
            self.task.evaluate(self.model, self.ema.module if self.ema is not None else None, self.val_loader, ctx)
        )
        self._sync_skips('val')
        if 'val' in self.skips:
            rec.update(self.skips['val'].metrics())
        rec['time'] = time.time()
        self._on_main(self._append, rec)
        self.last_eval = rec
        self._track_best(rec, step)
        return rec

    def _evaluate_and_report(self, step: int) -> None:
        summary = self.task.summary(self._evaluate(step, step / self.steps_per_epoch))
        if summary:
            self._print(f"{self._epoch_label(step)}: {summary}")

    # --------------------------------------------------------------------------------------------- the loop
    def _any_rank(self, flag: bool) -> bool:
        return self._max_rank(1 if flag else 0) > 0

    def _max_rank(self, value: int) -> int:
        """The largest of the ranks' ``value`` (this process's own without torchrun)."""
        if not self.info.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device if self.device.type == 'cuda' else 'cpu')
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _on_main(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` on rank 0 only (a write to the run folder); returns its result (None on other ranks).

        Under torchrun every rank learns whether it failed and stops with it: rank 0 raises its error, the others
        one line naming it (an error of the same kind), instead of waiting in their next collective for the
        process-group timeout."""
        result, error = None, None
        if self.info.is_main:
            try:
                result = fn(*args)
            except Exception as e:
                error = e
        if self.info.enabled:
            box = [None if error is None else (_error_kind(error), str(error))]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None and not self.info.is_main:
                kind, message = box[0]
                raise kind(f"rank {self.info.rank} stops: rank 0 failed: {message}")
        if error is not None:
            raise error
        return result

    # --------------------------------------------------------------------------------------------- unusable data
    def _setup_skips(self) -> None:
        """Each split's account of the files and annotations it cannot use (``msconv.data.skips``), under the run's
        ``bad_image_threshold``: its notes go to the log, and a split already past the threshold (files that are not
        images, unusable annotations) is refused here, before step 1."""
        self.skips = {}
        for split, dataset in (('train', self.train_set), ('val', self.val_set)):
            skips = skipped_files(dataset) if dataset is not None else None
            if skips is None:  # the bundled digits
                continue
            skips.threshold = self.cfg.bad_image_threshold
            self.skips[split] = skips
            for note in skips.notes:
                self._print(f"data ({split}): {note}")
        self._synced = {split: -1 for split in self.skips}
        for split in self.skips:
            self._sync_skips(split)

    def _sync_skips(self, split: str) -> None:
        """Count what every rank found unusable in ``split`` (the union: each file once, whichever rank met it),
        rewrite the run folder's ``skipped.tsv``, and refuse past the threshold (the same message on every rank).
        Collective under torchrun; the marks are reduced only when some rank found something new."""
        skips = self.skips.get(split)
        if skips is None:
            return
        found = int(torch.count_nonzero(skips.marks))
        changed = found != self._synced[split]
        if self.info.enabled:
            if not self._any_rank(changed):
                return
            # a copy: DataLoader workers may mark an item in the shared table while it is reduced
            marks = skips.marks.to(self.device if self.device.type == 'cuda' else 'cpu', copy=True)
            dist.all_reduce(marks, op=dist.ReduceOp.MAX)
            skips.merge(marks)
            found = int(torch.count_nonzero(skips.marks))
        elif not changed:
            return
        self._synced[split] = found
        self._on_main(self._write_skip_list)
        skips.check(split)

    def _write_skip_list(self) -> None:
        """``<run>/skipped.tsv``: every file and annotation the run could not use so far, and the notes (removed
        when there are none)."""
        rows = [
            f"{split}\t{kind}\t{name}\t{reason}"
            for split, skips in self.skips.items()
            for name, reason, kind in skips.entries()
        ]
        rows += [f"{split}\tnote\t\t{note}" for split, skips in self.skips.items() for note in skips.notes]
        path = self.run_dir / SKIP_LIST
        if not rows:
            path.unlink(missing_ok=True)
            return
        self._ensure_run_dir()
        text = 'split\tkind\tname\treason\n' + ''.join(r.replace('\n', ' ') + '\n' for r in rows)
        atomic_write_bytes(path, text.encode())

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast_context(self.device, self.amp_dtype is not None, self.amp_dtype):
            out = self.task.forward(self.ddp_model, x, y)
        return self.task.loss(out, y)

    @torch.no_grad()
    def _restore_buffers(self, saved: Dict[str, torch.Tensor]) -> None:
        for n, b in self.model.named_buffers():
            b.copy_(saved[n])

    def _optimizer_step(self, step: int, batches) -> Dict[str, Any]:
        """One optimizer update over ``accum_steps`` micro-batches. Returns loss and whether it was applied."""
        cfg = self.cfg
        _reseed(_step_seed(cfg.seed, self.info.rank, step))
        self.optimizer.zero_grad(set_to_none=True)
        # BatchNorm statistics move during the forward pass; a skipped step puts them back.
        buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        total_loss = 0.0
        n_images = 0
        for i, (x, y) in enumerate(batches):
            x, y = self.task.to_device(x, y, self.device, cfg.channels_last)  # task hook (lists for detection)
            x, y = self.task.prepare_batch(x, y)
            n_images += len(x)
            last = i == cfg.accum_steps - 1
            sync = nullcontext() if (last or not self.info.enabled) else self.ddp_model.no_sync()
            with sync:
                loss = self._forward_loss(x, y)
                bad = self._any_rank(not bool(torch.isfinite(loss.detach()).item()))
                if bad:
                    self._restore_buffers(buffers)
                    return {
                        'applied': False,
                        'loss': float(loss.detach().item()),
                        'images': n_images,
                        'reason': 'non-finite loss',
                    }
                self.scaler.scale(loss / cfg.accum_steps).backward()
            total_loss += float(loss.detach().item()) / cfg.accum_steps
        if self.info.enabled:  # log the global-batch loss, not rank 0's share
            t = torch.tensor([total_loss], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            total_loss = t.item() / self.info.world_size
        grad_norm = None
        if cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad))
            if not math.isfinite(grad_norm) and self.amp_dtype != torch.float16:
                self._restore_buffers(buffers)
                return {'applied': False, 'loss': total_loss, 'images': n_images, 'reason': 'non-finite gradient'}
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        applied = scale_before is None or self.scaler.get_scale() >= scale_before
        if self.sparsity is not None:  # after every optimizer step, AMP included
            self.sparsity.step()
        if applied:
            if self.ema is not None:
                self.ema.update(self.model, step=step + 1)
        return {
            'applied': applied,
            'loss': total_loss,
            'images': n_images,
            'grad_norm': grad_norm,
            'reason': None if applied else 'fp16 overflow (scaler)',
        }

    def run(self) -> Dict[str, Any]:
        self.progress = None
        self.last_eval = None
        self.last_checkpoint = None
        self.curves = None
        self.best = self.last = None
        try:
            return self._run()
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
            if self.lock is not None:
                self.lock.release()

    def _run(self) -> Dict[str, Any]:
        cfg = self.cfg
        if cfg.tensorboard:  # before anything is written: one line naming the extra
            require('tensorboard', 'TensorBoard logging (tensorboard / --tensorboard)')
        missing = plots_missing() if cfg.plot else None
        if missing:  # said once; the run goes on without curves.png
            self._print(f"{missing}; the run goes on without it")
            self.plotting = False
        found = self._prepare_run_dir()
        self._on_main(self._clean_leftovers)
        self._build()
        step = self._resume(found)
        self._print(self._recipe_lines())
        if found is not None:
            self._restore_best(step)
        elif self.sparsity is not None and self.sparsity.init == 'snip' and step == 0:
            self._snip_init()
        self._on_main(self._save_config)
        if cfg.tensorboard:
            self._on_main(self._open_tensorboard, step)
        stop = _StopFlag()
        stop.install()
        self.progress = Progress(
            self.total_steps,
            step,
            enabled=cfg.progress and self.info.is_main,
            description=cfg.model,
            every=cfg.log_every,
        )
        status = 'finished'
        train_time, train_images, skipped = 0.0, 0, 0
        window_loss, window_n, window_t0, window_img = 0.0, 0, time.perf_counter(), 0
        try:
            self.scheduler.step_update(num_updates=step)
            while step < self.total_steps:
                epoch, offset = divmod(step, self.steps_per_epoch)
                self.train_sampler.set_epoch(epoch)
                self.train_loader.dataset.set_epoch(epoch)
                self.train_sampler.set_start(offset * cfg.accum_steps * self.local_bs)
                self.ddp_model.train()
                it = iter(self.train_loader)
                end = min(self.steps_per_epoch, offset + self.total_steps - step)
                for _ in range(offset, end):
                    t0 = time.perf_counter()
                    lr = self.optimizer.param_groups[0]['lr']  # the rate this step runs with (its record's 'lr')
                    batches = [next(it) for _ in range(cfg.accum_steps)]
                    out = self._optimizer_step(step, batches)
                    self._sync_skips('train')
                    step += 1
                    self.scheduler.step_update(num_updates=step)
                    dt = time.perf_counter() - t0
                    train_time += dt
                    train_images += out['images'] * self.info.world_size
                    if not out['applied']:
                        skipped += 1
                        msg = (
                            f"step {step}: {out['reason']} (loss {out['loss']}) - the update was skipped; "
                            f"weights, EMA and checkpoints are untouched"
                        )
                        if out['reason'] != 'fp16 overflow (scaler)' and cfg.nan_policy == 'abort':
                            raise NonFiniteLossError(
                                f"step {step}: {out['reason']} (loss {out['loss']}); stopped without updating the "
                                f"weights, EMA or checkpoints (nan_policy='abort'; use nan_policy='skip' / "
                                f"--nan-policy skip to skip such steps, or lower lr / enable clip_grad)"
                            )
                        self._print(msg)
                    else:
                        window_loss += out['loss']
                        window_n += 1
                    window_img += out['images'] * self.info.world_size
                    if step % cfg.log_every == 0 or step == self.total_steps:
                        now = time.perf_counter()
                        rec = {
                            'kind': 'train',
                            'step': step,
                            'epoch': step / self.steps_per_epoch,
                            'loss': window_loss / max(window_n, 1),
                            'lr': lr,
                            'img_per_s': window_img / max(now - window_t0, 1e-9),
                            'time': time.time(),
                        }
                        if 'train' in self.skips:
                            rec.update(self.skips['train'].metrics())
                        self._on_main(self._append, rec)
                        window_loss, window_n, window_t0, window_img = 0.0, 0, now, 0
                    self.progress.update(
                        step, loss=out['loss'], lr=lr, img_s=train_images / max(train_time, 1e-9), epoch=epoch + 1
                    )
                    signum = self._max_rank(stop.signum or 0)
                    if signum:  # a signal to any process stops every one (and each says which signal)
                        stop.signum = stop.signum or signum
                        status = 'interrupted'
                        break
                    mid_epoch = step % self.steps_per_epoch and step < self.total_steps
                    if mid_epoch and self.task.eval_due(step, self.steps_per_epoch):  # a task counting in steps
                        self._evaluate_and_report(step)
                        self.ddp_model.train()
                    if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step % self.steps_per_epoch:
                        self._save(step, epoch, 'periodic')
                if status == 'interrupted':
                    self._save(step, step // self.steps_per_epoch, 'signal')
                    self._print(
                        f"interrupted: checkpoint saved at step {step} in {self.run_dir}; continue with "
                        f"resume='auto' and the same output/name (CLI: --resume auto)"
                    )
                    break
                epoch_done = step % self.steps_per_epoch == 0
                done_epochs = step // self.steps_per_epoch
                if self.task.eval_due(step, self.steps_per_epoch) or step >= self.total_steps:
                    self._evaluate_and_report(step)
                self._save(step, done_epochs, 'epoch' if epoch_done else 'end')
        finally:
            stop.restore()
            self.progress.close()
        if self.last_eval is None and self.val_loader is not None and status == 'finished':
            self._evaluate(step, step / self.steps_per_epoch)
        result = {
            'status': status,
            'signal': stop.signum if status == 'interrupted' else None,
            'run_dir': str(self.run_dir),
            'model': cfg.model,
            'params': self.n_params,
            'steps': step,
            'skipped_steps': skipped,
            'epochs': step / self.steps_per_epoch,
            'train_img_per_s': train_images / train_time if train_time > 0 else None,
            'train_time_s': train_time,
            'checkpoint': str(self.last_checkpoint) if self.last_checkpoint else None,
            'curves': str(self.curves) if self.curves else None,
            'last_eval': self.last_eval,
        }
        # the task's headline metrics of the last evaluation (what `msconv train` prints when the run ends)
        result['headline'] = {
            k: self.last_eval[k] for k in self.task.headline_metrics if isinstance((self.last_eval or {}).get(k), float)
        }
        if self.last_eval and 'top1' in self.last_eval:
            result['top1'] = self.last_eval['top1']
            result['ema_top1'] = self.last_eval.get('ema_top1')
        # the official scripts report the best epoch's top-1 ("Max accuracy"); both are reported here
        result['last'] = self.last
        result['best'] = self.best
        return result
