"""Speed of the dense systems: images/s and peak step memory of msconv detectors / segmenters at the papers' input
sizes, beside torchvision's ``maskrcnn_resnet50_fpn`` and ``retinanet_resnet50_fpn`` (``weights=None``) measured
in the same run.

* Subjects are named ``BACKBONE:ARCH`` (``smt_small:mask_rcnn``, ``shiftwise_tiny:upernet``) or ``tv:NAME`` for a
  torchvision detection builder. Detection runs on a 1280x800 image (W x H, the papers' FLOPs size; the test
  resize to shorter side 800 / longer <= 1333 leaves it as it is, for msconv and torchvision alike), segmentation
  on 2048x512. Inference is end to end (resize, backbone, heads, post-processing) under ``torch.inference_mode``;
  training (``train=True``) is one SGD step on the loss dict with two synthetic boxes (and masks) per image, or a
  random label map (segmentation trains on at least 2 images: UperNet's pooling branch has a 1x1 BatchNorm).
* Timing follows :mod:`msconv.tools.bench`: warm-up calls, then the subjects **interleaved** call by call, the
  median per subject; each msconv detector's ratio is against the torchvision baseline of its kind (RetinaNet vs
  ``retinanet_resnet50_fpn``, the R-CNNs vs ``maskrcnn_resnet50_fpn``) measured in the same rounds.
* Peak memory: tensor bytes allocated during one step above what was live before it (``tools.bench``'s counter:
  the CUDA allocator, or ``torch.profiler`` memory events on CPU).
* MACs (``macs=True``): the multiply-accumulates of one inference call as it runs (``torch.utils.flop_counter``
  with the plain forms, as ``msconv profile`` counts: convolutions, linears and attention matmuls, fused attention
  included; the RoI heads on the proposals and detections this call has), and the speed per MAC against the
  baseline: (MACs / s) / (baseline MACs / baseline s), > 1: more MACs per second than the baseline.
* Phases (``phases=True``, detectors): where one inference call's time and MACs go, per part of the system
  (:data:`DENSE_PHASES`: backbone, FPN, RPN, RoI pooling, box and mask heads, RetinaNet's head and anchors; what
  is left, the resize, proposal filtering, NMS, box decoding and mask pasting, is ``rest``), timed by hooks on those
  modules over ``num_bench_iter`` further calls (median per phase) and counted as ``macs`` counts. Every subject's
  random weights are drawn from seed 0, so its detections (and the RoI heads' MACs) are the same in every run.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .bench import _peak_step_memory, _sync

__all__ = [
    'bench_dense',
    'format_dense_bench',
    'format_dense_phases',
    'DENSE_BASELINES',
    'DENSE_INPUT_SIZES',
    'DENSE_PHASES',
]

DENSE_BASELINES = ('tv:maskrcnn_resnet50_fpn', 'tv:retinanet_resnet50_fpn')
DENSE_INPUT_SIZES = {'detection': (800, 1280), 'segmentation': (512, 2048)}  # (H, W)
_TV = ('maskrcnn_resnet50_fpn', 'retinanet_resnet50_fpn', 'fasterrcnn_resnet50_fpn')
#: The parts of a detector ``phases=True`` times: phase name -> submodules (msconv's and torchvision's names).
DENSE_PHASES = {
    'backbone': ('backbone.backbone', 'backbone.body'),
    'fpn': ('backbone.fpn',),
    'rpn': ('rpn',),
    'box pool': ('roi_heads.box_roi_pool',),
    'box head': ('roi_heads.box_head', 'roi_heads.box_predictor'),
    'mask pool': ('roi_heads.mask_roi_pool',),
    'mask head': ('roi_heads.mask_head', 'roi_heads.mask_predictor'),
    'head': ('head',),
    'anchors': ('anchor_generator',),
}


def _parse(name: str) -> Tuple[str, str]:
    from ..dense import DETECTOR_ARCHS, SEGMENTER_ARCHS

    if not isinstance(name, str) or ':' not in name:
        raise ValueError(f"subjects are 'BACKBONE:ARCH' or 'tv:NAME', got {name!r}")
    left, right = name.split(':', 1)
    if left == 'tv':
        if right not in _TV:
            raise ValueError(f"torchvision baseline must be one of {sorted(_TV)}, got {right!r}")
    elif right not in DETECTOR_ARCHS + SEGMENTER_ARCHS:
        raise ValueError(f"arch in {name!r} must be one of {DETECTOR_ARCHS + SEGMENTER_ARCHS}, got {right!r}")
    return left, right


def _kind(name: str) -> str:
    left, right = _parse(name)
    return 'segmentation' if right == 'upernet' else 'detection'


def _build(name: str, size: Tuple[int, int]) -> nn.Module:
    left, right = _parse(name)
    min_size, max_size = min(size), max(1333, max(size))  # the test resize leaves the benchmark image as it is
    if left == 'tv':
        import torchvision.models.detection as tvd

        return getattr(tvd, right)(weights=None, weights_backbone=None, min_size=min_size, max_size=max_size)
    if right == 'upernet':
        from ..dense import create_segmenter

        return create_segmenter(left, 'upernet', 150)
    from ..dense import create_detector

    return create_detector(left, right, 80, min_size=min_size, max_size=max_size)


def _targets(n: int, size: Tuple[int, int], masks: bool) -> List[Dict[str, torch.Tensor]]:
    h, w = size
    boxes = torch.tensor([[0.1 * w, 0.1 * h, 0.4 * w, 0.5 * h], [0.5 * w, 0.3 * h, 0.9 * w, 0.9 * h]])
    out = []
    for _ in range(n):
        t = {'boxes': boxes.clone(), 'labels': torch.tensor([1, 2])}
        if masks:
            m = torch.zeros(2, h, w, dtype=torch.uint8)
            for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
                m[i, y0:y1, x0:x1] = 1
            t['masks'] = m
        out.append(t)
    return out


class _Subject:
    def __init__(self, name: str, size: Tuple[int, int], batch_size: int, device: torch.device, train: bool):
        self.name, self.kind = name, _kind(name)
        torch.manual_seed(0)  # the same random weights in every run: the same detections, RoI-head MACs and times
        self.model = _build(name, size).to(device)
        self.params = sum(p.numel() for p in self.model.parameters())
        h, w = size
        g = torch.Generator().manual_seed(0)
        if self.kind == 'detection':
            self.x: Any = [torch.rand(3, h, w, generator=g).to(device) for _ in range(batch_size)]
            masks = name.endswith('mask_rcnn') or name == 'tv:maskrcnn_resnet50_fpn'
            self.y: Any = [{k: v.to(device) for k, v in t.items()} for t in _targets(batch_size, size, masks)]
        else:  # training needs 2+ images: UperNet's pooling branch has a 1x1 BatchNorm
            self.x = torch.rand(batch_size, 3, h, w, generator=g).to(device)
            self.train_x = torch.rand(max(batch_size, 2), 3, h, w, generator=g).to(device)
            self.y = torch.randint(0, 150, (max(batch_size, 2), h, w), generator=g).to(device)
        self.train_batch = len(self.y)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4) if train else None

    def infer_step(self) -> None:
        self.model.eval()
        with torch.inference_mode():
            self.model(self.x)

    def infer_macs(self) -> Tuple[int, int, int]:
        """(MACs, attention MACs, detections) of one inference call, MACs counted with the plain forms."""
        from ..layers import reference_forms
        from .profile import _custom_mapping, _DataFlowCounter, flop_registry, shape_wrapper

        self.model.eval()
        custom = _custom_mapping()
        counter = FlopCounterMode(display=False, custom_mapping=custom)
        x0 = self.x[0] if isinstance(self.x, list) else self.x
        flow = _DataFlowCounter(x0, {**flop_registry, **{k: shape_wrapper(v) for k, v in custom.items()}})
        with torch.no_grad(), counter, flow, reference_forms():
            out = self.model(self.x)
        detections = sum(len(o['boxes']) for o in out) if self.kind == 'detection' else 0
        return counter.get_total_flops() // 2, flow.flops['attention'] // 2, detections

    def infer_phases(self, iters: int, clock: Callable[[], float]) -> Dict[str, Tuple[float, float]]:
        """Phase -> (median seconds over ``iters`` inference calls, MACs of one call); see the module."""
        from ..layers import reference_forms
        from .profile import _custom_mapping

        modules = dict(self.model.named_modules())
        found = {p: [modules[n] for n in names if n in modules] for p, names in DENSE_PHASES.items()}
        found = {p: ms for p, ms in found.items() if ms}
        spent: Dict[str, float] = {}
        start: Dict[int, float] = {}
        now: List[Callable[[], float]] = [clock]

        def pre(module, args, phase=''):
            start[id(module)] = now[0]()

        def post(module, args, out, phase=''):
            spent[phase] = spent.get(phase, 0.0) + now[0]() - start.pop(id(module))

        hooks = [
            h
            for phase, ms in found.items()
            for m in ms
            for h in (
                m.register_forward_pre_hook(lambda mod, a, phase=phase: pre(mod, a, phase)),
                m.register_forward_hook(lambda mod, a, o, phase=phase: post(mod, a, o, phase)),
            )
        ]
        self.model.eval()
        try:
            runs = []
            for _ in range(iters):
                spent.clear()
                with torch.inference_mode():
                    t0 = clock()
                    self.model(self.x)
                    total = clock() - t0
                runs.append({**spent, 'rest': total - sum(spent.values())})
            counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
            now[0] = lambda: float(counter.get_total_flops()) / 2  # the same hooks, counting MACs
            spent.clear()
            with torch.no_grad(), counter, reference_forms():
                self.model(self.x)
            macs = {**spent, 'rest': counter.get_total_flops() / 2 - sum(spent.values())}
        finally:
            for h in hooks:
                h.remove()
        return {p: (statistics.median(r.get(p, 0.0) for r in runs), macs.get(p, 0.0)) for p in [*found, 'rest']}

    def train_step(self) -> None:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        losses = self.model(getattr(self, 'train_x', self.x), self.y)
        sum(losses.values()).backward()
        self.opt.step()


def _interleaved(
    subjects: List[_Subject],
    step: Callable[[_Subject], None],
    warm: int,
    iters: int,
    device,
    clock: Callable[[], float] = time.perf_counter,
):
    for _ in range(warm):
        for s in subjects:
            step(s)
    times: Dict[str, List[float]] = {s.name: [] for s in subjects}
    for _ in range(iters):
        for s in subjects:
            _sync(device)
            t0 = clock()
            step(s)
            _sync(device)
            times[s.name].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_dense(
    subjects: Sequence[str],
    baselines: Sequence[str] = DENSE_BASELINES,
    batch_size: int = 1,
    device: str = 'cpu',
    size: Optional[Dict[str, Tuple[int, int]]] = None,
    train: bool = False,
    num_warm_iter: int = 1,
    num_bench_iter: int = 3,
    memory: bool = True,
    macs: bool = False,
    clock: Callable[[], float] = time.perf_counter,
    phases: bool = False,
) -> List[Dict[str, Any]]:
    """Images/s (and peak memory) of each subject and baseline; returns one dict per model (see the module).

    Args:
        subjects: ``'BACKBONE:ARCH'`` names, e.g. ``['smt_small:mask_rcnn', 'smt_small:upernet']``.
        baselines: torchvision detectors measured beside them (``'tv:NAME'``).
        size: input (H, W) per kind; default the papers' sizes :data:`DENSE_INPUT_SIZES`.
        train: also time a training step.
        macs: also count each model's MACs in one inference call and give the speed per MAC against the baseline.
        clock: what times a call (``time.process_time``: the process's CPU time, for one thread on a shared machine).
        phases: also time and count each part of the detectors (``row['phases']``: phase -> (seconds, MACs)).
    """
    for name, value in (('batch_size', batch_size), ('num_bench_iter', num_bench_iter)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(num_warm_iter, int) or num_warm_iter < 0:
        raise ValueError(f"num_warm_iter must be an int >= 0, got {num_warm_iter!r}")
    if not subjects:
        raise ValueError('subjects must name at least one BACKBONE:ARCH system')
    names = list(dict.fromkeys(list(subjects) + list(baselines)))
    for n in names:
        _parse(n)
    for n in baselines:
        if not n.startswith('tv:'):
            raise ValueError(f"baselines must be torchvision detectors 'tv:NAME', got {n!r}")
    sizes = dict(DENSE_INPUT_SIZES, **(size or {}))
    dev = torch.device(device)
    models = [_Subject(n, tuple(sizes[_kind(n)]), batch_size, dev, train) for n in names]
    infer = _interleaved(models, _Subject.infer_step, num_warm_iter, num_bench_iter, dev, clock)
    trained = _interleaved(models, _Subject.train_step, num_warm_iter, num_bench_iter, dev, clock) if train else {}
    rows = []
    for s in models:
        row: Dict[str, Any] = dict(
            model=s.name,
            kind=s.kind,
            size=tuple(sizes[s.kind]),
            batch_size=batch_size,
            device=str(dev),
            params_m=s.params / 1e6,
            baseline=s.name in baselines and s.name not in subjects,
            infer_img_s=batch_size / infer[s.name],
            infer_mem_mb=_peak_step_memory(s.infer_step, dev) / 2**20 if memory else float('nan'),
            train_img_s=s.train_batch / trained[s.name] if train else float('nan'),
            train_mem_mb=_peak_step_memory(s.train_step, dev) / 2**20 if (train and memory) else float('nan'),
        )
        counted = s.infer_macs() if macs else (float('nan'),) * 3
        row.update(infer_gmacs=counted[0] / 1e9, infer_attention_gmacs=counted[1] / 1e9, detections=counted[2])
        if phases and s.kind == 'detection':
            row['phases'] = s.infer_phases(num_bench_iter, clock)
        rows.append(row)
    by_name = {r['model']: r for r in rows}
    for r in rows:
        arch = r['model'].split(':', 1)[1]
        base = None
        if not r['baseline'] and r['kind'] == 'detection':
            want = 'tv:retinanet_resnet50_fpn' if arch in ('retinanet', 'atss') else 'tv:maskrcnn_resnet50_fpn'
            base = by_name.get(want)
        r['vs'] = base['model'] if base else None
        r['infer_ratio'] = r['infer_img_s'] / base['infer_img_s'] if base else float('nan')
        r['train_ratio'] = r['train_img_s'] / base['train_img_s'] if (base and train) else float('nan')
        r['infer_per_mac_ratio'] = (
            r['infer_ratio'] * r['infer_gmacs'] / base['infer_gmacs'] if (base and macs) else float('nan')
        )
    return rows


def _f(value: float, spec: str) -> str:
    return '-' if value != value else format(value, spec)


def format_dense_bench(rows: Sequence[Dict[str, Any]]) -> str:
    """A plain-text table of :func:`bench_dense` rows."""
    header = ('model', 'input', 'params (M)', 'infer img/s', 'infer mem (MB)', 'train img/s', 'vs', 'infer ratio')
    with_macs = any(r.get('infer_gmacs', float('nan')) == r.get('infer_gmacs', float('nan')) for r in rows)
    if with_macs:
        header += ('GMACs (attention)', 'detections', 'per-MAC ratio')
    lines = [
        (
            r['model'] + (' (baseline)' if r['baseline'] else ''),
            f"{r['size'][1]}x{r['size'][0]}",
            f"{r['params_m']:.2f}",
            _f(r['infer_img_s'], '.3f'),
            _f(r['infer_mem_mb'], '.0f'),
            _f(r['train_img_s'], '.3f'),
            r['vs'] or '-',
            _f(r['infer_ratio'], '.2f') + ('x' if r['infer_ratio'] == r['infer_ratio'] else ''),
        )
        + (
            (
                f"{_f(r['infer_gmacs'], '.1f')} ({_f(r['infer_attention_gmacs'], '.1f')})",
                _f(r['detections'], '.0f'),
                _f(r['infer_per_mac_ratio'], '.2f'),
            )
            if with_macs
            else ()
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda row: '  '.join(str(x).ljust(w) for x, w in zip(row, widths))  # noqa: E731
    return '\n'.join([fmt(header), fmt(['-' * w for w in widths])] + [fmt(r) for r in lines])


def format_dense_phases(rows: Sequence[Dict[str, Any]]) -> str:
    """A plain-text table of the ``phases`` of :func:`bench_dense` rows: per model and phase, milliseconds, GMACs
    and GMACs per second."""
    lines = [('model', 'phase', 'ms', 'GMACs', 'GMAC/s')]
    for r in rows:
        for phase, (sec, macs) in r.get('phases', {}).items():
            rate = macs / 1e9 / sec if sec > 0 and macs > 0 else float('nan')
            lines.append((r['model'], phase, f'{sec * 1e3:.0f}', f'{macs / 1e9:.1f}', _f(rate, '.1f')))
    widths = [max(len(str(x)) for x in col) for col in zip(*lines)]
    fmt = lambda row: '  '.join(str(x).ljust(w) for x, w in zip(row, widths))  # noqa: E731
    return '\n'.join([fmt(lines[0]), fmt(['-' * w for w in widths])] + [fmt(r) for r in lines[1:]])
