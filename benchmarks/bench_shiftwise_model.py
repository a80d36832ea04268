"""shiftwise_tiny: deploy form (``model.reparameterize()``) against our own training form, CPU, fp32, eval; plus a
training-step table (forward + backward + AdamW step) for the lean and the reference training forms.

Forms (same weights, interleaved, median of the timed repeats):
* ``train form (reference)``: every SW as three strip convs + three BatchNorms + identity + rep/ghost gather and
  cat, block BNs and layer scale separate: the operator structure of the official model, in closed form;
* ``train form (auto)``: the same module in eval, where each SW folds its BNs into a cross kernel on the fly;
* ``deploy``: ``reparameterize()``: one cross conv per SW with the block BN folded, no gathers, BN2 and layer
  scale folded into the second Linear.
All forms run with the model default channels_last activations. Target (issue 7): deploy >= 2x faster than the
training form. The official model cannot run on CPU (CUDA-only op), so it is not in the table.

    PYTHONPATH=src python benchmarks/bench_shiftwise_model.py [--threads 2] [--batch 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, saved_bytes, time_interleaved  # noqa: E402

import msconv
from msconv.layers.shiftwise import ShiftWiseConv2d


def sw_reference(model):
    """Every SW of ``model`` runs its plain ``forward_reference`` (the rest of the network keeps its forms)."""
    for m in model.modules():
        if isinstance(m, ShiftWiseConv2d):
            m.forward = m.forward_reference
    return model


def macs(model, x) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x[:1])
    return counter.get_total_flops() / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--model', default='shiftwise_tiny')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--size', type=int, default=224)
    ap.add_argument('--repeats', type=int, default=2)
    ap.add_argument('--train-batch', type=int, default=8)
    ap.add_argument('--skip-train', action='store_true')
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(args.threads))
    torch.manual_seed(0)
    base = msconv.create_model(args.model)
    # non-trivial BN statistics so that folding is exercised
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    ref = sw_reference(copy.deepcopy(base)).eval()
    auto = copy.deepcopy(base).eval()
    deploy = copy.deepcopy(base).eval().reparameterize()
    forms = {'train form (reference)': ref, 'train form (auto)': auto, 'deploy': deploy}
    with torch.no_grad():
        outs = {n: m(x[:2]) for n, m in forms.items()}
        err = max((outs[n] - outs['train form (reference)']).abs().max().item() for n in outs)
        times = time_interleaved({n: (lambda m=m: m(x)) for n, m in forms.items()}, warmup=1, repeats=args.repeats)
    inf_t = {n: v.median for n, v in times.items()}
    params = {n: sum(p.numel() for p in m.parameters()) / 1e6 for n, m in forms.items()}
    gmacs = {n: macs(m, x) / 1e9 for n, m in forms.items()}

    print(
        f"{args.model} eval, batch {args.batch} at {args.size}, CPU {args.threads} threads, fp32, "
        f"median of {args.repeats} (max |logit diff| between forms {err:.2e})"
    )
    print(f"{'form':26s} {'params M':>9s} {'GMACs/img':>10s} {'ms/batch':>10s} {'img/s':>7s} {'deploy speed-up':>16s}")
    for n in forms:
        print(
            f"{n:26s} {params[n]:9.2f} {gmacs[n]:10.2f} {inf_t[n] * 1e3:10.0f} {args.batch / inf_t[n]:7.2f} "
            f"{inf_t[n] / inf_t['deploy']:15.2f}x"
        )
    ratio = inf_t['train form (reference)'] / inf_t['deploy']
    print(f"target deploy >= 2x faster than the training form: {ratio:.2f}x -> {'PASS' if ratio >= 2 else 'FAIL'}")

    if args.skip_train:
        return
    xt = torch.randn(args.train_batch, 3, args.size, args.size)
    yt = torch.randint(0, 1000, (args.train_batch,))
    models = {
        'lean (default)': copy.deepcopy(base).train(),
        'reference (plain autograd)': sw_reference(copy.deepcopy(base)).train(),
    }
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in models.items()}
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(n):
        def run():
            opts[n].zero_grad(set_to_none=True)
            loss_fn(models[n](xt), yt).backward()
            opts[n].step()

        return run

    saved = {n: saved_bytes(lambda m=m: loss_fn(m(xt), yt)) / 2**20 for n, m in models.items()}
    ttimes = time_interleaved({n: step(n) for n in models}, warmup=1, repeats=args.repeats)
    tr_t = {n: v.median for n, v in ttimes.items()}
    print(
        f"\n{args.model} training step (fwd+bwd+AdamW), batch {args.train_batch} at {args.size}, CPU "
        f"{args.threads} threads, fp32, median of {args.repeats}"
    )
    print(f"{'training form':28s} {'s/step':>8s} {'img/s':>7s} {'saved act. MiB':>15s} {'speed vs reference':>19s}")
    for n in models:
        print(
            f"{n:28s} {tr_t[n]:8.2f} {args.train_batch / tr_t[n]:7.2f} {saved[n]:15.0f} "
            f"{tr_t['reference (plain autograd)'] / tr_t[n]:18.2f}x"
        )


if __name__ == '__main__':
    main()
