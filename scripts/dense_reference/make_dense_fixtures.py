"""Write the dense reference fixtures (``tests/fixtures/dense``): the official SMT / ShiftwiseConv mmdetection and
mmsegmentation configs, run in mmdetection 2.28.2 / mmsegmentation 0.30.0 on one set of random weights.

Run it with the reference environment's python (``install_reference_env.sh``), this checkout's ``src`` and
``tests`` on the path (it uses ``tests/dense_reference.py`` for the scenes, the weights and the comparison):

    /work/envs/mmref/bin/python scripts/dense_reference/make_dense_fixtures.py \\
        --official-src /work/envs/official-src [--systems smt_s_mask_rcnn ...] [--compare] [--optimizer-groups]

``--official-src`` is a folder holding exports (``git archive``) of the two official repositories,
``AFeng-x+SMT`` (commit 11e954d) and ``lidc54+shift-wiseConv`` (commit 2202e6b); no official code is copied into
this repository. What this script handles, without editing the official files:

* mmcv built without ops has no ``mmcv._ext``: ``mmcv_ext.py`` (torchvision's RoIAlign and NMS) stands in; the
  SW backbone's CUDA ``shiftadd`` package: ``shiftadd_ops.py``;
* the official backbones are loaded from their files into the ``mmdet`` / ``mmseg`` backbone packages; SMT's
  ``from ..utils import smt_convert`` gets a stand-in (checkpoint conversion is never used: weights are set
  here), SW's ``use_sync_bn`` is set to False (SyncBN -> BN on the CPU), as is every config's SyncBN;
* the configs' ``_base_`` files come from the mmdet / mmseg wheels (``.mim/configs/_base_``), linked beside a
  scratch copy of each configs folder; ``upernet_smt_512x512_160k_ade20k.py`` inherits ``upernet_ressa_s.py``,
  which the repository does not have: a one-line file inheriting ``upernet_smt_s.py`` (the SMT-S UperNet model)
  takes its place;
* the SW backbone builds its sparsity masks only when ``init_weights`` loads a checkpoint (and on CUDA): here
  the masks are taken from the random weights' zeros, as ``init_weights`` would from a checkpoint's;
* the SMT backbones' ``init_weights`` name ``normal_init`` without importing it, and SMT-B's 3x config passes
  ``groups_mode``, which the backbone rejects: neither is used here (the SMT-S configs, weights set directly);
* ``atss_smt_s_fpn.py`` gives its FPN three inputs (``in_channels=[128, 256, 512]``, ``start_level=0``) while the
  backbone returns four stages: mmdet's FPN asserts on it, so the released config does not run. The backbone here
  returns stages 2-4 (``out_indices=[1, 2, 3]``): the FPN the config describes (C3-C5, P6 / P7 on the P5 output).

With ``--optimizer-groups`` it writes ``optimizer_groups.json`` instead: for the optimizer of each official config
(``ref.OPTIMIZER_SYSTEMS``: SMT Mask R-CNN 1x and 3x, Cascade, RetinaNet, ATSS, Sparse R-CNN, UperNet; SW-T Cascade
and UperNet), built as mmdet / mmseg's training scripts build it (``build_optimizer(model, cfg.optimizer)``; SW: the
repository's ``LearningRateDecayOptimizerConstructor`` files in place of the wheels' own), each distinct (lr, weight
decay) and each parameter's, over the keys of the model fixture it shares (``tests/test_dense_optimizer.py``). Two
more quirks:
the 1x config's base ``mask_rcnn_ressa_fpn.py`` is missing too (a stand-in inheriting ``mask_rcnn_smt_s_fpn.py``),
and the SMT detection configs set AdamW without ``_delete_=True``, so it keeps schedule_1x.py's SGD ``momentum=0.9``,
which torch's AdamW rejects: it is dropped (noted in the json); the 3x Mask R-CNN config gets SMT-S's backbone.

Per system it saves ``<name>.safetensors`` (the official outputs: FPN maps, dense head outputs, proposals,
detections, mask probabilities and binary masks; UperNet backbone maps and logits / probabilities whole,
multi-scale + flip and slide; the training losses of two scenes) and ``<name>.json`` (the official state dict's
keys, shapes and dtypes, the seed, the config changes, the environment). With ``--compare`` it also builds the
msconv system from the same weights and prints the comparison table.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO / 'tests'), str(REPO / 'src')]

import dense_reference as ref  # noqa: E402  (tests/dense_reference.py)

SEED = 2024
SMT_REPO, SW_REPO = 'AFeng-x+SMT', 'lidc54+shift-wiseConv'
# fixture -> (repository, task folder, config file inside <folder>/configs)
CONFIGS = {
    'smt_s_mask_rcnn': (SMT_REPO, 'detection', 'mask_rcnn_smt_s_fpn.py'),
    'smt_s_cascade_mask_rcnn': (
        SMT_REPO,
        'detection',
        'cascade_mask_rcnn_ressa_mstrain_480-800_giou_4conv1f_adamw_3x_coco.py',
    ),
    'smt_s_retinanet': (SMT_REPO, 'detection', 'retinanet_ressa_fpn_mstrain_480-800_3x_coco.py'),
    'smt_s_atss': (SMT_REPO, 'detection', 'atss_ressa_mstrain_3x_coco.py'),
    'smt_s_sparse_rcnn': (SMT_REPO, 'detection', 'sparse_rcnn_ressa_mstrain_3x_coco.py'),
    'smt_s_upernet': (SMT_REPO, 'segmentation', 'upernet_smt_512x512_160k_ade20k.py'),
    'sw_t_cascade_mask_rcnn': (
        SW_REPO,
        'downstream/detection',
        'cascade_mask_rcnn_sw_tiny_mstrain_480-800_adamw_3x_coco_in1k.py',
    ),
    'sw_t_upernet': (SW_REPO, 'downstream/segmentation', 'upernet_sw_tiny_512_160k_ade20k_ss.py'),
}
COMMITS = {SMT_REPO: '11e954d9b4d0f513397ba011669c7864fd94e5fb', SW_REPO: '2202e6b5c94df2606fecd8202831bb58966d14bc'}
# optimizer-group fixture systems whose config is not their model fixture's (ref.OPTIMIZER_SYSTEMS)
OPTIMIZER_CONFIGS = {
    'smt_mask_rcnn_1x': (SMT_REPO, 'detection', 'mask_rcnn_ResSA_fpn_1x_coco.py'),
    'smt_mask_rcnn_3x': (SMT_REPO, 'detection', 'mask_rcnn_smt_b_fpn_mstrain-poly_3x_coco.py'),
}
GPUS = 8  # the configs' GPUs (mmdet default_runtime.py:26): auto_scale_lr's batch is GPUS x samples_per_gpu


# ------------------------------------------------------------------------------------------- official code
def load_official_code(src: Path) -> None:
    """Stand-ins for the compiled parts, then the official backbones registered in mmdet / mmseg."""
    import mmcv_ext
    import shiftadd_ops

    mmcv_ext.install()
    shiftadd_ops.install()
    import mmcv.ops  # noqa: F401
    import mmdet.models
    import mmdet.models.utils
    import mmseg.models
    import mmseg.models.utils

    for utils in (mmdet.models.utils, mmseg.models.utils):
        utils.smt_convert = lambda state_dict: state_dict  # only used when init_weights loads a checkpoint
    files = [
        ('mmdet.models.backbones.smt', src / SMT_REPO / 'detection/mmdet/models/backbones/smt.py'),
        ('mmseg.models.backbones.smt', src / SMT_REPO / 'segmentation/mmseg/models/backbones/smt.py'),
        ('mmdet.models.backbones.SW_v2_unirep', src / SW_REPO / 'downstream/detection/SW_v2_unirep.py'),
        ('mmseg.models.backbones.SW_v2_unirep', src / SW_REPO / 'downstream/segmentation/SW_v2_unirep.py'),
    ]
    for name, path in files:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        if hasattr(module, 'use_sync_bn'):
            module.use_sync_bn = False  # nn.BatchNorm2d instead of nn.SyncBatchNorm on the CPU


def config_folder(src: Path, repo: str, task: str, scratch: Path) -> Path:
    """A scratch copy of ``<repo>/<task>/configs`` with ``../_base_`` linked to the wheel's ``_base_`` files."""
    import mmdet
    import mmseg

    wheel = mmseg if 'segmentation' in task else mmdet
    root = scratch / repo / task
    configs = root / 'configs'
    if not configs.exists():
        shutil.copytree(src / repo / task / 'configs', configs)
        (root / '_base_').symlink_to(Path(wheel.__file__).parent / '.mim' / 'configs' / '_base_')
        if repo == SMT_REPO and task == 'segmentation':
            (configs / 'upernet_ressa_s.py').write_text("_base_ = ['./upernet_smt_s.py']\n")
        if repo == SMT_REPO and task == 'detection':  # the 1x config's base, also missing: SMT-S's Mask R-CNN
            (configs / 'mask_rcnn_ressa_fpn.py').write_text("_base_ = ['./mask_rcnn_smt_s_fpn.py']\n")
    return configs


def _sync_bn_to_bn(cfg) -> None:
    if isinstance(cfg, dict):
        if cfg.get('type') == 'SyncBN':
            cfg['type'] = 'BN'
        for v in cfg.values():
            _sync_bn_to_bn(v)
    elif isinstance(cfg, (list, tuple)):
        for v in cfg:
            _sync_bn_to_bn(v)


def fixture_config(name: str, cfg) -> List[str]:
    """The fixture's changes to the official model config (the same ones the msconv side makes); returns them as
    text for the json."""
    model = cfg.model
    changes = ['SyncBN -> BN', 'backbone drop_path_rate 0']
    _sync_bn_to_bn(model)
    model.backbone.drop_path_rate = 0.0
    model.backbone.pop('init_cfg', None)
    model.pop('pretrained', None)
    if ref.SYSTEMS[name][1] == 'upernet':
        model.decode_head.channels = ref.SEG_CHANNELS
        model.decode_head.dropout_ratio = 0.0
        model.auxiliary_head.channels = ref.SEG_AUX
        model.auxiliary_head.dropout_ratio = 0.0
        changes += [f'decode_head.channels {ref.SEG_CHANNELS}', f'auxiliary_head.channels {ref.SEG_AUX}', 'dropout 0']
        return changes
    c, fc = ref.DET_CHANNELS, ref.DET_FC
    model.neck.out_channels = c
    if model.type == 'SparseRCNN':
        model.rpn_head.proposal_feature_channel = model.roi_head.proposal_feature_channel = c
        model.roi_head.bbox_roi_extractor.out_channels = c
        for h in model.roi_head.bbox_head:
            h.in_channels, h.feedforward_channels = c, fc
            h.dynamic_conv_cfg.in_channels = h.dynamic_conv_cfg.out_channels = c
        changes += [f'FPN / proposal features / DII heads {c} channels, FFN {fc}']
    elif 'rpn_head' in model:
        model.rpn_head.in_channels = model.rpn_head.feat_channels = c
        roi = model.roi_head
        roi.bbox_roi_extractor.out_channels = roi.mask_roi_extractor.out_channels = c
        heads = roi.bbox_head if isinstance(roi.bbox_head, list) else [roi.bbox_head]
        for h in heads:
            h.in_channels, h.fc_out_channels = c, fc
            if 'conv_out_channels' in h:
                h.conv_out_channels = c
        roi.mask_head.in_channels = roi.mask_head.conv_out_channels = c
        train = cfg.model.train_cfg
        train.rpn.sampler.num = ref.SAMPLE_ALL
        for stage in train.rcnn if isinstance(train.rcnn, list) else [train.rcnn]:
            stage.sampler.num = ref.SAMPLE_ALL
        changes += [f'FPN / RPN / RoI extractor / heads {c} channels, box fcs {fc}', f'samplers num {ref.SAMPLE_ALL}']
    else:
        model.bbox_head.in_channels = model.bbox_head.feat_channels = c
        changes += [f'FPN / {model.bbox_head.type} {c} channels']
        if model.type == 'ATSS':
            model.backbone.out_indices = [1, 2, 3]
            changes += ['backbone out_indices [1, 2, 3] (the FPN takes three levels; the released config fails)']
    return changes


def build_official(name: str, src: Path, scratch: Path):
    from mmcv import Config

    repo, task, file = CONFIGS[name]
    cfg = Config.fromfile(str(config_folder(src, repo, task, scratch) / file))
    changes = fixture_config(name, cfg)
    if ref.SYSTEMS[name][1] == 'upernet':
        from mmseg.models import build_segmentor

        model = build_segmentor(cfg.model)
    else:
        from mmdet.models import build_detector

        model = build_detector(cfg.model)
    return model, changes, f'{repo}/{task}/configs/{file}'


def set_official_weights(model, spec, sparse: bool) -> None:
    """Load the fixture weights; SW: take the sparsity masks from their zeros (the official ``init_weights`` does so
    from a checkpoint), then move every maskable weight by SPARSE_STEP, which the next forward's masks undo."""
    model.load_state_dict(ref.official_weights(spec, SEED, sparse), strict=True)
    if sparse:
        backbone = model.backbone
        backbone.masks = {
            n: (p != 0).float() for n, p in backbone.named_parameters() if p.dim() in (2, 4)
        }  # official: len(weight.size()) == 2 or == 4
        with torch.no_grad():
            for n, p in backbone.named_parameters():
                if n in backbone.masks:
                    p.add_(ref.SPARSE_STEP)


# ------------------------------------------------------------------------------------------- running them
def _img_meta(h: int, w: int, flip: bool = False) -> dict:
    return dict(
        img_shape=(h, w, 3),
        ori_shape=(ref.SIZE, ref.SIZE, 3),
        pad_shape=(h, w, 3),
        batch_input_shape=(h, w),
        scale_factor=np.ones(4, dtype=np.float32),
        flip=flip,
        flip_direction='horizontal' if flip else None,
    )


def _normalize(images: torch.Tensor) -> torch.Tensor:
    """mmdet/mmseg's ``Normalize`` (mean 123.675/116.28/103.53, std 58.395/57.12/57.375 on 0-255 RGB)."""
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    return (images * 255 - mean) / std


def run_official_detector(name: str, model) -> Dict[str, torch.Tensor]:
    from mmdet.core import BitmapMasks

    arch = ref.SYSTEMS[name][1]
    scene = ref.make_scene(ref.EVAL_SCENE)
    img, meta = _normalize(scene['image'][None]), _img_meta(ref.SIZE, ref.SIZE)
    cap: Dict[str, object] = {}
    model.eval()
    handles = [model.neck.register_forward_hook(lambda m, i, o: cap.__setitem__('fpn', o))]
    restore = []
    if arch == 'sparse_rcnn':
        import mmdet.models.roi_heads.sparse_roi_head as sparse_roi_head

        cap['stages'] = []
        for head in model.roi_head.bbox_head:
            handles.append(head.register_forward_hook(lambda m, i, o: cap['stages'].append(o[:2])))
        bbox2result = sparse_roi_head.bbox2result

        def capture_results(bboxes, labels, num_classes):
            cap['dets'] = (bboxes, labels)
            return bbox2result(bboxes, labels, num_classes)

        sparse_roi_head.bbox2result = capture_results
        restore.append(lambda: setattr(sparse_roi_head, 'bbox2result', bbox2result))
    elif arch in ('retinanet', 'atss'):
        head = model.bbox_head
        forward = head.forward  # simple_test_bboxes calls self.forward, not the module: no hooks

        def capture_dense(*args, **kwargs):
            res = forward(*args, **kwargs)
            cap['dense'] = res
            return res

        head.forward = capture_dense
        simple_test = head.simple_test

        def capture_dets(*args, **kwargs):
            res = simple_test(*args, **kwargs)
            cap['dets'] = res[0]
            return res

        head.simple_test = capture_dets
    else:
        rpn = model.rpn_head
        handles.append(rpn.register_forward_hook(lambda m, i, o: cap.__setitem__('dense', o)))
        simple_test_rpn = rpn.simple_test_rpn

        def capture_proposals(*args, **kwargs):
            res = simple_test_rpn(*args, **kwargs)
            cap['proposals'] = res[0]
            return res

        rpn.simple_test_rpn = capture_proposals
        roi = model.roi_head
        bbox_head = roi.bbox_head[-1] if arch == 'cascade_mask_rcnn' else roi.bbox_head
        mask_head = roi.mask_head[-1] if arch == 'cascade_mask_rcnn' else roi.mask_head
        get_bboxes, get_seg_masks = bbox_head.get_bboxes, mask_head.get_seg_masks

        def capture_dets(*args, **kwargs):
            res = get_bboxes(*args, **kwargs)
            cap['dets'] = res
            return res

        def capture_masks(mask_pred, det_bboxes, det_labels, *args, **kwargs):
            res = get_seg_masks(mask_pred, det_bboxes, det_labels, *args, **kwargs)
            if isinstance(mask_pred, torch.Tensor):
                probs = mask_pred.sigmoid()  # Mask R-CNN: logits
            else:
                probs = torch.from_numpy(np.asarray(mask_pred))  # Cascade: the stages' mean probabilities
            labels = det_labels.long()
            cap['mask_probs'] = probs[torch.arange(len(labels)), labels]
            cap['segm'] = res
            return res

        bbox_head.get_bboxes, mask_head.get_seg_masks = capture_dets, capture_masks
    try:
        with torch.no_grad():
            model.simple_test(img, [meta], rescale=True)
    finally:
        for h in handles:
            h.remove()
        for undo in restore:
            undo()
    out: Dict[str, torch.Tensor] = {}
    for i, f in enumerate(cap['fpn']):
        ref.sample_map(f'fpn.{i}', f, out)
    if arch == 'sparse_rcnn':
        for t, (logits, deltas) in enumerate(cap['stages']):
            ref.stage_outputs(f's{t}', logits, deltas, out)
    else:
        dense = cap['dense']
        prefix = 'rpn' if arch in ref.RCNN_ARCHS else 'head'
        for i, maps in enumerate(zip(*dense)):
            for kind, x in zip(('cls', 'reg', 'ctr'), maps):
                ref.sample_map(f'{prefix}.{kind}.{i}', x, out)
    if arch in ref.RCNN_ARCHS:
        out['proposals'] = cap['proposals'][:, :4].float().contiguous()
        out['proposal_scores'] = cap['proposals'][:, 4].float().contiguous()
    det_bboxes, det_labels = cap['dets']
    probs = binary = None
    if arch in ref.RCNN_ARCHS:
        probs = cap['mask_probs']
        # segm: per class, the binary masks of that class's detections in detection order
        seen = {c: 0 for c in range(ref.NUM_CLASSES['det'])}
        binary = []
        for lab in det_labels.tolist():
            binary.append(torch.from_numpy(np.asarray(cap['segm'][lab][seen[lab]])))
            seen[lab] += 1
        binary = torch.stack(binary) if binary else torch.zeros(0, ref.SIZE, ref.SIZE, dtype=torch.bool)
    ref.detection_outputs(out, det_bboxes[:, :4], det_bboxes[:, 4], det_labels + 1, probs, binary)

    # training losses: two scenes, every anchor and RoI sampled
    scenes = [ref.make_scene(s) for s in ref.TRAIN_SCENES]
    imgs = _normalize(torch.stack([s['image'] for s in scenes]))
    metas = [_img_meta(ref.SIZE, ref.SIZE) for _ in scenes]
    kwargs = dict(gt_bboxes=[s['boxes'] for s in scenes], gt_labels=[s['labels'] - 1 for s in scenes])
    if arch in ref.RCNN_ARCHS:
        kwargs['gt_masks'] = [BitmapMasks(s['masks'].numpy(), ref.SIZE, ref.SIZE) for s in scenes]
    model.train()
    with torch.no_grad():
        losses = model.forward_train(imgs, metas, **kwargs)
    names = ref.loss_names(arch)
    for key, val in losses.items():
        key = re.sub(r'^stage(\d+)_', r's\1.', key)  # Sparse R-CNN: 'stage0_loss_cls'
        stage, _, base = key.rpartition('.')
        if base not in names:
            continue  # accuracies
        total = sum(val) if isinstance(val, (list, tuple)) else val
        out[f"loss.{stage + '.' if stage else ''}{names[base]}"] = total.detach().reshape(()).float()
    return out


def run_official_segmenter(name: str, model) -> Dict[str, torch.Tensor]:
    import torch.nn.functional as F

    scene = ref.make_scene(ref.EVAL_SCENE)
    image = scene['image'][None]
    out: Dict[str, torch.Tensor] = {}
    model.eval()
    with torch.no_grad():
        for i, f in enumerate(model.extract_feat(_normalize(image))):
            ref.sample_map(f'backbone.{i}', f, out)
        model.test_cfg.mode = 'whole'
        logits = model.encode_decode(_normalize(image), [_img_meta(ref.SIZE, ref.SIZE)])
        ref.sample_map('logits.whole', logits, out)
        out['logits.whole.argmax'] = logits[0].argmax(0)[::2, ::2].to(torch.uint8)
        # multi-scale + flip: mmseg's aug_test averages ``inference`` (softmax, flipped back) over the images of
        # MultiScaleFlipAug; the rescaled images are made as msconv's predict_segmentation makes them
        probs = 0
        n = 0
        for r in ref.MS_RATIOS:
            size = (max(int(ref.SIZE * r + 0.5), 1),) * 2
            scaled = F.interpolate(image, size=size, mode='bilinear', align_corners=False)
            for flip in (False, True):
                x = scaled.flip(-1) if flip else scaled
                probs = probs + model.inference(_normalize(x), [_img_meta(*size, flip=flip)], rescale=True)
                n += 1
        probs = probs / n
        ref.sample_map('probs.msflip', probs, out)
        out['probs.msflip.argmax'] = probs[0].argmax(0)[::2, ::2].to(torch.uint8)
        model.test_cfg.mode, model.test_cfg.crop_size, model.test_cfg.stride = 'slide', ref.SLIDE_CROP, ref.SLIDE_STRIDE
        probs = model.inference(_normalize(image), [_img_meta(ref.SIZE, ref.SIZE)], rescale=True)
        ref.sample_map('probs.slide', probs, out)
        out['probs.slide.argmax'] = probs[0].argmax(0)[::2, ::2].to(torch.uint8)
    scenes = [ref.make_scene(s) for s in ref.TRAIN_SCENES]
    imgs = _normalize(torch.stack([s['image'] for s in scenes]))
    seg = torch.stack([s['seg'] for s in scenes])[:, None]
    model.train()
    with torch.no_grad():
        losses = model.forward_train(imgs, [_img_meta(ref.SIZE, ref.SIZE) for _ in scenes], seg)
    for key, val in losses.items():
        if key in ref.LOSS_NAMES:
            out[f'loss.{ref.LOSS_NAMES[key]}'] = val.detach().reshape(()).float()
    return out


# ------------------------------------------------------------------------------------------- optimizer groups
def load_official_optimizer_constructors(src: Path) -> None:
    """The ShiftwiseConv repository's ``LearningRateDecayOptimizerConstructor`` files in place of the wheels' own
    (the repository ships them as replacements of mmdet's / mmseg's ``core/optimizers`` files)."""
    from mmdet.core.optimizers import builder as det_builder
    from mmseg.core import builder as seg_builder

    for registry, names in (
        (det_builder.OPTIMIZER_BUILDERS, ('LearningRateDecayOptimizerConstructor',)),
        (seg_builder.OPTIMIZER_BUILDERS, ('LearningRateDecayOptimizerConstructor', 'LayerDecayOptimizerConstructor')),
    ):
        for name in names:
            registry._module_dict.pop(name, None)
    for name, path in (
        ('mmdet.core.optimizers.layer_decay_optimizer_constructor', 'downstream/detection/mmdet/core/optimizers'),
        ('mmseg.core.optimizers.layer_decay_optimizer_constructor', 'downstream/segmentation/mmseg/core/optimizers'),
    ):
        spec = importlib.util.spec_from_file_location(
            name, src / SW_REPO / path / 'layer_decay_optimizer_constructor.py'
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def official_optimizer_groups(system: str, src: Path, scratch: Path) -> dict:
    """Build the official model and optimizer of ``system`` (``ref.OPTIMIZER_SYSTEMS``) as mmdet / mmseg's training
    scripts do (``build_optimizer(model, cfg.optimizer)``, ``auto_scale_lr`` at the configs' 8 GPUs); returns each
    distinct (lr, weight_decay) and, over the model fixture's state-dict keys, each parameter's group."""
    from mmcv import Config

    fixture, _ = ref.OPTIMIZER_SYSTEMS[system]
    repo, task, file = OPTIMIZER_CONFIGS.get(system, CONFIGS[fixture])
    folder = config_folder(src, repo, task, scratch)
    cfg = Config.fromfile(str(folder / file))
    notes = []
    if system == 'smt_mask_rcnn_3x':  # SMT-B's file (its groups_mode is rejected by the backbone): SMT-S's backbone
        cfg.model.backbone = Config.fromfile(str(folder / 'mask_rcnn_smt_s_fpn.py')).model.backbone
        notes.append('backbone: mask_rcnn_smt_s_fpn.py (SMT-S)')
    fixture_config(fixture, cfg)
    if ref.SYSTEMS[fixture][1] == 'upernet':
        from mmseg.core.builder import build_optimizer
        from mmseg.models import build_segmentor

        model = build_segmentor(cfg.model)
    else:
        from mmdet.core.optimizers.builder import build_optimizer
        from mmdet.models import build_detector

        model = build_detector(cfg.model)
    spec = json.loads((ref.FIXTURE_DIR / f'{fixture}.json').read_text())['state_dict_spec']
    keys = [k for k, _, _ in spec]
    assert list(model.state_dict()) == keys, f'{system}: the model differs from fixture {fixture}'
    optimizer_cfg = copy.deepcopy(cfg.optimizer)
    if optimizer_cfg['type'] == 'AdamW' and 'momentum' in optimizer_cfg:
        # the SMT detection configs give their AdamW without _delete_=True: it merges with schedule_1x.py's SGD and
        # keeps momentum=0.9, which torch's AdamW rejects (mmdet's train_detector would stop here)
        optimizer_cfg.pop('momentum')
        notes.append("momentum=0.9 inherited from schedule_1x.py's SGD dropped (torch's AdamW rejects it)")
    scale = cfg.get('auto_scale_lr', {})
    if scale.get('enable', False):  # mmdet/utils/util_distribution.py's auto_scale_lr, at the configs' batch
        optimizer_cfg['lr'] *= GPUS * cfg.data.samples_per_gpu / scale['base_batch_size']
        notes.append(f"auto_scale_lr at {GPUS} x {cfg.data.samples_per_gpu} images")
    optimizer = build_optimizer(model, optimizer_cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    groups, of = [], {}
    for g in optimizer.param_groups:
        pair = [float(g['lr']), float(g['weight_decay'])]
        if pair not in groups:
            groups.append(pair)
        for p in g['params']:
            of[names[id(p)]] = ref.GROUP_CHARS[groups.index(pair)]
    assert set(of) == set(names.values()), f'{system}: parameters outside the optimizer'
    return dict(
        fixture=fixture,
        official_config=f'{repo}/{task}/configs/{file}',
        optimizer=json.loads(json.dumps(optimizer_cfg, default=str)),
        notes=notes,
        groups=groups,
        params=''.join(of.get(k, '-') for k in keys),
    )


def make_optimizer_fixture(src: Path, scratch: Path, out_dir: Path) -> None:
    import mmcv
    import mmdet
    import mmseg

    load_official_optimizer_constructors(src)
    systems = {}
    for system in ref.OPTIMIZER_SYSTEMS:
        systems[system] = official_optimizer_groups(system, src, scratch)
        rec = systems[system]
        print(f"{system}: {len(rec['groups'])} groups over {sum(c != '-' for c in rec['params'])} parameters")
    meta = dict(
        commits={repo.replace('+', '/'): c for repo, c in COMMITS.items()},
        environment=dict(mmcv=mmcv.__version__, mmdet=mmdet.__version__, mmseg=mmseg.__version__),
        systems=systems,
    )
    (out_dir / 'optimizer_groups.json').write_text(json.dumps(meta, indent=1) + '\n')


# ------------------------------------------------------------------------------------------- main
def make_fixture(name: str, src: Path, scratch: Path, out_dir: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model, changes, config = build_official(name, src, scratch)
    spec = [[k, list(v.shape), str(v.dtype).replace('torch.', '')] for k, v in model.state_dict().items()]
    sparse = name.startswith('sw_')
    set_official_weights(model, spec, sparse)
    t0 = time.time()
    if ref.SYSTEMS[name][1] == 'upernet':
        out = run_official_segmenter(name, model)
    else:
        out = run_official_detector(name, model)
    seconds = time.time() - t0
    out = {k: v.contiguous() for k, v in out.items()}
    save_file(out, str(out_dir / f'{name}.safetensors'))
    import mmcv
    import mmdet
    import mmseg

    repo = CONFIGS[name][0]
    meta = dict(
        name=name,
        backbone=ref.SYSTEMS[name][0],
        arch=ref.SYSTEMS[name][1],
        official_config=config,
        official_repo=repo.replace('+', '/'),
        official_commit=COMMITS[repo],
        config_changes=changes,
        seed=SEED,
        sparse=sparse,
        sparse_step=ref.SPARSE_STEP if sparse else None,
        environment=dict(
            torch=torch.__version__,
            mmcv=mmcv.__version__,
            mmdet=mmdet.__version__,
            mmseg=mmseg.__version__,
            python=platform.python_version(),
            threads=torch.get_num_threads(),
        ),
        official_seconds=round(seconds, 1),
        tensors={k: list(v.shape) for k, v in out.items()},
        state_dict_spec=spec,
    )
    (out_dir / f'{name}.json').write_text(json.dumps(meta, indent=0) + '\n')
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--official-src', type=Path, required=True)
    parser.add_argument('--out', type=Path, default=ref.FIXTURE_DIR)
    parser.add_argument('--systems', nargs='*', default=list(CONFIGS))
    parser.add_argument('--compare', action='store_true', help='also run msconv and print the comparison')
    parser.add_argument(
        '--optimizer-groups',
        action='store_true',
        help='write optimizer_groups.json (each parameter\'s official lr and weight decay) instead of the outputs',
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
    load_official_code(args.official_src)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.optimizer_groups:
        with tempfile.TemporaryDirectory() as scratch:
            make_optimizer_fixture(args.official_src, Path(scratch), args.out)
        return
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.systems:
            t0 = time.time()
            official = make_fixture(name, args.official_src, Path(scratch), args.out)
            print(f'{name}: official outputs in {time.time() - t0:.1f} s', flush=True)
            if args.compare:
                _, meta = (
                    ref.load_fixture(name)
                    if args.out == ref.FIXTURE_DIR
                    else (None, json.loads((args.out / f'{name}.json').read_text()))
                )
                ours = ref.run_msconv(name, ref.loaded_msconv(name, meta))
                for key, val in ref.compare(ours, copy.copy(official)).items():
                    print(f'  {key:32s} {val:.3g}')


if __name__ == '__main__':
    main()
