"""Saving msconv models for the Hugging Face hub with their real licence and the model card timm expects.

timm's ``save_for_hf`` writes the weights and ``config.json`` (whose ``pretrained_cfg`` already carries the model's
``license``), and ``push_to_hf_hub`` writes a README from a ``model_card`` dict, defaulting to ``license:
apache-2.0`` whatever the weights. These wrappers fill that card from the model's pretrained config: the licence of
the weights (MIT for SMT and ShiftwiseConv, Apache-2.0 for SCSC), the paper, the official repository, parameter
and MAC counts, the usage line (``import msconv`` first: it registers the architecture) and the citation.

A model saved here loads back with ``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` after ``import
msconv`` (or from the saved folder: ``pretrained_cfg_overlay=dict(file='FOLDER/model.safetensors')``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch.nn as nn

__all__ = ['model_card', 'save_for_hf', 'push_to_hf_hub']

# official BibTeX entries, from the papers' repositories (SCSC's repository gives none)
CITATIONS = {
    'smt': (
        '@misc{lin2023scaleaware,\n'
        '      title={Scale-Aware Modulation Meet Transformer},\n'
        '      author={Weifeng Lin and Ziheng Wu and Jiayu Chen and Jun Huang and Lianwen Jin},\n'
        '      year={2023},\n'
        '      eprint={2307.08579},\n'
        '      archivePrefix={arXiv},\n'
        '      primaryClass={cs.CV}\n'
        '}'
    ),
    'shiftwise': (
        '@inproceedings{lidc2025sw,\n'
        '  title={ShiftwiseConv: Small Convolutional Kernel with Large Kernel Effect},\n'
        '  author={Dachong Li, Li Li, Zhuangzhuang Chen, Jianqiang Li},\n'
        '  booktitle={CVPR},\n'
        '  year={2025}\n'
        '}'
    ),
}


def _arxiv_links(cfg: Dict[str, Any]) -> Dict[str, str]:
    ids = cfg.get('paper_ids') or ()
    ids = (ids,) if isinstance(ids, str) else tuple(ids)
    title = cfg.get('paper_name') or 'paper'
    return {title: f"https://arxiv.org/abs/{i.split(':', 1)[1]}" for i in ids if i.lower().startswith('arxiv:')}


def model_card(model: nn.Module, repo_id: Optional[str] = None, license: Optional[str] = None) -> Dict[str, Any]:
    """The ``model_card`` dict of timm's ``push_to_hf_hub`` / ``generate_readme`` for an msconv ``model``.

    ``license`` defaults to the model's ``pretrained_cfg['license']`` (the licence of the weights it was built for);
    pass your own for weights you trained under other terms. ``repo_id`` goes into the usage line."""
    from .models import model_family, model_info

    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    arch = cfg.get('architecture') or type(model).__name__
    family = model_family(arch)
    licence = license or cfg.get('license')
    if not licence:
        raise ValueError(f"license: the pretrained config of {arch!r} records no licence; pass license=")
    size = cfg.get('input_size', (3, 224, 224))
    stats = {
        'Params (M)': f'{sum(p.numel() for p in model.parameters()) / 1e6:.1f}',
        'Image size': f'{size[-2]} x {size[-1]}',
    }
    try:
        from .tools.model_table import table_rows

        stats['GMACs'] = f"{table_rows(include_test=True, names=[arch])[0]['macs'] / 1e9:.2f}"
    except Exception:  # a model built with other kwargs than the registry's: its MACs are not the table's
        pass
    details: Dict[str, Any] = {
        'Model Type': 'Image classification / feature backbone',
        'Model Stats': stats,
    }
    papers = _arxiv_links(cfg)
    if papers:
        details['Papers'] = papers
    if cfg.get('origin_url'):
        details['Original'] = cfg['origin_url']
    name = f'hf-hub:{repo_id}' if repo_id else arch
    paper = model_info(arch).get('paper') or cfg.get('paper_name') or family
    card: Dict[str, Any] = {
        'license': licence,
        'tags': ['image-classification', 'timm', 'msconv'],
        'description': (
            f"A {arch} image classification model ({paper}), implemented by msconv (exact to the official code) "
            f"and registered in timm. Weights licence: {licence}."
        ),
        'details': details,
        'usage': (
            '```python\n'
            'import msconv  # registers the msconv architectures in timm\n'
            'import timm\n\n'
            f"model = timm.create_model({name!r}, pretrained=True).eval()\n"
            'config = timm.data.resolve_data_config({}, model=model)\n'
            'transform = timm.data.create_transform(**config)\n'
            '```\n'
        ),
    }
    if family in CITATIONS:
        card['citation'] = CITATIONS[family]
    return card


def save_for_hf(
    model: nn.Module,
    save_directory: Union[str, os.PathLike],
    license: Optional[str] = None,
    **kwargs: Any,
) -> Path:
    """timm's ``save_for_hf`` (weights + ``config.json``), plus the ``README.md`` model card with the model's real
    licence (see :func:`model_card`). ``kwargs`` go to timm (e.g. ``safe_serialization=True``)."""
    from timm.models import save_for_hf as _timm_save_for_hf
    from timm.models._hub import generate_readme

    save_directory = Path(save_directory)
    card = model_card(model, license=license)
    _timm_save_for_hf(model, str(save_directory), **kwargs)
    readme = generate_readme(card, save_directory.name or card['details'].get('Model Type', 'model'))
    (save_directory / 'README.md').write_text(readme, encoding='utf-8')
    return save_directory


def push_to_hf_hub(model: nn.Module, repo_id: str, license: Optional[str] = None, **kwargs: Any):
    """timm's ``push_to_hf_hub`` with :func:`model_card`'s card (the real licence) unless ``model_card=`` is given."""
    from timm.models import push_to_hf_hub as _timm_push

    kwargs.setdefault('model_card', model_card(model, repo_id=repo_id, license=license))
    return _timm_push(model, repo_id, **kwargs)
