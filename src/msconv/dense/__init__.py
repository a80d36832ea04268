"""Dense prediction with msconv backbones: the SMT and ShiftwiseConv papers' COCO detectors and ADE20K segmenters.

* :func:`create_detector` (``mask_rcnn``, ``cascade_mask_rcnn``, ``retinanet``: :mod:`msconv.dense.detection`;
  ``atss``: :mod:`msconv.dense.atss`; ``sparse_rcnn``: :mod:`msconv.dense.sparse_rcnn`)
* :func:`create_segmenter` (``upernet``): :mod:`msconv.dense.segmentation`
* :func:`evaluate_coco`, :func:`evaluate_segmentation`: :mod:`msconv.dense.evaluation`
* datasets and transforms: :mod:`msconv.data.coco`, :mod:`msconv.data.ade`, :mod:`msconv.data.dense_digits`
* parameters / MACs as the papers count them: :func:`msconv.tools.dense_profile.profile_dense`
* official mmdet / mmseg checkpoints of the SMT and ShiftwiseConv repositories: :func:`convert_official_dense`
  (``model.load_state_dict(convert_official_dense(torch.load(path)))``)

What an engine task strategy (``msconv.engine.tasks.Task``, registered with ``register_task('detection')`` /
``register_task('segmentation')``) calls, one function each, no engine state inside: ``build_datasets`` ->
datasets + transforms (+ the collate for the loaders), ``build_model`` -> the builder, ``forward(model, x, y)`` ->
the loss dict (train mode), ``loss(output, y)`` -> ``sum(output.values())``, ``evaluate`` -> the evaluation
function, ``backbone(model)`` -> ``model.backbone`` (detectors: ``.backbone.backbone``):

=================  ==========================================  ==========================================
step               detection                                   segmentation
=================  ==========================================  ==========================================
build model        ``create_detector(name, arch, K, ...)``     ``create_segmenter(name, 'upernet', K)``
datasets           ``CocoDetection(root, ann, transforms)``    ``ADESegmentation(root, split, transforms)``
train transforms   ``detection_train_transforms()``            ``segmentation_train_transforms()``
eval transforms    ``detection_eval_transforms()``             ``segmentation_eval_transforms()``
collate            ``collate_detection``                       ``collate_segmentation`` (eval: batch 1)
loss dict          ``model(images, targets)`` (train mode)     ``model.loss(images, masks)``
evaluate           ``evaluate_coco(model, dataset)``           ``evaluate_segmentation(model, ds, K, ...)``
=================  ==========================================  ==========================================
"""

from .convert import convert_official_dense
from .detection import DETECTOR_ARCHS, MASK_ARCHS, create_detector
from .evaluation import MS_RATIOS, evaluate_coco, evaluate_segmentation, predict_segmentation
from .necks import BackboneWithFPN, MsconvBackbone, create_backbone, create_backbone_fpn
from .segmentation import SEGMENTER_ARCHS, UperNet, create_segmenter

__all__ = [
    'DETECTOR_ARCHS',
    'MASK_ARCHS',
    'create_detector',
    'SEGMENTER_ARCHS',
    'UperNet',
    'create_segmenter',
    'MS_RATIOS',
    'evaluate_coco',
    'evaluate_segmentation',
    'predict_segmentation',
    'BackboneWithFPN',
    'MsconvBackbone',
    'create_backbone',
    'create_backbone_fpn',
    'convert_official_dense',
]
