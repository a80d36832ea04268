"""What the dense reference fixtures (``tests/fixtures/dense``) and their tests share.

The fixtures hold what the official SMT / ShiftwiseConv configs compute in mmdetection 2.28.2 / mmsegmentation
0.30.0 (``scripts/dense_reference/make_dense_fixtures.py``, run in a reference environment of its own), for one
set of random weights: not the weights themselves, but the official state dict's keys, shapes and dtypes
(``state_dict_spec`` in the json) and a seed, from which :func:`official_weights` regenerates them, here and in
the generator alike. A test converts them with :func:`msconv.dense.convert.convert_official_dense`, loads them
strictly into the msconv system, runs :func:`run_msconv` on the same scenes (:func:`make_scene`) and compares.

What differs from the configs, on both sides alike: head widths (FPN and heads 32 channels, box-head fcs 128;
UperNet 64, auxiliary 32: the same maths, a fraction of the cost), drop path and dropout 0 (training losses are
deterministic), the R-CNN samplers take every anchor / RoI (no random draw), SyncBN is BN, and slide inference
uses 192-pixel crops at stride 128 on the 320-pixel test image (the SW config's 512 / 341 would be one window).
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

FIXTURE_DIR = Path(__file__).resolve().parent / 'fixtures' / 'dense'
SIZE = 320
DET_CHANNELS, DET_FC = 32, 128
SEG_CHANNELS, SEG_AUX = 64, 32
SLIDE_CROP, SLIDE_STRIDE = (192, 192), (128, 128)
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
SAMPLE_ALL = 10**6  # samplers of this size take every candidate
NUM_CLASSES = {'det': 80, 'seg': 150}
SPARSE_STEP = 1e-3  # the SW fixtures add this to every maskable weight after the masks are taken (a "training step")
EVAL_SCENE, TRAIN_SCENES = 0, (0, 1)
MASKS_KEPT = 8  # full-image binary masks stored for the first detections
MASK_PROBS_KEPT = 20  # 28 x 28 mask probabilities stored for the first detections

# fixture name -> (msconv backbone, arch)
SYSTEMS: Dict[str, Tuple[str, str]] = {
    'smt_s_mask_rcnn': ('smt_small', 'mask_rcnn'),
    'smt_s_cascade_mask_rcnn': ('smt_small', 'cascade_mask_rcnn'),
    'smt_s_retinanet': ('smt_small', 'retinanet'),
    'smt_s_atss': ('smt_small', 'atss'),
    'smt_s_sparse_rcnn': ('smt_small', 'sparse_rcnn'),
    'smt_s_upernet': ('smt_small', 'upernet'),
    'sw_t_cascade_mask_rcnn': ('shiftwise_tiny', 'cascade_mask_rcnn'),
    'sw_t_upernet': ('shiftwise_tiny', 'upernet'),
}

# the optimizer-group fixture (optimizer_groups.json): system -> (the fixture whose model and state-dict keys it
# shares, the msconv preset; the backbone and arch are the fixture's)
OPTIMIZER_SYSTEMS: Dict[str, Tuple[str, str]] = {
    'smt_mask_rcnn_1x': ('smt_s_mask_rcnn', 'coco_1x'),
    'smt_mask_rcnn_3x': ('smt_s_mask_rcnn', 'coco_3x'),
    'smt_cascade_3x': ('smt_s_cascade_mask_rcnn', 'coco_3x'),
    'smt_retinanet_3x': ('smt_s_retinanet', 'coco_3x'),
    'smt_atss_3x': ('smt_s_atss', 'coco_3x'),
    'smt_sparse_rcnn_3x': ('smt_s_sparse_rcnn', 'coco_3x'),
    'smt_upernet_160k': ('smt_s_upernet', 'ade20k_160k'),
    'sw_cascade_3x': ('sw_t_cascade_mask_rcnn', 'coco_3x'),
    'sw_upernet_160k': ('sw_t_upernet', 'ade20k_160k'),
}
GROUP_CHARS = '0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'  # a parameter's group; '-': a buffer

# official loss names -> msconv's
LOSS_NAMES = {
    'loss_rpn_cls': 'loss_objectness',
    'loss_rpn_bbox': 'loss_rpn_box_reg',
    'loss_cls': 'loss_classifier',
    'loss_bbox': 'loss_box_reg',
    'loss_mask': 'loss_mask',
    'loss_iou': 'loss_giou',
    'decode.loss_ce': 'loss_decode',
    'aux.loss_ce': 'loss_aux',
}
RETINA_LOSS_NAMES = {'loss_cls': 'classification', 'loss_bbox': 'bbox_regression'}
ATSS_LOSS_NAMES = {**RETINA_LOSS_NAMES, 'loss_centerness': 'bbox_ctrness'}
RCNN_ARCHS = ('mask_rcnn', 'cascade_mask_rcnn')  # RPN + RoI heads with masks


def loss_names(arch: str) -> Dict[str, str]:
    """Official loss names -> msconv's for a detector arch."""
    return {'retinanet': RETINA_LOSS_NAMES, 'atss': ATSS_LOSS_NAMES}.get(arch, LOSS_NAMES)


# ----------------------------------------------------------------------------------------------- scenes
def make_scene(seed: int, size: int = SIZE) -> Dict[str, torch.Tensor]:
    """A synthetic image (3, H, W) in [0, 1] with 3 (seed 0) or 2 (seed 1) elliptic objects: their boxes (XYXY,
    tight around the mask), labels (1..80), masks (N, H, W) uint8, and a semantic label map (H, W) (background
    class 0, objects their own classes, the last 16 rows ignored: 255)."""
    g = torch.Generator().manual_seed(1000 + seed)
    base = F.interpolate(torch.rand(1, 3, 10, 10, generator=g), size=(size, size), mode='bilinear', align_corners=False)
    image = 0.6 * base[0] + 0.1 * torch.rand(3, size, size, generator=g)
    n = 3 if seed == 0 else 2
    yy, xx = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing='ij'
    )
    masks, labels = [], []
    seg = torch.zeros(size, size, dtype=torch.int64)
    for _ in range(n):
        w, h = (40 + 120 * torch.rand(2, generator=g)).tolist()
        cx = w / 2 + (size - w) * torch.rand(1, generator=g).item()
        cy = h / 2 + (size - h) * torch.rand(1, generator=g).item()
        mask = ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 <= 1
        color = torch.rand(3, 1, generator=g)
        image[:, mask] = 0.8 * color + 0.2 * image[:, mask]
        label = int(torch.randint(1, 81, (1,), generator=g))
        masks.append(mask)
        labels.append(label)
        seg[mask] = label % 150
    masks_t = torch.stack(masks).to(torch.uint8)
    boxes = []
    for m in masks_t:
        ys, xs = torch.where(m > 0)
        boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1.0, ys.max().item() + 1.0])
    seg[-16:] = 255
    return dict(
        image=image.clamp(0, 1),
        boxes=torch.tensor(boxes, dtype=torch.float32),
        labels=torch.tensor(labels),
        masks=masks_t,
        seg=seg,
    )


# ----------------------------------------------------------------------------------------------- weights
def _draw(key: str, shape: Sequence[int], dtype: str, seed: int, sparse: bool) -> torch.Tensor:
    """The fixture value of one official state-dict entry: a function of (key, shape, seed) only."""
    if dtype == 'int64':
        return torch.zeros(shape, dtype=torch.int64)
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**62))
    shape = tuple(shape)
    if key.endswith('init_proposal_bboxes.weight'):  # Sparse R-CNN's learnable boxes: (cx, cy, w, h) / image size
        ctr = 0.2 + 0.6 * torch.rand(shape[0], 2, generator=g)
        return torch.cat([ctr, 0.1 + 0.5 * torch.rand(shape[0], 2, generator=g)], dim=1)
    name = key.rsplit('.', 1)[-1]
    if name == 'running_mean':
        return 0.1 * torch.randn(shape, generator=g)
    if name == 'running_var':
        return 0.5 + torch.rand(shape, generator=g)
    numel = math.prod(shape)
    grn = key.endswith(('act.1.gamma', 'act.1.beta'))  # ShiftwiseConv's GRN, (1, 1, 1, C)
    if len(shape) <= 1 or grn:
        if grn:
            return 0.2 * torch.randn(shape, generator=g)
        if name == 'bias':
            return 0.02 * torch.randn(shape, generator=g)
        if name == 'gamma':  # ShiftwiseConv's layer scales: residual branches moderate over 27 blocks
            return 0.3 + 0.03 * torch.randn(shape, generator=g)
        return 1.0 + 0.1 * torch.randn(shape, generator=g)  # norm weights
    fan_in = numel // shape[0]
    gain = 1.0
    if 'fc_cls.' in key and shape[0] == NUM_CLASSES['det']:
        gain = 1.0  # Sparse R-CNN's sigmoid classifier (no background row): scores away from saturation
    elif key.startswith('roi_head.bbox_head.') and key[len('roi_head.bbox_head.')].isdigit() and 'fc_cls.' in key:
        gain = 6.0  # Cascade averages three stages' logits: spread them further
    elif any(p in key for p in ('fc_cls.', 'conv_seg.', 'conv_logits.')):
        gain = 3.0  # spread the class and mask scores: detections above 0.05, mask probabilities away from 0.5
    elif any(p in key for p in ('fc_reg.', 'rpn_reg.', 'retina_reg.', 'atss_reg.')):
        gain = 0.1  # small box deltas: proposals and detections stay near their anchors
    elif 'LoRAs.' in key:
        gain = 0.05  # each shift-wise output sums 2 paths x 4 groups x ceil(K / 3) shifted small kernels
    w = torch.randn(shape, generator=g) * (gain / math.sqrt(fan_in))
    if sparse and 'LoRAs.' in key:  # prune whole small kernels (30%), as SW's sparse training does
        w[torch.rand(shape[0], generator=g) < 0.3] = 0.0
    elif sparse and key.endswith('pwconv1.1.weight'):  # and single weights of a Linear (10%)
        w[torch.rand(shape, generator=g) < 0.1] = 0.0
    return w


def official_weights(spec: List[List], seed: int, sparse: bool = False) -> Dict[str, torch.Tensor]:
    """The official state dict of a fixture, regenerated from its ``state_dict_spec`` ([key, shape, dtype]...)."""
    return {key: _draw(key, shape, dtype, seed, sparse and key.startswith('backbone.')) for key, shape, dtype in spec}


# ----------------------------------------------------------------------------------------------- outputs
def sample_map(prefix: str, x: torch.Tensor, out: Dict[str, torch.Tensor]) -> None:
    """A map (B, C, H, W) kept small: its first 8 channels on a grid of at most ~20 x 20, and every channel's sum."""
    s = max(1, x.shape[-1] // 20)
    out[f'{prefix}.head'] = x[:, :8, ::s, ::s].detach().float().contiguous()
    out[f'{prefix}.sum'] = x.detach().double().sum(dim=(2, 3)).float()


def detection_outputs(
    out: Dict[str, torch.Tensor],
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    mask_probs: Optional[torch.Tensor],
    binary_masks: Optional[torch.Tensor],
) -> None:
    """Final detections (labels 1..K, sorted by score), 28 x 28 mask probabilities of their label, binary masks."""
    out['boxes'], out['scores'], out['labels'] = boxes.float(), scores.float(), labels.to(torch.int64)
    if mask_probs is not None:
        out['mask_probs'] = mask_probs[:MASK_PROBS_KEPT].float().contiguous()
        out['mask_prob_sums'] = mask_probs.double().sum(dim=(1, 2)).float()
        out['mask_areas'] = binary_masks.flatten(1).sum(1).to(torch.int64)
        packed = np.packbits(binary_masks[:MASKS_KEPT].numpy().astype(bool), axis=-1)
        out['masks_packed'] = torch.from_numpy(packed)


def stage_outputs(prefix: str, logits: torch.Tensor, deltas: torch.Tensor, out: Dict[str, torch.Tensor]) -> None:
    """A Sparse R-CNN stage's class logits (B, P, K), kept as their first 8 classes and every proposal's sum, and
    its box deltas (B, P, 4)."""
    out[f'{prefix}.cls.head'] = logits[..., :8].detach().float().contiguous()
    out[f'{prefix}.cls.sum'] = logits.detach().double().sum(-1).float()
    out[f'{prefix}.reg.head'] = deltas.detach().float().contiguous()


def unpack_masks(packed: torch.Tensor, width: int = SIZE) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), axis=-1)[..., :width].astype(bool))


# ----------------------------------------------------------------------------------------------- msconv side
def build_msconv(name: str) -> torch.nn.Module:
    """The msconv system of fixture ``name`` at the fixtures' widths (random weights until loaded)."""
    from msconv.dense import create_detector, create_segmenter

    backbone, arch = SYSTEMS[name]
    if arch == 'upernet':
        return create_segmenter(
            backbone, 'upernet', NUM_CLASSES['seg'], channels=SEG_CHANNELS, aux_channels=SEG_AUX, drop_path_rate=0.0
        )
    return create_detector(
        backbone,
        arch,
        NUM_CLASSES['det'],
        channels=DET_CHANNELS,
        fc_channels=DET_FC,
        min_size=SIZE,
        rois_per_image=SAMPLE_ALL,
        drop_path_rate=0.0,
    )


def load_fixture(name: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    meta = json.loads((FIXTURE_DIR / f'{name}.json').read_text())
    return load_file(str(FIXTURE_DIR / f'{name}.safetensors')), meta


def loaded_msconv(name: str, meta: dict) -> torch.nn.Module:
    """The msconv system with the fixture's weights, converted from the official keys and loaded strictly (SW:
    then the fixtures' step on the pruned weights, which the sparsity masks undo)."""
    from msconv.dense.convert import convert_official_dense

    model = build_msconv(name)
    sparse = meta['sparse']
    model.load_state_dict(convert_official_dense(official_weights(meta['state_dict_spec'], meta['seed'], sparse)))
    if sparse:
        backbone = model.backbone if meta['arch'] == 'upernet' else model.backbone.backbone
        with torch.no_grad():
            for _, param in backbone._maskable():
                param.add_(SPARSE_STEP)
    return model


def _capture_detector(model, arch: str):
    """Forward hooks collecting the FPN maps, the dense head's per-level outputs, the proposals and their scores,
    and the mask probabilities before pasting."""
    cap: Dict[str, object] = {}
    handles = [model.backbone.register_forward_hook(lambda m, i, o: cap.__setitem__('fpn', list(o.values())))]
    if arch == 'atss':
        handles.append(model.head.register_forward_hook(lambda m, i, o: cap.__setitem__('dense', o)))
    elif arch == 'sparse_rcnn':
        cap['stages'] = []
        for stage in model.stages:
            handles.append(stage.register_forward_hook(lambda m, i, o: cap['stages'].append(o[:2])))
    elif arch == 'retinanet':
        cls_head, reg_head = model.head.classification_head, model.head.regression_head
        cap['cls'], cap['reg'] = [], []
        handles.append(cls_head.cls_logits.register_forward_hook(lambda m, i, o: cap['cls'].append(o)))
        handles.append(reg_head.bbox_reg.register_forward_hook(lambda m, i, o: cap['reg'].append(o)))
    else:
        handles.append(model.rpn.head.register_forward_hook(lambda m, i, o: cap.__setitem__('rpn', o)))
        filter_proposals = model.rpn.filter_proposals

        def capture_proposals(*args, **kwargs):
            boxes, scores = filter_proposals(*args, **kwargs)
            cap['proposals'] = (boxes, scores)
            return boxes, scores

        model.rpn.filter_proposals = capture_proposals
        postprocess = model.transform.postprocess

        def capture_masks(result, *args, **kwargs):
            cap['mask_probs'] = [r['masks'].clone() for r in result if 'masks' in r]
            return postprocess(result, *args, **kwargs)

        model.transform.postprocess = capture_masks
    return cap, handles


def run_msconv(name: str, model: torch.nn.Module, multi_scale: bool = True) -> Dict[str, torch.Tensor]:
    """msconv's outputs under the fixture's names (see ``make_dense_fixtures.py``); ``multi_scale=False`` leaves
    out the segmenters' multi-scale + flip inference (three quarters of their time)."""
    from msconv.dense import predict_segmentation

    arch = SYSTEMS[name][1]
    eval_scene = make_scene(EVAL_SCENE)
    out: Dict[str, torch.Tensor] = {}
    model.eval()
    if arch == 'upernet':
        image = eval_scene['image']
        with torch.no_grad():
            feats = model.backbone((image[None] - model.mean) / model.std)
            for i, f in enumerate(feats):
                sample_map(f'backbone.{i}', f, out)
            logits = model(image[None])
        sample_map('logits.whole', logits, out)
        out['logits.whole.argmax'] = logits[0].argmax(0)[::2, ::2].to(torch.uint8)
        modes = [('probs.slide', dict(mode='slide', crop_size=SLIDE_CROP, stride=SLIDE_STRIDE))]
        if multi_scale:
            modes.append(('probs.msflip', dict(ratios=MS_RATIOS, flip=True)))
        for key, kwargs in modes:
            probs = predict_segmentation(model, image, scale=None, **kwargs)[None]
            sample_map(key, probs, out)
            out[f'{key}.argmax'] = probs[0].argmax(0)[::2, ::2].to(torch.uint8)
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout2d):
                m.p = 0.0  # the fixtures' dropout 0
        scenes = [make_scene(s) for s in TRAIN_SCENES]
        with torch.no_grad():
            losses = model.loss(torch.stack([s['image'] for s in scenes]), torch.stack([s['seg'] for s in scenes]))
        for k, v in losses.items():
            out[f'loss.{k}'] = v.detach().reshape(())
        return out

    cap, handles = _capture_detector(model, arch)
    try:
        with torch.no_grad():
            det = model([eval_scene['image']])[0]
    finally:
        for h in handles:
            h.remove()
    for i, f in enumerate(cap['fpn']):
        sample_map(f'fpn.{i}', f, out)
    if arch == 'retinanet':
        for i, (c, r) in enumerate(zip(cap['cls'], cap['reg'])):
            sample_map(f'head.cls.{i}', c, out)
            sample_map(f'head.reg.{i}', r, out)
    elif arch == 'atss':
        for i, maps in enumerate(zip(*cap['dense'])):
            for kind, x in zip(('cls', 'reg', 'ctr'), maps):
                sample_map(f'head.{kind}.{i}', x, out)
    elif arch == 'sparse_rcnn':
        for t, (logits, deltas) in enumerate(cap['stages']):
            stage_outputs(f's{t}', logits, deltas, out)
    else:
        objectness, deltas = cap['rpn']
        for i, (c, r) in enumerate(zip(objectness, deltas)):
            sample_map(f'rpn.cls.{i}', c, out)
            sample_map(f'rpn.reg.{i}', r, out)
        out['proposals'] = cap['proposals'][0][0].float()
        out['proposal_scores'] = cap['proposals'][1][0].float()
    has_masks = 'masks' in det
    probs = cap['mask_probs'][0][:, 0] if has_masks else None
    binary = det['masks'][:, 0] >= 0.5 if has_masks else None
    detection_outputs(out, det['boxes'], det['scores'], det['labels'], probs, binary)

    scenes = [make_scene(s) for s in TRAIN_SCENES]
    targets = [dict(boxes=s['boxes'], labels=s['labels'], masks=s['masks']) for s in scenes]
    model.train()
    if arch in RCNN_ARCHS:
        model.rpn.fg_bg_sampler.batch_size_per_image = SAMPLE_ALL
    with torch.no_grad():
        losses = model([s['image'] for s in scenes], targets)
    for k, v in losses.items():
        out[f'loss.{k}'] = v.detach().reshape(())
    return out


# ----------------------------------------------------------------------------------------------- comparison
def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| (0 for two empty tensors)."""
    if ref.numel() == 0 and ours.numel() == 0:
        return 0.0
    scale = ref.double().abs().max().item()
    return (ours.double() - ref.double()).abs().max().item() / max(scale, 1e-12)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou as iou

    return iou(a.double(), b.double())


def match_detections(ours: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], iou: float = 0.99) -> List[int]:
    """For each reference detection, the index of an unused msconv detection of the same label at IoU > ``iou``
    (-1 if none), in the reference's order."""
    if len(ref['boxes']) == 0 or len(ours['boxes']) == 0:
        return [-1] * len(ref['boxes'])
    ious = box_iou(ref['boxes'], ours['boxes'])
    ious[ref['labels'][:, None] != ours['labels'][None, :]] = 0
    used, pairs = set(), []
    for i in range(len(ref['boxes'])):
        order = torch.argsort(ious[i], descending=True).tolist()
        j = next((j for j in order if j not in used and ious[i, j] > iou), -1)
        if j >= 0:
            used.add(j)
        pairs.append(j)
    return pairs


def compare(ours: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """One figure per output present on both sides: max relative differences (maps, proposals, losses, matched
    detections' boxes / scores / mask probabilities), argmax agreement (segmentation), ``detections_matched`` and
    ``proposals_matched`` (counts, beside ``detections`` / ``proposal_count``), ``mask_iou_min`` (binary masks of
    matched detections) and ``mask_area_pixels`` (largest area difference)."""
    res: Dict[str, float] = {}
    for key, val in ref.items():
        if key not in ours:
            continue
        if key.endswith(('.head', '.sum')) or key.startswith('loss.'):
            res[key] = rel_diff(ours[key], val)
        elif key.endswith('.argmax'):
            res[key] = (ours[key] == val).double().mean().item()
    if 'proposals' in ref:  # as sets: near-equal scores may come in either order
        ious = box_iou(ref['proposals'], ours['proposals'])
        best, j = ious.max(dim=1) if ious.numel() else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
        hit = best > 0.999
        res['proposal_count'] = float(len(ref['proposals']))
        res['proposals_matched'] = float(hit.sum()) if len(ours['proposals']) == len(ref['proposals']) else 0.0
        res['proposals'] = rel_diff(ours['proposals'][j[hit]], ref['proposals'][hit])
        res['proposal_scores'] = rel_diff(ours['proposal_scores'][j[hit]], ref['proposal_scores'][hit])
    if 'boxes' in ref:
        pairs = match_detections(ours, ref)
        idx = [i for i, j in enumerate(pairs) if j >= 0]
        jdx = [j for j in pairs if j >= 0]
        res['detections'] = float(len(ref['boxes']))
        res['detections_matched'] = float(len(idx))
        res['boxes'] = rel_diff(ours['boxes'][jdx], ref['boxes'][idx]) if idx else 0.0
        res['scores'] = rel_diff(ours['scores'][jdx], ref['scores'][idx]) if idx else 0.0
        if 'mask_probs' in ref:
            k = [(i, j) for i, j in zip(idx, jdx) if i < len(ref['mask_probs']) and j < len(ours['mask_probs'])]
            res['mask_probs'] = (
                rel_diff(ours['mask_probs'][[j for _, j in k]], ref['mask_probs'][[i for i, _ in k]]) if k else 0.0
            )
            res['mask_prob_sums'] = rel_diff(ours['mask_prob_sums'][jdx], ref['mask_prob_sums'][idx]) if idx else 0.0
            ref_masks, our_masks = unpack_masks(ref['masks_packed']), unpack_masks(ours['masks_packed'])
            ious = []
            for i, j in zip(idx, jdx):
                if i < len(ref_masks) and j < len(our_masks):
                    inter = (ref_masks[i] & our_masks[j]).sum().item()
                    union = (ref_masks[i] | our_masks[j]).sum().item()
                    ious.append(inter / union if union else 1.0)
            res['mask_iou_min'] = min(ious) if ious else 1.0
            # pixels at probability ~0.5 may land on either side of the threshold: areas compared in pixels
            diff = (ours['mask_areas'][jdx] - ref['mask_areas'][idx]).abs()
            res['mask_area_pixels'] = float(diff.max()) if idx else 0.0
    return res
