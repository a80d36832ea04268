"""Evaluation: top-1/top-5 and loss of a classifier over a loader (DDP-aware), and ``msconv.evaluate`` for a
saved model on a dataset."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..data.digits import DIGITS_CLASSES
from ..data.loader import build_dataset, build_loader, check_image_folder
from ..data.skips import EVAL_THRESHOLD_HINT, skipped_files
from ..inference import inference_model
from ..models import read_checkpoint
from ..tools._common import check_checkpoint_file
from .build import build_model, data_config, load_weights
from .checkpoint import CheckpointError, checkpoint_weights_verify, find_run_config, read_folder_weights
from .config import config_from_mapping, load_yaml
from .distributed import resolve_device

__all__ = ['evaluate', 'evaluate_loader', 'autocast_context']


def autocast_context(device: torch.device, amp: bool, dtype: Optional[torch.dtype]):
    if not amp or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate_loader(
    model: nn.Module,
    loader,
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    world_size: int = 1,
    rank: int = 0,
) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over ``loader``.

    Under torchrun each rank evaluates its share; the padding DistributedSampler adds to even out the shares is
    excluded, so every sample counts exactly once.
    """
    was_training = model.training
    model.eval()
    n_total = len(loader.dataset)
    sums = torch.zeros(4, dtype=torch.float64)  # correct1, correct5, loss_sum, count
    local_pos = 0
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp_dtype is not None, amp_dtype):
            logits = model(x)
        logits = logits.float()
        b = y.shape[0]
        positions = (torch.arange(local_pos, local_pos + b) * world_size + rank).to(device)
        keep = (positions < n_total) & (y >= 0)  # label -1: an unreadable image's stand-in
        local_pos += b
        if not keep.any():
            continue
        logits, y = logits[keep], y[keep]
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        correct = topk.eq(y[:, None])
        sums += torch.tensor(
            [
                correct[:, 0].sum().item(),
                correct.any(1).sum().item(),
                F.cross_entropy(logits, y, reduction='sum').item(),
                y.shape[0],
            ],
            dtype=torch.float64,
        )
    if world_size > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    count = max(sums[3].item(), 1.0)
    return {
        'top1': 100.0 * sums[0].item() / count,
        'top5': 100.0 * sums[1].item() / count,
        'val_loss': sums[2].item() / count,
        'count': int(sums[3].item()),
    }


def _verify_weights_file(path: Path) -> bool:
    """Check ``path`` against the hash its checkpoint folder's ``meta.json`` records, when it sits in one
    (``CheckpointError`` if it differs); False for a bare file, which carries no hash."""
    meta = path.parent / 'meta.json'
    if not meta.is_file() or path.name not in (_recorded(meta) or {}):
        return False
    if not checkpoint_weights_verify(path.parent, path.name):
        raise CheckpointError(
            f"checkpoint file {str(path)!r} is truncated or corrupt (its SHA-256 does not match {str(meta)!r})"
        )
    return True


def _recorded(meta: Path) -> Optional[Dict[str, str]]:
    try:
        return json.loads(meta.read_text()).get('files')
    except (OSError, ValueError, AttributeError):
        return None


def _check_finite(state_dict: Dict[str, torch.Tensor], path: Path) -> None:
    """What can be checked in a weights file that carries no hash: every floating tensor is finite (a flipped
    exponent bit gives inf or NaN)."""
    for name, t in state_dict.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(
                f"checkpoint {str(path)!r}: tensor {name!r} holds NaN or infinite values (a damaged file?)"
            )


def evaluate(
    model: Union[str, nn.Module],
    checkpoint: Optional[Union[str, Path]] = None,
    data: str = 'digits',
    split: str = 'val',
    batch_size: int = 128,
    image_size: Optional[int] = None,
    device: str = 'auto',
    amp: bool = False,
    num_workers: int = 0,
    use_ema: bool = False,
    which: str = 'last',
    dtype: Optional[str] = None,
    bad_image_threshold: Optional[float] = None,
    **model_kwargs: Any,
) -> Dict[str, float]:
    """Evaluate a classifier on ``split`` of ``data`` ('digits' or an ImageFolder root); returns top1/top5/loss.

    Args:
        model: a model name (built with ``msconv.create_model``) or a module.
        checkpoint: weights: a ``.safetensors``/``.pth`` file, a training checkpoint folder (``step-N``) or a run
            folder (its newest good checkpoint). When the checkpoint sits in a run folder, that run's
            ``config.yaml`` supplies ``model_kwargs``, ``image_size`` and the number of classes.
        use_ema: evaluate the EMA weights of a training checkpoint.
        which: for a run folder, ``'last'`` (its newest valid checkpoint) or ``'best'`` (the weights of its best
            evaluation, ``<run>/checkpoints/best-<step>``, kept by the trainer).
        dtype: 'fp32', 'bf16' or 'fp16': evaluate the inference form (``msconv.inference_model``) with its weights
            in that dtype; None: the model as built (``amp`` adds bf16 autocast).
        bad_image_threshold: the largest fraction of the split's files that may be unusable (default: the run's,
            else 0.01); past it ``DataError`` names them.

    Returns top1/top5 (%), val_loss, count, ``preprocessing`` (the resize, crop and interpolation used, and where
    they come from: the run's config.yaml when the weights sit in a run folder, else the model's defaults, which
    may differ from the training's), and ``checkpoint``/``step``: the checkpoint whose weights were used (for a run
    folder, its newest valid one; for a weights file, ``verified``: whether a hash recorded beside it was checked:
    a bare file carries none, only its tensors' finiteness is checked); for a folder dataset ``skipped_files``, the
    files it could not use (each named in a warning; more than the run's ``bad_image_threshold`` raises
    ``DataError``). A checkpoint of another model raises ``ValueError`` naming it.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if split not in ('train', 'val'):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if which not in ('last', 'best'):
        raise ValueError(f"which must be 'last' or 'best', got {which!r}")
    run_cfg: Dict[str, Any] = {}
    cfg_path = None
    state_dict = None
    used: Dict[str, Any] = {}
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        if not ckpt.exists():
            raise FileNotFoundError(f"checkpoint {str(ckpt)!r} does not exist")
        cfg_path = find_run_config(ckpt if ckpt.is_dir() else ckpt.parent)
        if cfg_path is not None:
            run_cfg = load_yaml(cfg_path)
        if ckpt.is_dir() or which == 'best':  # a run or checkpoint folder, read as export and erf read it
            found = read_folder_weights(ckpt, which, use_ema)
            used = {'checkpoint': found['checkpoint'], 'step': found['step']}
            if (ckpt / 'checkpoints').is_dir():
                used['which'] = which
            if which == 'best':
                used.update(best_top1=found['meta'].get('top1'), best_epoch=found['meta'].get('epoch'))
            state_dict, trained_as = found['state_dict'], found['meta'].get('model')
        else:
            if use_ema:
                raise ValueError(f"checkpoint {str(ckpt)!r} holds no 'ema' weights (available: ['model'])")
            check_checkpoint_file(ckpt)
            verified = _verify_weights_file(ckpt)
            state_dict, trained_as = read_checkpoint(ckpt), None
            _check_finite(state_dict, ckpt)
            used = {'checkpoint': str(ckpt), 'step': None, 'verified': verified}
        if trained_as is None and cfg_path is not None:
            trained_as = run_cfg.get('model')

    cfg = config_from_mapping(run_cfg, task='classification')  # the options of the run's transforms
    cfg.data = data
    if image_size is not None:
        cfg.image_size = image_size
    dev = resolve_device(device)

    if cfg.data != 'digits':
        root = Path(cfg.data)
        if not root.is_dir():
            raise ValueError(f"data {data!r}: no such folder (expected an ImageFolder root with {split}/ inside)")
        classes = check_image_folder(root, split)
    else:
        classes = list(DIGITS_CLASSES)

    if isinstance(model, str):
        kwargs = dict(cfg.model_kwargs) if run_cfg.get('model') == model else {}
        kwargs.update(model_kwargs)
        net = build_model(model, num_classes=len(classes), drop_path=0.0, model_kwargs=kwargs)
        name = model
    else:
        net, name = model, type(model).__name__
    if state_dict is not None:
        load_weights(net, state_dict, f"checkpoint {used['checkpoint']!r}", name, trained_as=trained_as)
    net.to(dev)

    dc = data_config(net, cfg)
    if cfg.crop_pct is None:
        cfg.crop_pct = dc['crop_pct']
    source = (
        f"the run's {cfg_path}"
        if cfg_path is not None
        else "the model's defaults: no run config.yaml beside the weights; --image-size changes the size"
    )
    used['preprocessing'] = f"resize to {dc['size']} px, crop_pct {cfg.crop_pct:g}, {cfg.interpolation} (from {source})"
    dataset = build_dataset(cfg, split, dc['size'], dc['mean'], dc['std'], is_training=False)
    skips = skipped_files(dataset)  # what the split cannot use: named, counted, refused past the run's threshold
    if skips is not None:
        skips.threshold = cfg.bad_image_threshold if bad_image_threshold is None else float(bad_image_threshold)
        skips.check(split, hint=EVAL_THRESHOLD_HINT)
    loader, _ = build_loader(dataset, batch_size, shuffle=False, seed=0, num_workers=num_workers)
    amp_dtype = torch.bfloat16 if amp else None
    if dtype is not None:
        if amp:
            raise ValueError(f"amp (bf16 autocast) and dtype={dtype!r} (weights in that dtype) are exclusive: pick one")
        net = inference_model(net, dtype=dtype, device=dev)
    result = dict(evaluate_loader(net, loader, dev, amp_dtype=amp_dtype), **used)
    if skips is not None:
        skips.check(split, hint=EVAL_THRESHOLD_HINT)
        result.update(skips.metrics())
    return result
