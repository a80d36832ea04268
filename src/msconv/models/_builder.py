"""Building msconv models and loading checkpoints (official or our own) into them.

``create_model`` is the one entry point users need; ``timm.create_model`` works the same way because every
msconv model converts official state dicts inside its own ``load_state_dict`` (see ``MsconvModel``).
"""

import functools
import os
import pickle
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from timm.models._features import FeatureGetterNet, feature_take_indices
from timm.models._manipulate import reparameterize_model

from ..layers.forms import is_capturing
from ._features import MsconvFeatureGetterNet
from ._registry import _MODEL_FAMILY, convert_official, unknown_model_message
from ._weights import download_weights

__all__ = [
    'MsconvModel',
    'factory_kwargs',
    'create_model',
    'read_checkpoint',
    'read_class_map',
    'select_classifier_rows',
    'check_image_input',
    'check_checkpoint_kind',
    'reparameterize',
]

_FEATURE_KWARGS = ('out_indices', 'output_fmt', 'feature_cls', 'norm')


def check_image_input(x: torch.Tensor, in_chans: int, min_size: int, name: str) -> None:
    """Raise a ValueError naming the expected shape when ``x`` is not a (B, in_chans, H>=min_size, W>=min_size) batch.

    Checks run in eager mode, under ``torch.jit.trace``, ``torch.compile`` and ``torch.export`` (on concrete or
    symbolic shapes); TorchScript and FX symbolic tracing skip them (there is no concrete tensor to check)."""
    if torch.jit.is_scripting():
        return
    if not isinstance(x, torch.Tensor) and is_capturing():  # an FX Proxy
        return
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: input must be a torch.Tensor of shape (B, {in_chans}, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{name}: input must be a 4-D tensor of shape (B, {in_chans}, H, W), got a {x.dim()}-D tensor of shape "
            f"{tuple(x.shape)}"
        )
    if x.shape[1] != in_chans:
        raise ValueError(
            f"{name}: input must have {in_chans} channels, shape (B, {in_chans}, H, W), got shape {tuple(x.shape)}"
        )
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(
            f"{name}: input height and width must each be at least {min_size} (the network's total stride), "
            f"got shape {tuple(x.shape)}"
        )


def factory_kwargs(init):
    """Decorator for a model ``__init__``: accept timm's ``device=`` and ``dtype=`` factory arguments. Every tensor
    is created on ``device`` (``torch.device`` as a context), then floating-point parameters and buffers are cast to
    ``dtype``. ``timm.create_model(name, device='meta')`` builds without allocating memory."""

    @functools.wraps(init)
    def wrapper(
        self, *args, device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None, **kwargs
    ):
        with torch.device(device) if device is not None else nullcontext():
            init(self, *args, **kwargs)
        if dtype is not None:
            self.to(dtype=dtype)

    return wrapper


class MsconvModel(nn.Module):
    """Base of every msconv network: the timm model surface the families share, and official checkpoints loading
    through ``load_state_dict``.

    Subclasses set ``family``, build ``stem``, ``stages`` (a sequence of stages) and ``head`` (a timm-style head
    with ``fc``, ``reset(num_classes, global_pool)`` and ``forward(x, pre_logits)``), and define
    ``forward_features``. What differs between families is a class attribute or a small hook: ``final_norm_group``
    (``group_matcher``), ``intermediate_formats``, ``_forward_stem``, ``_forward_stage``, ``_intermediate`` and
    ``_final_features`` (``forward_intermediates``), ``_head_hidden_size`` (``reset_classifier``).

    ``load_state_dict`` converts an official state dict first (the converter is the identity on msconv state
    dicts) and drops a classifier whose shape does not match this model, with a warning, so that fine-tuning with
    another ``num_classes`` works from any checkpoint.
    """

    family: str = ''
    in_chans: int = 3
    min_input_size: int = 32
    #: the parameters after the last stage (a final norm), the last of ``group_matcher``'s fine groups
    final_norm_group: str = r'^norm'
    #: the layouts ``forward_intermediates`` returns
    intermediate_formats: Tuple[str, ...] = ('NCHW',)

    @torch.jit.unused
    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the expected shape unless ``x`` is a (B, in_chans, H, W) batch with H and W of
        at least ``min_input_size`` (see ``check_image_input``). Callers skip it under TorchScript."""
        check_image_input(x, self.in_chans, self.min_input_size, type(self).__name__)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Parameter names exempt from weight decay beyond what timm's optimizer factory already exempts (1-D
        tensors: norms, biases, layer-scale gammas). msconv networks have no position embeddings or tokens."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups (layer-wise learning-rate decay): the stem, then each stage (``coarse``) or each stage's
        downsample, each block and the final norm."""
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)'
            if coarse
            else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (self.final_norm_group, (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier of ``num_classes`` (0: none, the head returns pooled features). ``global_pool=None``
        keeps the pooling, except that a classifier on a model whose pooling is off gets the average pooling back;
        ``global_pool=''`` with a classifier is refused (``check_pooling``)."""
        global_pool = self.pooling_for(num_classes, global_pool)
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)
        self._match_head_to_model()
        self.head_hidden_size = self._head_hidden_size()

    def pooling_for(self, num_classes: int, global_pool: Optional[str]) -> Optional[str]:
        """The pooling ``reset_classifier(num_classes, global_pool)`` gives the head (None: the head keeps its own):
        'avg' for a classifier asked for with ``global_pool=None`` while the pooling is off; refused (``ValueError``)
        for a classifier with ``global_pool=''``."""
        if global_pool is None and num_classes and self._head_pooling() == '':
            return 'avg'
        self.check_pooling(num_classes, global_pool)
        return global_pool

    def _head_pooling(self) -> Optional[str]:
        return getattr(getattr(getattr(self, 'head', None), 'global_pool', None), 'pool_type', None)

    def check_pooling(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Refuse a classifier over an unpooled map: with ``global_pool=''`` the head gets the (B, C, H, W) map,
        and its Linear classifier would fail at forward (SMT, SCSC) or return logits per position (ShiftWise), as a
        timm Linear head does. Called at construction and by ``reset_classifier``."""
        if global_pool == '' and num_classes:
            raise ValueError(
                f"{type(self).__name__}: global_pool='' (no pooling) cannot feed a classifier (num_classes="
                f"{num_classes}): the classifier is a Linear layer over pooled features; pass num_classes=0 for the "
                f"unpooled feature map (or call forward_features), or global_pool='avg'"
            )

    def _head_hidden_size(self) -> int:
        return self.num_features

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = 'NCHW',
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs at ``indices`` in ``output_fmt`` (one of ``intermediate_formats``) and, unless
        ``intermediates_only``, the final feature map (``forward_features``'s output once every stage ran). ``norm``
        applies a final norm to the last stage's output where the family has one (see ``_intermediate``)."""
        if output_fmt not in self.intermediate_formats:
            raise ValueError(f"output_fmt must be one of {self.intermediate_formats}, got {output_fmt!r}")
        self.check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self._forward_stem(x)
        for i, stage in enumerate(stages):
            x = self._forward_stage(stage, x)
            if i in take_indices:
                intermediates.append(self._intermediate(x, i, norm, output_fmt))
        if intermediates_only:
            return intermediates
        return self._final_features(x, len(stages) == len(self.stages)), intermediates

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def _forward_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return stage(x)

    def _intermediate(self, x: torch.Tensor, index: int, norm: bool, output_fmt: str) -> torch.Tensor:
        """Stage ``index``'s output as ``forward_intermediates`` returns it (stages carry NCHW maps here)."""
        return x if output_fmt == 'NCHW' else x.permute(0, 2, 3, 1)

    def _final_features(self, x: torch.Tensor, complete: bool) -> torch.Tensor:
        """The last stage's output as the final feature map (``complete``: every stage ran)."""
        return x

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _match_head_to_model(self) -> None:
        """Put a rebuilt classifier head on the model's device and dtype and in its train/eval mode."""
        ref = next(self.parameters(), None)
        if ref is not None:
            self.head.to(device=ref.device, dtype=ref.dtype)
        self.head.train(self.training)

    @torch.no_grad()
    def reparameterize(self) -> 'MsconvModel':
        """Switch to the inference form in place (BatchNorms folded, branches merged; see each family) and
        return ``self`` in eval mode. Eval outputs are unchanged (within float rounding); train the training form."""
        reparameterize_model(self, inplace=True)
        return self.eval()

    def _classifier_name(self) -> str:
        cfg = getattr(self, 'pretrained_cfg', None) or {}
        return cfg.get('classifier', 'head')

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        state_dict = convert_official(state_dict, self.family)
        own = self.state_dict(keep_vars=True)
        prefix = self._classifier_name() + '.'
        dropped = [
            k
            for k in state_dict
            if k.startswith(prefix) and (k not in own or tuple(own[k].shape) != tuple(state_dict[k].shape))
        ]
        body = {k: v for k, v in state_dict.items() if k not in dropped}
        if strict:  # the trunk must fit before anything is said about the classifier
            shapes = [
                f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                for k, v in body.items()
                if k in own and tuple(own[k].shape) != tuple(v.shape)
            ]
            if shapes:
                raise RuntimeError(self._mismatch_message(shapes=shapes))
        result = super().load_state_dict(body, strict=False, assign=assign)
        if strict:
            missing = [k for k in result.missing_keys if not (dropped and k.startswith(prefix))]
            if missing or result.unexpected_keys:
                raise RuntimeError(self._mismatch_message(missing=missing, unexpected=result.unexpected_keys))
        if dropped:
            shapes = {k: tuple(state_dict[k].shape) for k in dropped}
            warnings.warn(
                f"{type(self).__name__}: classifier tensors {shapes} do not match this model "
                f"(num_classes={getattr(self, 'num_classes', '?')}); they were dropped and the classifier keeps its "
                f"fresh initialisation.",
                stacklevel=2,
            )
        return result

    def _mismatch_message(self, missing=(), unexpected=(), shapes=(), shown: int = 3) -> str:
        def first(items):
            items = list(items)
            return ', '.join(items[:shown]) + (f' (+{len(items) - shown} more)' if len(items) > shown else '')

        parts = [
            f"{len(missing)} missing keys: {first(missing)}" if missing else '',
            f"{len(unexpected)} unexpected keys: {first(unexpected)}" if unexpected else '',
            f"{len(shapes)} shapes differ: {first(shapes)}" if shapes else '',
        ]
        return (
            f"Error(s) in loading state_dict for {type(self).__name__}: the state dict does not fit this model "
            f"outside its classifier (a checkpoint of another model?): " + '; '.join(p for p in parts if p)
        )


def check_checkpoint_kind(path: Path, name: str = 'checkpoint_path') -> None:
    """Refuse, naming the file, what cannot be a checkpoint before anything tries to unpickle it: a file that is
    neither safetensors (an 8-byte header length, then JSON), a torch zip archive nor a pickle (first byte 0x80)."""
    import zipfile

    with open(path, 'rb') as f:
        head = f.read(9)
    if path.suffix == '.safetensors':
        ok, kind = len(head) == 9 and head[8:9] == b'{', 'a safetensors file'
    else:
        ok, kind = head[:1] == b'\x80' or zipfile.is_zipfile(path), 'a torch checkpoint (zip archive or pickle)'
    if not ok:
        raise ValueError(f"{name} {str(path)!r} is not {kind}: the file is corrupt or of another kind")


def read_checkpoint(path: Union[str, os.PathLike], trust_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """Read the model state dict from a checkpoint file.

    Accepts ``.safetensors``, or a torch pickle holding ``{'model': sd}``, ``{'state_dict': sd}``,
    ``{'state_dict_ema'|'model_ema': sd}`` (EMA preferred, as timm does) or a bare state dict. Pickles are read
    with ``torch.load(weights_only=True)``; a file that needs arbitrary code to unpickle (e.g. one carrying a yacs
    config object) is refused unless ``trust_pickle=True``. A ``module.`` (DDP) prefix is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint_path {str(path)!r} does not exist or is not a file")
    check_checkpoint_kind(path)
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device='cpu')
        except Exception as e:  # safetensors raises its own error types for truncated headers
            raise ValueError(f"checkpoint_path {str(path)!r} is not a readable safetensors file: {e}") from e
    else:
        try:
            obj = torch.load(str(path), map_location='cpu', weights_only=True)
        except pickle.UnpicklingError as e:
            if not trust_pickle:
                raise ValueError(
                    f"checkpoint_path {str(path)!r} contains objects other than tensors, which torch.load refuses "
                    f"with weights_only=True. If you trust the file's origin, pass trust_pickle=True "
                    f"(CLI: --trust-pickle) to unpickle it fully. Details: {str(e).splitlines()[0]}"
                ) from e
            try:
                obj = torch.load(str(path), map_location='cpu', weights_only=False)
            except Exception as e2:  # a corrupt pickle fails in many ways (UnpicklingError, EOFError, ...)
                raise ValueError(
                    f"checkpoint_path {str(path)!r} could not be unpickled: {type(e2).__name__}: {e2}"
                ) from e2
        except (RuntimeError, EOFError) as e:
            raise ValueError(f"checkpoint_path {str(path)!r} is truncated or not a torch checkpoint: {e}") from e
    if isinstance(obj, Mapping):
        for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint_path {str(path)!r} does not hold a state dict of tensors")
    return {(k[len('module.') :] if k.startswith('module.') else k): v for k, v in obj.items()}


def read_class_map(class_map: Union[str, os.PathLike, Sequence[int]]) -> List[int]:
    """Class indices from a sequence of ints or a text file with one integer per line (blank lines ignored)."""
    if isinstance(class_map, (str, os.PathLike)):
        path = Path(class_map)
        if not path.is_file():
            raise FileNotFoundError(f"class_map {str(path)!r} does not exist or is not a file")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        try:
            return [int(line) for line in lines]
        except ValueError as e:
            raise ValueError(f"class_map {str(path)!r} must hold one integer class index per line: {e}") from e
    indices = list(class_map)
    if not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ValueError(f"class_map must be a non-empty sequence of ints or a file path, got {class_map!r}")
    return indices


def select_classifier_rows(
    state_dict: Mapping[str, torch.Tensor], classifier: str, class_map: Union[str, os.PathLike, Sequence[int]]
) -> Dict[str, torch.Tensor]:
    """A copy of ``state_dict`` whose classifier (``<classifier>.weight`` / ``.bias``) keeps only the rows
    ``class_map`` lists, in that order: e.g. the 1000 ImageNet-1K rows of a 21841-class ImageNet-22K head with the
    official ``data/map22kto1k.txt`` of SMT (the Swin file), as the official fine-tuning loader does."""
    indices = read_class_map(class_map)
    keys = [k for k in (f'{classifier}.weight', f'{classifier}.bias') if k in state_dict]
    if not keys:
        raise ValueError(f"class_map: the checkpoint has no classifier tensors {classifier}.weight / {classifier}.bias")
    rows = state_dict[keys[0]].shape[0]
    bad = [i for i in indices if not 0 <= i < rows]
    if bad:
        raise ValueError(
            f"class_map: indices must lie in [0, {rows}) (the checkpoint classifier has {rows} classes), "
            f"got {bad[:5]}{'...' if len(bad) > 5 else ''}"
        )
    index = torch.tensor(indices, dtype=torch.long)
    out = dict(state_dict)
    for k in keys:
        out[k] = state_dict[k].index_select(0, index)
    return out


def _without_classifier(state_dict: Dict[str, torch.Tensor], model: MsconvModel) -> Dict[str, torch.Tensor]:
    """``state_dict`` with ``model``'s own classifier tensors in place of the checkpoint's (a backbone loads a
    classifier of any size without the warning ``MsconvModel.load_state_dict`` gives a classifier it drops)."""
    prefix = model._classifier_name() + '.'
    out = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    out.update({k: v for k, v in model.state_dict().items() if k.startswith(prefix)})
    return out


def create_model(
    model_name: str,
    pretrained: bool = False,
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
    *,
    trust_pickle: bool = False,
    class_map: Optional[Union[str, os.PathLike, Sequence[int]]] = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered msconv model, optionally loading an official or msconv checkpoint.

    Args:
        model_name: a registered name (``msconv.list_models()``), e.g. ``'smt_tiny'``.
        pretrained: load the official release weights named in the model's ``pretrained_cfg`` (downloads them,
            or reads ``pretrained_cfg_overlay=dict(file=...)``; ``checkpoint_path`` takes precedence). Without
            network or without a download URL: a one-line error naming the URL and the file-based alternative.
        checkpoint_path: a local ``.pth``/``.pt``/``.safetensors`` file in the official or msconv format.
        trust_pickle: allow a checkpoint that needs full unpickling (only for files you trust).
        class_map: keep only these rows of the checkpoint's classifier, in this order (a sequence of ints or a
            text file, one index per line), e.g. ``class_map='map22kto1k.txt'`` to load an ImageNet-22K SMT-L
            checkpoint as a 1000-class model, as the official fine-tuning does (see ``select_classifier_rows``).
        **kwargs: model keyword arguments (``num_classes``, ``drop_path_rate``, ...) and timm's
            ``features_only=True, out_indices=...``.
    """
    if not isinstance(model_name, str) or model_name.split('.')[0] not in _MODEL_FAMILY:
        raise ValueError(unknown_model_message(model_name))
    if not pretrained and checkpoint_path is None:
        if class_map is not None:
            raise ValueError("class_map selects rows of a checkpoint's classifier: pass checkpoint_path or pretrained")
        return timm.create_model(model_name, **kwargs)

    if checkpoint_path is None:  # the release file (one-line errors without network or URL: _weights.py)
        checkpoint_path = download_weights(model_name, kwargs.get('pretrained_cfg_overlay'))

    features_only = kwargs.pop('features_only', False)
    feature_kwargs = {k: kwargs.pop(k) for k in _FEATURE_KWARGS if k in kwargs}
    model = timm.create_model(model_name, **kwargs)
    state_dict = read_checkpoint(checkpoint_path, trust_pickle=trust_pickle)
    if class_map is not None:
        state_dict = select_classifier_rows(
            convert_official(state_dict, model.family), model._classifier_name(), class_map
        )
    if features_only:  # the feature wrapper drops the classifier: the checkpoint's goes too, whatever its size
        state_dict = _without_classifier(convert_official(state_dict, model.family), model)
    model.load_state_dict(state_dict)
    if features_only:
        feature_cls = feature_kwargs.pop('feature_cls', 'getter')
        if feature_cls not in ('getter', FeatureGetterNet):
            raise ValueError(f"feature_cls must be 'getter' for msconv models, got {feature_cls!r}")
        feature_kwargs.setdefault('out_indices', (0, 1, 2, 3))
        model = MsconvFeatureGetterNet(model, **feature_kwargs)
    return model


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The inference form of ``model`` (a copy unless ``inplace``): every submodule with a ``reparameterize``
    (or ``fuse``/``switch_to_deploy``) method is converted, as ``timm.utils.reparameterize_model`` does. The
    result is put in eval mode."""
    model = reparameterize_model(model, inplace=inplace)
    return model.eval()
