"""Coarse-grained dynamic sparsity for shift-wise convolutions (the ShiftwiseConv training recipe).

One mask bit per small k x k kernel of every path of every :class:`ShiftWiseConv2d` (shape ``(n_paths, R*nk)``).
The recipe of the paper's released SW-T (``--sparse --sparse_type rep_coarse --sparsity 0.3 --prune_rate 0.3
--growth random -u 100 --sparse_gap 131``), re-implemented from its description in ``shared/reference/
shiftwise.md`` section 2.7:

* init: ``'uniform'`` (random masks at ``target`` in every layer) or ``'snip'``, the official initialisation
  (``sparse_core.py:L337-376``, ``L105-162``): one batch's scores ``|w * grad|`` averaged over each k x k kernel, all
  paths concatenated, a global threshold keeping ``1 - target`` of all scores gives each layer its density, the
  masks are then drawn at random at that density (identical across paths), and layers that come out at >= 0.99
  density stay dense for the whole run (no mask, no prune/regrow). The trainer runs it with
  :meth:`SparsityScheduler.snip_scores` / :meth:`SparsityScheduler.init_from_scores` before the first step;
* every ``interval`` optimizer steps each path of each layer prunes ``ceil(rate * live)`` kernels of smallest L1
  norm (``magnitude_prune_sum``, ``funcs.py:L116-129``), then regrows at random: every dead kernel comes back with
  probability ``removed / dead`` (``random_growth_sum``, ``funcs.py:L192-197``), so the sparsity is held on
  average, as in the official code; ``rate`` follows a cosine decay from ``prune_rate`` to ``final_prune_rate``
  over ``total_steps``;
* every ``gap``-th update the masks are aligned: path 0 is pruned on the L1 norm summed over paths, regrown at
  random the same way, and its mask is copied to every path (``sparse_core.py:L623-697``);
* :meth:`step` must be called after EVERY optimizer step (also with AMP's GradScaler, where the official code
  forgets to): it zeroes masked kernels and, when an optimizer is given, the SGD momentum buffers of masked
  kernels (``momentum_buffer``, as ``sparse_core.py:L575-599`` does; Adam moments are left alone, as there).

All randomness comes from a local ``torch.Generator`` seeded with ``seed`` (the global RNG is never touched), so
every data-parallel rank computes the same masks without a broadcast. ``state_dict()``/``load_state_dict()``
carry masks, counters and the generator state for checkpoints.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from ..layers.shiftwise import ShiftWiseConv2d

__all__ = ['SparsityScheduler']


class SparsityScheduler:
    """Keep ``target`` of the small kernels of every ShiftWiseConv2d in ``model`` pruned, and evolve the masks.

    Args:
        model: any module containing (non-reparameterized) :class:`ShiftWiseConv2d` layers.
        target: fraction of small kernels kept at zero (0.3 in the paper).
        interval: optimizer steps between prune/regrow updates (``-u``, 100 in the paper).
        total_steps: total optimizer steps of the run (for the cosine prune-rate decay; no updates after it).
        prune_rate: initial fraction of live kernels pruned (and regrown) per update.
        final_prune_rate: prune rate reached at ``total_steps``.
        gap: align the masks across paths every ``gap`` updates (131 in the paper; 0 disables).
        optimizer: if given, the SGD ``momentum_buffer`` entries of masked kernels are zeroed too (not Adam's).
        seed: seed of the local generator for the random masks and regrowth.
        init: ``'uniform'`` or ``'snip'`` (recorded; the SNIP densities come from :meth:`init_from_scores`, which
            the trainer calls with one batch's scores before the first step).
    """

    def __init__(
        self,
        model: nn.Module,
        target: float = 0.3,
        interval: int = 100,
        total_steps: int = 1,
        prune_rate: float = 0.3,
        final_prune_rate: float = 0.005,
        gap: int = 131,
        optimizer: Optional[torch.optim.Optimizer] = None,
        seed: int = 0,
        init: str = 'uniform',
    ) -> None:
        if init not in ('uniform', 'snip'):
            raise ValueError(f"init must be 'uniform' or 'snip', got {init!r}")
        if not (0.0 <= target < 1.0):
            raise ValueError(f"target must be in [0, 1), got {target!r}")
        for name, val, lo in (('interval', interval, 1), ('total_steps', total_steps, 1), ('gap', gap, 0)):
            if not isinstance(val, int) or isinstance(val, bool) or val < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
        for name, val in (('prune_rate', prune_rate), ('final_prune_rate', final_prune_rate)):
            if not (0.0 <= val <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {val!r}")
        self.layers: Dict[str, ShiftWiseConv2d] = {
            n: m for n, m in model.named_modules() if isinstance(m, ShiftWiseConv2d) and not m.deployed
        }
        if not self.layers:
            raise ValueError("model has no ShiftWiseConv2d layer in training form to sparsify")
        self._all_layers = dict(self.layers)
        self.target, self.interval, self.total_steps = float(target), interval, total_steps
        self.prune_rate, self.final_prune_rate, self.gap = float(prune_rate), float(final_prune_rate), gap
        self.optimizer = optimizer
        self.generator = torch.Generator(device='cpu').manual_seed(seed)
        self.init = init
        self.steps = 0
        self.updates = 0
        self.dense_layers: List[str] = []  # SNIP: layers left dense (no mask, never pruned)
        self.masks: Dict[str, torch.Tensor] = {}
        self._init_masks({n: torch.ones(m.weight.shape[1]) for n, m in self.layers.items()})
        self.apply_masks()

    # ---- masks ----------------------------------------------------------------------------------------------
    def _random_mask(self, shape: Tuple[int, ...], n_keep: int) -> torch.Tensor:
        flat = torch.zeros(math.prod(shape), dtype=torch.bool)
        flat[torch.randperm(flat.numel(), generator=self.generator)[:n_keep]] = True
        return flat.view(shape)

    def _init_masks(self, scores: Dict[str, torch.Tensor]) -> None:
        """Per-layer density from a global threshold over ``scores`` (each (R*nk,)), random masks at it."""
        all_scores = torch.cat([s.flatten().float() for s in scores.values()])
        n_keep_total = round(all_scores.numel() * (1.0 - self.target))
        if n_keep_total >= all_scores.numel() or torch.unique(all_scores).numel() == 1:
            keep_frac = {n: 1.0 - self.target for n in scores}
        else:
            threshold = torch.topk(all_scores, n_keep_total).values[-1]
            keep_frac = {n: (s.float() >= threshold).float().mean().item() for n, s in scores.items()}
        for name, layer in self.layers.items():
            shape = (layer.weight.shape[1],)
            mask = self._random_mask(shape, round(math.prod(shape) * keep_frac[name]))
            self.masks[name] = mask.unsqueeze(0).expand(layer.n_paths, *shape).clone()

    @torch.no_grad()
    def snip_scores(self, source: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
        """SNIP scores after one ``loss.backward()``: ``|w * grad|`` averaged over each k x k kernel, shape
        ``(n_paths, R*nk)`` per layer (the official ``snip_core_cat_rep`` concatenates the paths the same way).

        ``source``: the module that ran the backward (the official code scores a deep copy of the network, so that
        the real one is untouched); its ShiftWiseConv2d layers must carry the same names. Default: the model."""
        layers = self._all_layers
        if source is not None:
            found = {n: m for n, m in source.named_modules() if isinstance(m, ShiftWiseConv2d)}
            missing = sorted(set(self._all_layers) - set(found))
            if missing:
                raise ValueError(f"snip_scores: source has no ShiftWiseConv2d named {missing[:3]}")
            layers = {n: found[n] for n in self._all_layers}
        scores = {}
        for name, layer in layers.items():
            if layer.weight.grad is None:
                raise ValueError(f"snip_scores: {name}.weight has no gradient; run loss.backward() first")
            scores[name] = (layer.weight * layer.weight.grad).abs().mean(dim=(-2, -1)).float().cpu()
        return scores

    @torch.no_grad()
    def init_from_scores(self, scores: Dict[str, torch.Tensor]) -> None:
        """The official SNIP initialisation (``default_SNIP`` + ``init_sum_snip``): a global threshold keeps the
        ``int(N * (1 - target))`` highest of all N scores (strictly above it count as kept); each layer's density is
        its kept fraction; its mask is drawn at random at that density (each kernel kept with that probability,
        the same mask on every path); layers whose mask comes out at >= 0.99 density stay dense for good."""
        self.layers = dict(self._all_layers)
        missing = sorted(set(self.layers) - set(scores))
        if missing:
            raise ValueError(f"init_from_scores: no scores for {missing[:3]}")
        all_scores = torch.cat([scores[n].flatten().float() for n in self.layers])
        n_keep = int(all_scores.numel() * (1.0 - self.target))
        threshold = torch.topk(all_scores, max(n_keep, 1), sorted=True).values[-1]
        self.dense_layers = []
        masks = {}
        for name, layer in self.layers.items():
            density = (scores[name].float() > threshold).float().mean().item()
            shape = (layer.weight.shape[1],)
            keep = torch.rand(shape, generator=self.generator) < density
            if keep.float().mean().item() >= 0.99:
                self.dense_layers.append(name)
                continue
            masks[name] = keep.unsqueeze(0).expand(layer.n_paths, *shape).clone()
        for name in self.dense_layers:
            del self.layers[name]
        self.masks = masks
        self.init = 'snip'
        self.apply_masks()

    def init_from_grads(self, source: Optional[nn.Module] = None) -> None:
        """SNIP init from the gradients of one ``loss.backward()`` (see :meth:`snip_scores`)."""
        self.init_from_scores(self.snip_scores(source))

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the masked kernels (and their SGD momentum, when an optimizer was given)."""
        for name, layer in self.layers.items():
            keep = self.masks[name].to(layer.weight.device)
            k = keep.to(layer.weight.dtype)[..., None, None]
            layer.weight.mul_(k)
            if self.optimizer is not None:
                buf = self.optimizer.state.get(layer.weight, {}).get('momentum_buffer')
                if isinstance(buf, torch.Tensor) and buf.shape == layer.weight.shape:
                    buf.mul_(k.to(buf.dtype))

    def current_prune_rate(self) -> float:
        t = min(self.steps, self.total_steps) / self.total_steps
        return self.final_prune_rate + 0.5 * (self.prune_rate - self.final_prune_rate) * (1 + math.cos(math.pi * t))

    def _prune_regrow(self, mask: torch.Tensor, score: torch.Tensor, rate: float) -> torch.Tensor:
        """One official mask update of a flat boolean mask: zero the ``dead + ceil(rate * live)`` entries of lowest
        ``score`` (``magnitude_prune_sum``), then revive each dead entry with probability ``removed / dead``
        (``random_growth_sum``)."""
        mask = mask.clone()
        live = int(mask.sum())
        n_remove = math.ceil(rate * live)
        if n_remove == 0:
            return mask
        k = mask.numel() - live + n_remove
        order = torch.sort(score, stable=True).indices
        mask[order[:k]] = False
        removed = live - int(mask.sum())
        dead = int((~mask).sum())
        if dead == 0:
            return mask
        grow = torch.rand(mask.shape, generator=self.generator) < (math.floor(removed) / dead)
        return mask | grow

    @torch.no_grad()
    def _update(self) -> None:
        rate = self.current_prune_rate()
        self.updates += 1
        align = self.gap > 0 and self.updates % self.gap == 0
        for name, layer in self.layers.items():
            w_l1 = layer.weight.detach().abs().sum(dim=(-2, -1)).float().cpu()  # (paths, R*nk)
            masks = self.masks[name]
            if align:  # path 0 on the summed norm, copied to every path
                new = self._prune_regrow(masks[0], w_l1.sum(0), rate)
                self.masks[name] = new.unsqueeze(0).expand_as(masks).clone()
                continue
            for p in range(masks.shape[0]):
                masks[p] = self._prune_regrow(masks[p], w_l1[p], rate)

    def step(self) -> None:
        """Call after every optimizer step: every ``interval`` steps prune/regrow, then enforce the masks."""
        self.steps += 1
        if self.steps % self.interval == 0 and self.steps < self.total_steps:
            self._update()
        self.apply_masks()

    # ---- reporting and checkpoints ---------------------------------------------------------------------------
    def sparsity(self) -> float:
        """Fraction of masked small kernels over all layers and paths (layers SNIP left dense count as kept)."""
        dense = sum(
            self._all_layers[n].weight.shape[0] * self._all_layers[n].weight.shape[1] for n in self.dense_layers
        )
        total = sum(m.numel() for m in self.masks.values()) + dense
        return 1.0 - (sum(int(m.sum()) for m in self.masks.values()) + dense) / max(total, 1)

    def layer_sparsity(self) -> Dict[str, float]:
        return {n: 1.0 - m.float().mean().item() for n, m in self.masks.items()}

    def named_masks(self) -> Iterator[Tuple[str, torch.Tensor]]:
        return iter(self.masks.items())

    def state_dict(self) -> dict:
        return dict(
            steps=self.steps,
            updates=self.updates,
            target=self.target,
            interval=self.interval,
            total_steps=self.total_steps,
            prune_rate=self.prune_rate,
            final_prune_rate=self.final_prune_rate,
            gap=self.gap,
            init=self.init,
            dense_layers=list(self.dense_layers),
            generator=self.generator.get_state(),
            masks={n: m.clone() for n, m in self.masks.items()},
        )

    def load_state_dict(self, state: dict) -> None:
        masks = state.get('masks')
        dense = list(state.get('dense_layers', []))
        unknown = sorted(set(dense) - set(self.layers) - set(self.dense_layers))
        if unknown:
            raise ValueError(f"state['dense_layers'] names layers this model does not have: {unknown[:3]}")
        for name in dense:  # SNIP left these dense for good
            self.layers.pop(name, None)
            self.masks.pop(name, None)
        self.dense_layers = sorted(set(self.dense_layers) | set(dense))
        if not isinstance(masks, dict) or set(masks) != set(self.layers):
            raise ValueError(
                f"state['masks'] must name exactly this model's ShiftWiseConv2d layers {sorted(self.layers)}, got "
                f"{sorted(masks) if isinstance(masks, dict) else type(masks).__name__}"
            )
        for n, m in masks.items():
            if tuple(m.shape) != tuple(self.masks[n].shape):
                raise ValueError(
                    f"state['masks'][{n!r}] must have shape {tuple(self.masks[n].shape)}, got {tuple(m.shape)}"
                )
        self.masks = {n: m.to(torch.bool).cpu().clone() for n, m in masks.items()}
        keys = (
            'steps',
            'updates',
            'target',
            'interval',
            'total_steps',
            'prune_rate',
            'final_prune_rate',
            'gap',
            'init',
        )
        for key in keys:
            if key in state:
                setattr(self, key, state[key])
        if 'generator' in state:
            self.generator.set_state(state['generator'])
        self.apply_masks()
