"""Face recognition as an engine task: ``msconv train MODEL --task face --data IDENTITY_FOLDER``.

insightface practice: an embedding network trained through an ArcFace/CosFace margin head (``msconv.layers``) on a
folder of identities, verification accuracy on insightface ``.bin`` pair files at each evaluation. Its options
(``FaceConfig``): the embedding width, the margin head and its scale and margin, the verification files, the
resampling of the transform. It takes the ImageNet presets (their shared options; the rest are classification's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import create_transform

from ..data.face import FaceIdentityFolder, load_bin
from ..layers import ArcFace, CosFace
from .build import build_model
from .config import INTERPOLATIONS, TrainConfig, option, require
from .registry import register_task
from .tasks import Task
from .verification import evaluate_verification

__all__ = ['FaceConfig', 'FaceModel', 'FaceTask']

_MARGINS = {'arcface': ArcFace, 'cosface': CosFace}


@dataclass
class FaceConfig(TrainConfig):
    """``TrainConfig`` plus the options of face recognition."""

    face_val_bins: List[str] = option(
        factory=list, flag='--face-val-bin', repeat=True, help='a verification .bin file (repeatable)'
    )
    embedding_size: int = option(512, flag='--embedding-size', help='embedding width')
    margin: str = option('arcface', choices=tuple(_MARGINS), flag='--margin', help='the margin head')
    margin_s: float = option(64.0, help='margin head scale s')
    margin_m: float = option(0.5, help='margin m')
    interpolation: str = option('bicubic', choices=INTERPOLATIONS, help='resampling of the transform')

    def validate(self, check_paths: bool = True) -> None:
        require(self.data != 'digits', "task 'face' needs --data PATH to a folder of identity subfolders")
        super().validate(check_paths)
        require(self.embedding_size >= 2, f"embedding_size must be >= 2, got {self.embedding_size!r}")
        if check_paths:
            for b in self.face_val_bins:
                require(Path(b).is_file(), f"face_val_bins: {b!r} does not exist (expected a verification .bin file)")


class FaceModel(nn.Module):
    """Embedding network + margin head (ArcFace/CosFace): ``forward(x, labels) -> margin logits``."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x), labels)

    def no_weight_decay(self):
        nwd = getattr(self.backbone, 'no_weight_decay', lambda: set())()
        return {f'backbone.{n}' for n in nwd}


@register_task('face')
class FaceTask(Task):
    """Face recognition (insightface practice): an embedding network trained through an ArcFace/CosFace margin
    head on a folder of identities; verification accuracy on .bin pair files. The checkpoint's ``model`` is the
    embedding network alone (loadable by name with ``num_classes=embedding_size``), ``head`` the margin head."""

    config_class = FaceConfig
    default_preset = 'imagenet'

    def __init__(self, cfg):
        super().__init__(cfg)
        self.bins = []

    def num_classes(self) -> int:
        n = FaceIdentityFolder(self.cfg.data).num_identities
        if n < 2:
            raise ValueError(f"data {self.cfg.data!r}: face training needs at least 2 identity subfolders, found {n}")
        return n

    def build_datasets(self, data_cfg):
        # aligned crops, resized to the model's input, random horizontal flip only
        cfg, dc = self.cfg, data_cfg
        tf = create_transform(
            dc['size'],
            is_training=True,
            scale=(1.0, 1.0),
            ratio=(1.0, 1.0),
            hflip=0.5,
            color_jitter=None,
            auto_augment=None,
            interpolation=cfg.interpolation,
            mean=tuple(dc['mean']),
            std=tuple(dc['std']),
        )
        self.bins = []
        for b in cfg.face_val_bins:
            images, issame = load_bin(b, image_size=(dc['size'], dc['size']))
            self.bins.append((Path(b).stem, images, issame))
        return FaceIdentityFolder(cfg.data, transform=tf), None

    def build_model(self, num_classes: int) -> nn.Module:
        cfg = self.cfg
        backbone = build_model(cfg.model, cfg.embedding_size, cfg.drop_path, cfg.model_kwargs, cfg.init_checkpoint)
        head = _MARGINS[cfg.margin](cfg.embedding_size, num_classes, s=cfg.margin_s, m=cfg.margin_m)
        return FaceModel(backbone, head)

    def backbone(self, model):
        return model.backbone

    def forward(self, model, x, y):
        return model(x, y)

    def loss(self, output, y):
        return F.cross_entropy(output.float(), y)

    def evaluate(self, model, ema_model, val_loader, ctx):
        results = {}
        if ctx.is_main:
            for name, images, issame in self.bins:
                res = evaluate_verification(
                    model.backbone, images, issame, batch_size=ctx.local_batch_size, device=ctx.device
                )
                ctx.print(f"verification {name}: accuracy {res['accuracy']:.4f}")
                results[name] = {k: float(v) for k, v in res.items() if isinstance(v, (int, float))}
        rec: Dict[str, Any] = {'verification': results}
        accs = [r['accuracy'] for r in results.values() if 'accuracy' in r]
        if accs:
            rec['verification_acc'] = 100.0 * sum(accs) / len(accs)
        return rec

    def summary(self, rec):
        return f"verification {rec['verification']}" if rec.get('verification') else ''

    def recipe_line(self) -> str:
        cfg = self.cfg
        return f"{cfg.margin} s {cfg.margin_s:g} m {cfg.margin_m:g}, embedding {cfg.embedding_size}"

    def checkpoint_weights(self, model, ema_model):
        weights = super().checkpoint_weights(model, ema_model)
        weights['head'] = model.head.state_dict()
        return weights

    def load_checkpoint_weights(self, model, ema_model, weights):
        super().load_checkpoint_weights(model, ema_model, weights)
        if 'head' in weights:
            model.head.load_state_dict(weights['head'])
            if ema_model is not None:
                ema_model.head.load_state_dict(weights['head'])
