"""A stand-in for the ShiftwiseConv repository's CUDA package ``shiftadd.ops``, for the reference environment only.

The official downstream backbone (``downstream/{detection,segmentation}/SW_v2_unirep.py``) imports
``shiftadd.ops.AddShift_mp_module``, whose shift-add is a CUDA kernel. This module provides a class of that name
for the CPU, written from the operator's semantics (``shared/fixtures/shiftwise/README.md`` section 2):

* construction draws the official shuffles: ``torch.manual_seed(123)`` (global, as the official constructor), then
  per rep-group a ``randperm(nk)`` for every output channel horizontally, then vertically, then one
  ``randint(0, nk, [c_out])`` identity pick per group; ``pad_hv[pc, g]`` is the offset ``real_pad[t]`` of the tile
  ``t`` at which group ``g`` places small-kernel channel ``pc`` (``N_rep`` horizontal columns, then vertical);
* ``forward(x, b, h, w)`` with ``x`` (b, c_out * nk, h + 2e, w + 2e) returns three (b, c_out, h, w) maps: each
  channel ``pc`` (of output ``oc = pc // nk``) added, for every group, at a horizontal shift ``pad_hv[pc, g]``
  (rows cut by ``e``), at a vertical shift ``pad_hv[pc, N + g]`` (columns cut by ``e``), and, where it is the
  group's identity pick, unshifted; contributions falling outside the h x w map are dropped.

``install()`` registers it as ``shiftadd`` / ``shiftadd.ops``. Checked against the shared SW operator fixtures
(``check_against_fixtures``).
"""

from __future__ import annotations

import math
import sys
import types

import torch
import torch.nn as nn


def _real_pad(small: int, big: int):
    nk = math.ceil(big / small)
    padding = small - 1
    mid = big // 2
    return padding, [mid - i * small - padding for i in range(nk)]


class AddShift_mp_module(nn.Module):  # noqa: N801 (the official class name)
    def __init__(self, big_kernel: int, small_kernel: int, c_out: int, c_in: int, group_in: int) -> None:
        super().__init__()
        self.c_in, self.c_out, self.group_in = c_in, c_out, group_in
        self.nk = nk = math.ceil(big_kernel / small_kernel)
        padding, real_pad = _real_pad(small_kernel, big_kernel)
        self.extra_pad = padding - small_kernel // 2
        torch.manual_seed(123)  # the official constructor reseeds the global generator
        horizontal = [torch.cat([torch.randperm(nk) + i * nk for i in range(c_out)]) for _ in range(group_in)]
        vertical = [torch.cat([torch.randperm(nk) + i * nk for i in range(c_out)]) for _ in range(group_in)]
        identity = [torch.randint(0, nk, [c_out]) + torch.arange(c_out) * nk for _ in range(group_in)]
        tile_pad = torch.tensor(real_pad * c_out, dtype=torch.int64)  # real_pad of position p: real_pad[p % nk]
        # perm[p] = pc puts channel pc at tile p % nk: its offset is tile_pad[argsort(perm)[pc]]
        cols = [tile_pad[torch.argsort(p)] for p in horizontal] + [tile_pad[torch.argsort(p)] for p in vertical]
        self.pad_hv = torch.stack(cols, dim=1).int()  # (c_out * nk, 2 * group_in)
        self.idx_identit = torch.stack(identity, dim=1).int()  # (c_out, group_in)
        self.idx_out = torch.arange(c_out).repeat_interleave(nk).int()
        self.real_pad = real_pad

    def forward(self, x: torch.Tensor, b: int, hout: int, wout: int):
        e, nk, n = self.extra_pad, self.nk, self.group_in
        x = x.reshape(b, self.c_out, nk, hout + 2 * e, wout + 2 * e)
        pads = self.pad_hv.long().reshape(self.c_out, nk, 2 * n)
        h = x.new_zeros(b, self.c_out, hout, wout)
        v = torch.zeros_like(h)
        s = torch.zeros_like(h)
        oc = torch.arange(self.c_out)
        for g in range(n):
            for t, shift in enumerate(self.real_pad):
                # horizontal: the channel j of each output channel that group g puts at tile t
                j = (pads[:, :, g] == shift).long().argmax(1)
                src = x[:, oc, j, e : e + hout]  # (b, c_out, hout, wout + 2e)
                _add_shifted(h, src, shift, dim=3)
                j = (pads[:, :, n + g] == shift).long().argmax(1)
                src = x[:, oc, j, :, e : e + wout]  # (b, c_out, hout + 2e, wout)
                _add_shifted(v, src, shift, dim=2)
            j = self.idx_identit[:, g].long() - oc * nk
            s += x[:, oc, j, e : e + hout, e : e + wout]
        return h, v, s


def _add_shifted(out: torch.Tensor, src: torch.Tensor, shift: int, dim: int) -> None:
    """out[..., q] += src[..., q - shift] along ``dim`` where the source index is in range."""
    n_out, n_src = out.shape[dim], src.shape[dim]
    lo, hi = max(0, shift), min(n_out, n_src + shift)
    if hi <= lo:
        return
    out.narrow(dim, lo, hi - lo).add_(src.narrow(dim, lo - shift, hi - lo))


def install() -> types.ModuleType:
    """Register this module as the packages ``shiftadd`` and ``shiftadd.ops``."""
    module = sys.modules[__name__]
    pkg = types.ModuleType('shiftadd')
    pkg.ops = module
    sys.modules['shiftadd'] = pkg
    sys.modules['shiftadd.ops'] = module
    return module


def check_against_fixtures(fixtures_dir: str) -> float:
    """Max abs difference of this module's (index tensors, shift-add) against the shared operator fixtures,
    run through the official ``ShifthWiseConv2dImplicit`` maths re-expressed here for the check."""
    import json
    import os

    from safetensors.torch import load_file

    worst = 0.0
    for name in ('sw_op_k13', 'sw_op_k51'):
        t = load_file(os.path.join(fixtures_dir, name + '.safetensors'))
        meta = json.load(open(os.path.join(fixtures_dir, name + '.json')))
        d = meta['derived']
        m = AddShift_mp_module(d['big_kernel'], d['small_kernel'], d['repN'], d['c_in_shiftadd'], d['N_rep'])
        assert torch.equal(m.pad_hv.long(), t['index.loras.pad_hv'].long()), name
        assert torch.equal(m.idx_identit.long(), t['index.loras.idx_identit'].long()), name
        # the operator: small convs on the rep channels, shift-add, three BNs, identity, then the ghost channels
        sd = {k[len('state_dict.') :]: v for k, v in t.items() if k.startswith('state_dict.')}
        x = t['input']
        rep, ghost = t['index.rep'].long(), t['index.ghost'].long()
        xr = x[:, rep]
        k = d['small_kernel']
        conv = sum(
            torch.nn.functional.conv2d(xr, sd[f'LoRAs.{i}.weight'], padding=k - 1, groups=d['repN'])
            for i in range(d['N_path'])
        )
        hh, vv, ss = m(conv, x.shape[0], x.shape[2], x.shape[3])

        def bn(y, p):
            return torch.nn.functional.batch_norm(
                y, sd[p + '.running_mean'], sd[p + '.running_var'], sd[p + '.weight'], sd[p + '.bias'], False
            )

        y = bn(hh, 'bn_lora1') + bn(vv, 'bn_lora2') + bn(ss, 'bn_small') + xr
        out = torch.cat([y, x[:, ghost]], 1)
        worst = max(worst, (out - t['output']).abs().max().item())
    return worst
