"""Draw the effective receptive fields of several models side by side.

    python examples/draw_erf.py smt_tiny shiftwise_tiny --checkpoints smt_tiny.pth SW_300_unirep_tiny.pth

The ERF (RepLKNet's definition) is the gradient of the centre pixel of the last feature map with respect to the
input, averaged over real images (scikit-image's CC0 texture photos by default, the bundled digits, or your own
folder) and log-scaled. ``compute_erf`` returns, for each model, the map and the share of the image that holds
20/30/50/99% of the contribution (a larger share: a wider ERF); ``out`` writes the figure. ``msconv erf`` is
the same on the command line.
"""

from __future__ import annotations

import argparse

import msconv


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('models', nargs='+')
    p.add_argument('--checkpoints', nargs='*', default=[], help="one per model, in order ('none': random weights)")
    p.add_argument('--data', default='textures', help="'textures', 'digits' or an image folder")
    p.add_argument('--num-images', type=int, default=32)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--out', default='erf.png')
    args = p.parse_args(argv)

    checkpoints = args.checkpoints + ['none'] * (len(args.models) - len(args.checkpoints))
    models = []
    for name, ckpt in zip(args.models, checkpoints):
        if ckpt == 'none':  # an untrained network's ERF is not the trained one's: say so, in the figure too
            print(f'note: {name} has random weights (no checkpoint given for it)')
        label = name if ckpt != 'none' else f'{name} (random weights)'
        models.append((label, msconv.create_model(name, checkpoint_path=None if ckpt == 'none' else ckpt)))
    res = msconv.compute_erf(
        models,
        data=args.data,
        num_images=args.num_images,
        img_size=args.img_size,
        batch_size=min(8, args.num_images),
        out=args.out,
    )
    for name, r in res.items():
        ratios = ', '.join(f't={t}: {v:.3f}' for t, v in r['ratios'].items())
        print(f'{name}: high-contribution area ratio {ratios}')
    print(f'figure: {args.out}')
    return res


if __name__ == '__main__':
    main()
