"""Crash-safe training checkpoints.

One checkpoint is a folder ``<run>/checkpoints/step-00001234/`` holding
- ``model.safetensors``: the weights (loadable by ``msconv.create_model(name, checkpoint_path=...)``);
- ``ema.safetensors`` (with EMA) and ``head.safetensors`` (face task: the margin head);
- ``state.pt``: optimizer, scheduler, grad scaler, RNG states, sparsity masks, step/epoch counters;
- ``meta.json``: step, epoch, config, and the SHA-256 of every file above, written last.

The folder is written under a temporary name, every file is fsynced, then it is renamed into place (atomic on
POSIX), so a crash leaves either the previous checkpoints or a complete new one. A write the file system refuses
(full, read-only, vanished) raises ``RunWriteError``, one line naming the path and the cause, after removing the
temporary folder: the previous checkpoints stay as they were. ``load_checkpoint`` checks the
hashes and that each file parses, and names the bad file; ``latest_good_checkpoint`` falls back to the newest
checkpoint that passes.

The best evaluation's weights (highest top-1; the official scripts report the best epoch) are kept the same way in
``<run>/checkpoints/best-00001234/`` (``save_best_checkpoint``; the previous best folder is removed only after the
new one is in place), found with ``best_checkpoint``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from safetensors.torch import load_file, save

__all__ = [
    'SKIP_LIST',
    'CheckpointError',
    'RunWriteError',
    'os_cause',
    'atomic_write_bytes',
    'save_checkpoint',
    'load_checkpoint',
    'list_checkpoints',
    'checkpoint_weights_verify',
    'latest_good_checkpoint',
    'get_rng_state',
    'set_rng_state',
    'checkpoint_step',
    'clean_temporaries',
    'holds_run',
    'clear_run',
    'save_best_checkpoint',
    'list_best_checkpoints',
    'best_checkpoint',
    'find_run_config',
    'read_folder_weights',
]

_PREFIX = 'step-'
_BEST_PREFIX = 'best-'


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or corrupt (the message names the file)."""


class RunWriteError(OSError):
    """A file of a run (checkpoint, metrics, config) could not be written: the file system is full, read-only or
    gone. The message is one line naming the path and the cause (``errno`` is the cause's) and says what was left
    as it was; nothing half-written stays behind."""

    def __init__(self, message: str, cause: Optional[OSError] = None):
        super().__init__(message)
        self.errno = getattr(cause, 'errno', None)


def os_cause(e: BaseException) -> str:
    """The file system's reason (``No space left on device``), without Python's ``[Errno N]`` and file name."""
    return (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__


class _CheckedStream:
    """The binary file ``torch.save`` writes through, keeping the file system's error: torch's zip writer turns a
    failed write into ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``, which names neither
    the file nor the cause."""

    def __init__(self, f):
        self.f = f
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync, and rename. A write the file system refuses
    raises ``RunWriteError`` naming ``path`` and leaves ``path`` as it was and no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise RunWriteError(f"could not write {str(path)!r}: {os_cause(e)}; it was left as it was", e) from e
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def get_rng_state() -> Dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) generator states, in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': {
            'key': torch.from_numpy(np_state[1].astype(np.int64)),
            'pos': int(np_state[2]),
            'has_gauss': int(np_state[3]),
            'cached_gaussian': float(np_state[4]),
        },
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state['numpy']
    np.random.set_state(('MT19937', n['key'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _contiguous_cpu(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        out[k] = v.detach().to('cpu').contiguous()
    return out


def _write_safetensors(tensors: Dict[str, torch.Tensor], path: Path, metadata: Optional[Dict[str, str]] = None):
    # Tied/shared storages are cloned so that safetensors accepts them.
    tensors = {k: v.clone() for k, v in _contiguous_cpu(tensors).items()}
    data = save(tensors, metadata=metadata)
    with open(path, 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_torch(obj: Any, path: Path) -> None:
    with open(path, 'wb') as f:
        stream = _CheckedStream(f)
        try:
            torch.save(obj, stream)
        except RuntimeError:
            if stream.error is not None:  # the file system's error, not torch's "unexpected pos"
                raise stream.error from None
            raise
        f.flush()
        os.fsync(f.fileno())


def _write_folder(
    ckpt_root: Path,
    name: str,
    step: int,
    weights: Dict[str, Dict[str, torch.Tensor]],
    state: Dict[str, Any],
    meta: Dict[str, Any],
) -> Path:
    """Write one checkpoint folder ``ckpt_root/name`` atomically (temporary folder, fsync, rename).

    A write the file system refuses raises ``RunWriteError`` naming the checkpoint, the file and the cause, after
    removing the temporary folder; the checkpoints already there are left as they were."""
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{final.name}-{os.getpid()}"
    writing, old = tmp, None
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files: Dict[str, str] = {}
        for wname, sd in weights.items():
            if sd is None:
                continue
            writing = tmp / f"{wname}.safetensors"
            _write_safetensors(sd, writing, metadata={'format': 'pt', 'step': str(step)})
            files[writing.name] = _sha256(writing)
        writing = tmp / 'state.pt'
        _write_torch(state, writing)
        files[writing.name] = _sha256(writing)
        meta = dict(meta, step=step, files=files, format='msconv-checkpoint-v1')
        writing = tmp / 'meta.json'
        with open(writing, 'w') as f:
            json.dump(meta, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        writing = final
        if final.exists():  # re-saving the same step (e.g. epoch end right after a periodic save): keep it until
            old = ckpt_root / f".old-{final.name}-{os.getpid()}"  # the new one is in place
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            os.replace(old, final)
        where = '' if writing in (tmp, final) else f" ({writing.name})"
        kept = [p.name for p in list_checkpoints(ckpt_root.parent)]
        raise RunWriteError(
            f"could not write checkpoint {str(final)!r}{where}: {os_cause(e)}; the checkpoints already there are as "
            f"they were ({', '.join(kept) if kept else 'none yet'})",
            e,
        ) from e
    except BaseException:  # Ctrl-C or a bug while writing: no half-written folder stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(
    run_dir: Union[str, Path],
    step: int,
    weights: Dict[str, Dict[str, torch.Tensor]],
    state: Dict[str, Any],
    meta: Dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Atomically write checkpoint ``step`` under ``run_dir/checkpoints`` and prune to the last ``keep_last``.

    Args:
        weights: ``{'model': sd, 'ema': sd, 'head': sd}`` (each written as ``<name>.safetensors``).
        state: everything else (written with ``torch.save`` as ``state.pt``; tensors, numbers, strings only).
        meta: JSON-serialisable run information (step, epoch, config, metrics).
    """
    final = _write_folder(Path(run_dir) / 'checkpoints', f"{_PREFIX}{step:08d}", step, weights, state, meta)
    # Keep this checkpoint and the newest keep_last - 1 before it. Any later-step folder is from a future this run
    # abandoned (it resumed from an earlier checkpoint) and goes too: it can never outrank the one just written.
    others = [p for p in list_checkpoints(run_dir) if p != final]
    older = [p for p in others if checkpoint_step(p) < step]
    for old in [p for p in others if checkpoint_step(p) > step] + older[: max(len(older) - (keep_last - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_step(path: Union[str, Path]) -> int:
    """The step number in a checkpoint folder's name (``step-00001234`` -> 1234)."""
    return int(Path(path).name[len(_PREFIX) :])


SKIP_LIST = 'skipped.tsv'  # the files and annotations a run could not use (msconv.data.skips), one a line
_RUN_FILES = ('config.yaml', 'metrics.jsonl', 'metrics.csv', 'curves.png', SKIP_LIST)


def holds_run(run_dir: Union[str, Path]) -> bool:
    """Whether ``run_dir`` already holds (part of) a run: its config, metrics, curves or any checkpoint."""
    run_dir = Path(run_dir)
    if any((run_dir / f).exists() for f in _RUN_FILES):
        return True
    root = run_dir / 'checkpoints'
    return root.is_dir() and any(root.iterdir())


def clear_run(run_dir: Union[str, Path]) -> None:
    """Remove a run's files (checkpoints, metrics, config, curves, TensorBoard events) so that a new run starts with no
    history."""
    run_dir = Path(run_dir)
    shutil.rmtree(run_dir / 'checkpoints', ignore_errors=True)
    shutil.rmtree(run_dir / 'tensorboard', ignore_errors=True)
    for f in _RUN_FILES:
        (run_dir / f).unlink(missing_ok=True)


def clean_temporaries(run_dir: Union[str, Path]) -> List[Path]:
    """Delete what a crash can leave behind: unfinished ``checkpoints/.tmp-*`` folders and ``.<file>.tmp-*``
    files of interrupted atomic writes; a checkpoint set aside while the same step was re-saved
    (``checkpoints/.old-<name>-<pid>``) goes back in place if the new one never arrived. Returns the removed paths."""
    run_dir = Path(run_dir)
    removed = []
    candidates = list(run_dir.glob('.*.tmp-*'))
    root = run_dir / 'checkpoints'
    if root.is_dir():
        candidates += list(root.glob('.tmp-*'))
        for p in root.glob('.old-*'):
            name = p.name[len('.old-') :].rsplit('-', 1)[0]
            if not (root / name).exists():
                os.replace(p, root / name)
            else:
                candidates.append(p)
    for p in candidates:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def list_checkpoints(run_dir: Union[str, Path]) -> List[Path]:
    """Checkpoint folders of a run, oldest first (temporary, unfinished folders excluded)."""
    root = Path(run_dir) / 'checkpoints'
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX) :].isdigit()
    ]
    return sorted(found, key=checkpoint_step)


def load_checkpoint(path: Union[str, Path]) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Dict[str, Any], Dict]:
    """Read and verify a checkpoint folder: ``(weights, state, meta)``.

    Raises ``CheckpointError`` naming the file that is missing, truncated or does not match its recorded hash.
    """
    path = Path(path)
    meta_path = path / 'meta.json'
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a folder (expected <run>/checkpoints/step-N/)")
    try:
        meta = json.loads(meta_path.read_text())
        files = meta['files']
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {str(meta_path)!r} is missing (the checkpoint is incomplete)")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint file {str(meta_path)!r} is truncated or corrupt: {e}") from e
    for name, digest in files.items():
        fpath = path / name
        if not fpath.is_file():
            raise CheckpointError(f"checkpoint file {str(fpath)!r} is missing")
        if _sha256(fpath) != digest:
            raise CheckpointError(
                f"checkpoint file {str(fpath)!r} is truncated or corrupt (its SHA-256 does not match meta.json)"
            )
    weights = {}
    for name in files:
        if name.endswith('.safetensors'):
            try:
                weights[name[: -len('.safetensors')]] = load_file(str(path / name), device='cpu')
            except Exception as e:
                raise CheckpointError(f"checkpoint file {str(path / name)!r} is not a readable safetensors file: {e}")
    try:
        state = torch.load(str(path / 'state.pt'), map_location='cpu', weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint file {str(path / 'state.pt')!r} cannot be read: {e}") from e
    return weights, state, meta


def checkpoint_weights_verify(path: Union[str, Path], name: str = 'model.safetensors') -> bool:
    """Whether checkpoint folder ``path`` holds weights file ``name`` matching the hash its ``meta.json`` records
    (the rest of the folder may be damaged)."""
    try:
        digest = json.loads((Path(path) / 'meta.json').read_text())['files'][name]
        return _sha256(Path(path) / name) == digest
    except (OSError, ValueError, KeyError, TypeError):
        return False


def latest_good_checkpoint(run_dir: Union[str, Path]):
    """``(path, weights, state, meta)`` of the newest checkpoint that verifies, or None when there is none.

    Each bad checkpoint met on the way is reported with a warning naming its bad file. A checkpoint that vanishes
    while it is read (the run writing the folder pruned it) is no fault: the folder is listed again.
    """
    return _newest_that_verifies(lambda: list_checkpoints(run_dir), 'the previous checkpoint')


def _newest_that_verifies(listing, fallback: str, tries: int = 3):
    """``(path, weights, state, meta)`` of the last of ``listing()`` that loads, warning about each one that does
    not (the warning says it falls back to ``fallback``), or None. A folder gone by the time it is read was pruned
    by a run still writing: no warning, and the listing is read again (up to ``tries`` times)."""
    for _ in range(tries):
        vanished = False
        for path in reversed(listing()):
            try:
                weights, state, meta = load_checkpoint(path)
            except CheckpointError as e:
                if not path.exists():
                    vanished = True
                    continue
                warnings.warn(f"{e}; falling back to {fallback}", stacklevel=3)
                continue
            return path, weights, state, meta
        if not vanished:
            return None
    return None


def save_best_checkpoint(
    run_dir: Union[str, Path], step: int, weights: Dict[str, Dict[str, torch.Tensor]], meta: Dict[str, Any]
) -> Path:
    """Atomically write the best evaluation's weights as ``run_dir/checkpoints/best-<step>`` (``meta`` should hold
    its ``top1`` and ``epoch``), then remove the other best folders. A crash leaves at least one complete one."""
    final = _write_folder(
        Path(run_dir) / 'checkpoints', f"{_BEST_PREFIX}{step:08d}", step, weights, {'step': step}, dict(meta, best=True)
    )
    for old in list_best_checkpoints(run_dir):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_best_checkpoints(run_dir: Union[str, Path]) -> List[Path]:
    """Best-weights folders of a run, oldest first (normally one)."""
    root = Path(run_dir) / 'checkpoints'
    if not root.is_dir():
        return []
    n = len(_BEST_PREFIX)
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_BEST_PREFIX) and p.name[n:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[n:]))


def best_checkpoint(run_dir: Union[str, Path]):
    """``(path, weights, state, meta)`` of the run's best-weights checkpoint that verifies, or None."""
    return _newest_that_verifies(lambda: list_best_checkpoints(run_dir), 'an earlier best checkpoint')


def find_run_config(path: Union[str, Path]) -> Optional[Path]:
    """The ``config.yaml`` of the run that ``path`` (a run folder, a ``checkpoints/step-N`` folder or a file in one)
    belongs to: the first found in ``path`` or up to three folders above it; None when there is none."""
    path = Path(path)
    for parent in [path] + list(path.parents)[:3]:
        cand = parent / 'config.yaml'
        if cand.is_file():
            return cand
    return None


def _none_usable(run: Path, which: str) -> str:
    """Why run folder ``run`` has no checkpoint to read for ``which`` ('last' or 'best'), naming the bad file."""
    folders = list_checkpoints(run) if which == 'last' else list_best_checkpoints(run)
    if not folders:
        what = 'no checkpoint' if which == 'last' else 'no best checkpoint (no evaluation was kept)'
        return f"checkpoint: run folder {str(run)!r} holds {what}"
    try:
        load_checkpoint(folders[-1])
        reason = ''
    except CheckpointError as e:
        reason = f": {e}"
    names = ', '.join(p.name for p in folders)
    other = (
        "--which best (the best evaluation's weights)" if which == 'last' else '--which last (its newest checkpoint)'
    )
    return f"checkpoint: run folder {str(run)!r}: no {which} checkpoint verifies ({names}){reason}; try {other}"


def read_folder_weights(path: Union[str, Path], which: str = 'last', use_ema: bool = False) -> Dict[str, Any]:
    """The weights ``msconv eval``, ``export`` and ``erf`` read from a folder: a run folder's newest checkpoint that
    verifies (``which='best'``: the weights of its best evaluation) or a training checkpoint folder
    (``<run>/checkpoints/step-N``, verified). Returns ``{'state_dict', 'checkpoint', 'step', 'meta', 'config'}``:
    the model's (``use_ema``: the EMA's) state dict, the checkpoint folder it comes from, its step and meta.json,
    and the run's ``config.yaml`` (None outside a run folder). ``ValueError`` naming the folder and what it lacks.
    """
    path = Path(path)
    if which not in ('last', 'best'):
        raise ValueError(f"which must be 'last' or 'best', got {which!r}")
    if (path / 'checkpoints').is_dir():
        found = latest_good_checkpoint(path) if which == 'last' else best_checkpoint(path)
        if found is None:
            raise ValueError(_none_usable(path, which))
        where, weights, meta = Path(found[0]), found[1], found[3]
    elif which == 'best':
        raise ValueError(f"which='best' needs a run folder (holding checkpoints/), got {str(path)!r}")
    elif (path / 'meta.json').is_file():
        weights, _, meta = load_checkpoint(path)
        where = path
    else:
        raise ValueError(
            f"checkpoint folder {str(path)!r} is neither a run folder (holding checkpoints/) nor a training checkpoint "
            f"(holding meta.json)"
        )
    key = 'ema' if use_ema else 'model'
    if key not in weights:
        raise ValueError(f"checkpoint {str(where)!r} holds no {key!r} weights (available: {sorted(weights)})")
    return {
        'state_dict': weights[key],
        'checkpoint': str(where),
        'step': int(meta['step']),
        'meta': meta,
        'config': find_run_config(where),
    }
