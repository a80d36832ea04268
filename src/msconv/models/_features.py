"""``features_only`` msconv models: timm's ``FeatureGetterNet`` (features through ``forward_intermediates``) with the
``set_grad_checkpointing`` that timm's ``FeatureListNet`` has and ``FeatureGetterNet`` lacks, so that a dense
backbone trains with gradient checkpointing as timm's own convnext/swin/resnet backbones do."""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from timm.models._features import FeatureGetterNet

__all__ = ['MsconvFeatureGetterNet', 'with_feature_getter']


class MsconvFeatureGetterNet(FeatureGetterNet):
    """timm's ``FeatureGetterNet`` + ``set_grad_checkpointing`` (forwarded to the wrapped model, whose stages then
    recompute their activations in the backward pass: ``forward_intermediates`` runs the same stages)."""

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


def with_feature_getter(entry: Callable) -> Callable:
    """Wrap a model entry point so that ``features_only=True`` (with the families' ``feature_cls='getter'``) builds
    an :class:`MsconvFeatureGetterNet`."""

    @functools.wraps(entry)
    def wrapper(pretrained: bool = False, **kwargs: Any):
        if kwargs.get('features_only') and kwargs.get('feature_cls', 'getter') in ('getter', FeatureGetterNet):
            kwargs['feature_cls'] = MsconvFeatureGetterNet
        return entry(pretrained=pretrained, **kwargs)

    return wrapper
