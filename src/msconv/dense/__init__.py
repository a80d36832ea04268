"""Dense prediction with msconv backbones: the papers' COCO detectors and ADE20K segmenters.

* :func:`create_detector` (``mask_rcnn``, ``cascade_mask_rcnn``, ``retinanet``) -- :mod:`msconv.dense.detection`
* :func:`create_segmenter` (``upernet``) -- :mod:`msconv.dense.segmentation`
* evaluation (COCO AP, mIoU / aAcc single- and multi-scale + flip) -- :mod:`msconv.dense.evaluation`
"""
from .detection import DETECTOR_ARCHS, create_detector
from .necks import BackboneWithFPN, MsconvBackbone, create_backbone, create_backbone_fpn

__all__ = ['DETECTOR_ARCHS', 'create_detector', 'BackboneWithFPN', 'MsconvBackbone', 'create_backbone',
           'create_backbone_fpn']
