"""Where each model's official weights are, and what ``pretrained=True`` says when it cannot load them.

The pretrained configs (``default_cfgs`` of each family, read with ``timm.models.get_pretrained_cfg``) hold the
download URLs and the weights' licences. Weights released without a direct URL are listed in ``MANUAL_DOWNLOADS``.
``pretrained=True`` then fails with one line instead of a raw ``URLError`` or a silent random initialisation:

- no network: the URL it tried and how to load the file instead (``checkpoint_path=`` for ``msconv.create_model``,
  ``pretrained_cfg_overlay=dict(file=...)`` for ``timm.create_model``);
- no download URL: where the weights are (SW-T: Google Drive), or that none are published.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Dict, Optional
from urllib.error import URLError

__all__ = [
    'MANUAL_DOWNLOADS',
    'WeightsDownloadError',
    'resolve_weights',
    'download_weights',
    'with_weights_messages',
    'load_lines',
]

# weights published without a direct download URL (timm cannot fetch them): model -> where and how
MANUAL_DOWNLOADS: Dict[str, Dict[str, str]] = {
    'shiftwise_tiny': {
        'where': 'Google Drive',
        'url': 'https://drive.google.com/file/d/1U4DOZv5V9_7wJdqdicjp0tCmNIdRNJOc/view?usp=sharing',
        'what': 'the official SW-T checkpoint (ImageNet-1K, 300 epochs, 83.39% top-1)',
        'licence': 'mit',
    },
}


class WeightsDownloadError(ConnectionError):
    """``pretrained=True`` could not download the official weights; the message names the URL and the file-based
    alternative, in one line."""


def resolve_weights(
    model_name: str, pretrained_cfg: Any = None, pretrained_cfg_overlay: Optional[Dict[str, Any]] = None
):
    """The resolved ``timm`` ``PretrainedCfg`` of ``model_name`` (``name.tag`` accepted), as ``build_model_with_cfg``
    will see it: the tag's config with the overlay applied."""
    from timm.models._builder import resolve_pretrained_cfg

    arch, _, tag = model_name.partition('.')
    return resolve_pretrained_cfg(
        arch, pretrained_cfg=pretrained_cfg or tag or None, pretrained_cfg_overlay=pretrained_cfg_overlay
    )


def _file_hint(model_name: str, filename: str) -> str:
    return (
        f"load it with msconv.create_model({model_name!r}, checkpoint_path={filename!r}) or "
        f"timm.create_model({model_name!r}, pretrained=True, pretrained_cfg_overlay=dict(file={filename!r}))"
    )


def no_weights_message(model_name: str) -> str:
    arch = model_name.split('.')[0]
    manual = MANUAL_DOWNLOADS.get(arch)
    if manual is not None:
        return (
            f"pretrained=True: {manual['what']} has no direct download URL: it is on {manual['where']}, "
            f"{manual['url']} ({manual['licence'].upper()} licence); download it, then "
            + _file_hint(model_name, 'path/to/checkpoint.pth')
        )
    return (
        f"pretrained=True: no official weights are published for {model_name!r} (random initialisation only); "
        f"train it or pass checkpoint_path= a file you have"
    )


def download_failed_message(model_name: str, url: str, error: BaseException) -> str:
    reason = getattr(error, 'reason', None) or error
    filename = url.rstrip('/').rsplit('/', 1)[-1] or 'checkpoint.pth'
    return (
        f"pretrained=True: could not download the {model_name} weights from {url} ({reason}). Without network, "
        f"fetch that file elsewhere, then " + _file_hint(model_name, filename)
    )


def _check_file(cfg) -> None:
    if cfg.file and not cfg.state_dict and not os.path.isfile(cfg.file):
        raise FileNotFoundError(f"pretrained_cfg_overlay file {cfg.file!r} does not exist or is not a file")


_DOWNLOAD_ERRORS = (URLError, ConnectionError, TimeoutError)


def download_weights(model_name: str, pretrained_cfg_overlay: Optional[Dict[str, Any]] = None) -> str:
    """The local path of ``model_name``'s official weights: the overlay's ``file``, or the release file downloaded
    into timm's cache (read from there when already present). One-line errors as described in this module."""
    from timm.models._hub import download_cached_file

    cfg = resolve_weights(model_name, pretrained_cfg_overlay=pretrained_cfg_overlay)
    _check_file(cfg)
    if cfg.file:
        return cfg.file
    if not cfg.url:
        raise ValueError(no_weights_message(model_name))
    try:
        return download_cached_file(cfg.url)
    except _DOWNLOAD_ERRORS as e:
        raise WeightsDownloadError(download_failed_message(model_name, cfg.url, e)) from e


def with_weights_messages(entry: Callable) -> Callable:
    """Wrap a model entry point (``smt_tiny(pretrained=False, **kwargs)``) so that ``pretrained=True`` refuses a
    config without weights and turns a failed download into :class:`WeightsDownloadError` (one line)."""

    @functools.wraps(entry)
    def wrapper(pretrained: bool = False, **kwargs: Any):
        if not pretrained:
            return entry(pretrained=False, **kwargs)
        cfg = resolve_weights(entry.__name__, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        tag = kwargs.get('pretrained_cfg')
        name = entry.__name__ + (f'.{tag}' if isinstance(tag, str) and tag else '')  # as the user named it
        _check_file(cfg)
        if not (cfg.url or cfg.file or cfg.state_dict or cfg.hf_hub_id):
            raise ValueError(no_weights_message(name))
        try:
            return entry(pretrained=True, **kwargs)
        except _DOWNLOAD_ERRORS as e:
            if not cfg.url or cfg.file or cfg.state_dict:
                raise
            raise WeightsDownloadError(download_failed_message(name, cfg.url, e)) from e

    return wrapper


def load_lines(model_name: str) -> Dict[str, str]:
    """The one line that loads ``model_name``'s official weights online (``'online'``, None without a URL) and the
    one that loads a downloaded file (``'file'``), as the weights page shows them."""
    cfg = resolve_weights(model_name)
    filename = cfg.url.rstrip('/').rsplit('/', 1)[-1] if cfg.url else 'checkpoint.pth'
    return {
        'online': f"timm.create_model({model_name!r}, pretrained=True)" if cfg.url else None,
        'file': f"msconv.create_model({model_name!r}, checkpoint_path={filename!r})",
    }
