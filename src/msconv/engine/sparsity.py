"""Coarse-grained dynamic sparsity for shift-wise convolutions (the ShiftwiseConv training recipe).

One mask bit per small k x k kernel of every path of every :class:`ShiftWiseConv2d` (shape ``(n_paths, R*nk)``).
The recipe of the paper's released SW-T (``--sparse --sparse_type rep_coarse --sparsity 0.3 --prune_rate 0.3
--growth random -u 100 --sparse_gap 131``), re-implemented from its description in ``shared/reference/
shiftwise.md`` section 2.7:

* init: per-layer densities from a global threshold on scores (uniform ``target`` everywhere by default, or
  SNIP ``|w * grad|`` via :meth:`SparsityScheduler.init_from_grads`), the masks themselves random at that density
  and identical across paths;
* every ``interval`` optimizer steps each path of each layer prunes ``ceil(rate * live)`` live kernels of
  smallest L1 norm and regrows as many dead ones at random (exact counts, so the sparsity is held), with
  ``rate`` following a cosine decay from ``prune_rate`` to ``final_prune_rate`` over ``total_steps``;
* every ``gap``-th update the masks are aligned: the path-0 mask is recomputed from the L1 norm summed over
  paths, at the same density, and copied to every path;
* :meth:`step` must be called after EVERY optimizer step (also with AMP's GradScaler, where the official code
  forgets to): it zeroes masked kernels and, when an optimizer is given, their optimizer state.

All randomness comes from a local ``torch.Generator`` seeded with ``seed`` (the global RNG is never touched), so
every data-parallel rank computes the same masks without a broadcast. ``state_dict()``/``load_state_dict()``
carry masks, counters and the generator state for checkpoints.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, Optional, Tuple

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
        optimizer: if given, masked entries of its per-parameter state (momentum, Adam moments) are zeroed too.
        seed: seed of the local generator for the random masks and regrowth.
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
    ) -> None:
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
        self.target, self.interval, self.total_steps = float(target), interval, total_steps
        self.prune_rate, self.final_prune_rate, self.gap = float(prune_rate), float(final_prune_rate), gap
        self.optimizer = optimizer
        self.generator = torch.Generator(device='cpu').manual_seed(seed)
        self.steps = 0
        self.updates = 0
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
    def init_from_grads(self) -> None:
        """SNIP init: call after one ``loss.backward()`` (before the optimizer step). Scores are ``|w * grad|``
        averaged over each k x k kernel and summed over paths; a global threshold sets each layer's density."""
        scores = {}
        for name, layer in self.layers.items():
            if layer.weight.grad is None:
                raise ValueError(f"init_from_grads: {name}.weight has no gradient; run loss.backward() first")
            scores[name] = (layer.weight * layer.weight.grad).abs().mean(dim=(-2, -1)).sum(0).cpu()
        self._init_masks(scores)
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the masked kernels (and their optimizer state, when an optimizer was given)."""
        for name, layer in self.layers.items():
            keep = self.masks[name].to(layer.weight.device)
            k = keep.to(layer.weight.dtype)[..., None, None]
            layer.weight.mul_(k)
            if self.optimizer is not None:
                for value in self.optimizer.state.get(layer.weight, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == layer.weight.shape:
                        value.mul_(k.to(value.dtype))

    def current_prune_rate(self) -> float:
        t = min(self.steps, self.total_steps) / self.total_steps
        return self.final_prune_rate + 0.5 * (self.prune_rate - self.final_prune_rate) * (1 + math.cos(math.pi * t))

    @torch.no_grad()
    def _update(self) -> None:
        rate = self.current_prune_rate()
        self.updates += 1
        align = self.gap > 0 and self.updates % self.gap == 0
        for name, layer in self.layers.items():
            w_l1 = layer.weight.detach().abs().sum(dim=(-2, -1)).float().cpu()  # (paths, R*nk)
            masks = self.masks[name]
            if align:
                n_keep = int(masks[0].sum())
                score = w_l1.sum(0).flatten()
                keep = torch.zeros_like(score, dtype=torch.bool)
                keep[torch.topk(score, n_keep).indices] = True
                self.masks[name] = keep.view(masks.shape[1:]).unsqueeze(0).expand_as(masks).clone()
                continue
            for p in range(masks.shape[0]):
                mask = masks[p].flatten()
                live = mask.nonzero().flatten()
                n_move = min(math.ceil(rate * live.numel()), live.numel())
                if n_move == 0:
                    continue
                drop = live[torch.topk(w_l1[p].flatten()[live], n_move, largest=False).indices]
                mask[drop] = False
                dead = (~mask).nonzero().flatten()
                grow = dead[torch.randperm(dead.numel(), generator=self.generator)[:n_move]]
                mask[grow] = True
                masks[p] = mask.view(masks.shape[1:])

    def step(self) -> None:
        """Call after every optimizer step: every ``interval`` steps prune/regrow, then enforce the masks."""
        self.steps += 1
        if self.steps % self.interval == 0 and self.steps < self.total_steps:
            self._update()
        self.apply_masks()

    # ---- reporting and checkpoints ---------------------------------------------------------------------------
    def sparsity(self) -> float:
        """Fraction of masked small kernels over all layers and paths."""
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / total

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
            generator=self.generator.get_state(),
            masks={n: m.clone() for n, m in self.masks.items()},
        )

    def load_state_dict(self, state: dict) -> None:
        masks = state.get('masks')
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
        for key in ('steps', 'updates', 'target', 'interval', 'total_steps', 'prune_rate', 'final_prune_rate', 'gap'):
            if key in state:
                setattr(self, key, state[key])
        if 'generator' in state:
            self.generator.set_state(state['generator'])
        self.apply_masks()
