"""Export a model's inference form to ONNX and serve it with onnxruntime.

    python examples/export_onnxruntime.py --model smt_tiny --checkpoint smt_tiny.pth --images a.jpg b.jpg
    python examples/export_onnxruntime.py --model smt_tiny --pretrained --images a.jpg   # downloads the weights

``export_onnx_checked`` re-parameterizes the model (BatchNorms folded, parallel kernels merged), exports it with
a dynamic batch dimension, compares onnxruntime with PyTorch at batch sizes 1 and 3 and only then moves the file
into place. Serving needs nothing of msconv or torch: onnxruntime, numpy and Pillow, with the preprocessing
read from the model's ``pretrained_cfg`` (resize, centre crop, mean/std), written here in numpy so that it can
be copied into a server, and the class names (ImageNet-1K's, from ``timm.data.ImageNetInfo``, for a 1000-class
model) written beside the ONNX file. Without ``--checkpoint`` or ``--pretrained`` the weights are random and the
script says so; without ``--images``, random pixels stand in for photos.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import onnxruntime as ort
from PIL import Image


def export(model_name: str, path: str, checkpoint=None, img_size=None, num_classes=None, pretrained=False) -> dict:
    """Export ``model_name`` to ``path`` and its class names to ``path``'s ``.labels.json``; returns what the server
    needs: the preprocessing and the class names. Imports torch."""
    import msconv
    from msconv.tools.export import export_onnx_checked

    kwargs = {} if num_classes is None else {'num_classes': num_classes}
    model = msconv.create_model(model_name, pretrained=pretrained, checkpoint_path=checkpoint, **kwargs)
    if checkpoint is None and not pretrained:
        print(f'note: {model_name} has random weights (no --checkpoint, no --pretrained): its predictions mean nothing')
    cfg = dict(model.pretrained_cfg)
    size = img_size or cfg['input_size'][-1]
    diffs = export_onnx_checked(model, path, (3, size, size))
    print(f'exported {path}; onnxruntime vs PyTorch, relative difference per batch size: {diffs}')
    labels = class_names(model.num_classes)
    with open(labels_path(path), 'w') as f:
        json.dump(labels, f)
    pre = {'size': size, 'crop_pct': cfg.get('crop_pct', 0.875), 'mean': cfg['mean'], 'std': cfg['std']}
    return dict(pre, labels=labels)


def class_names(num_classes: int) -> list:
    """ImageNet-1K's names for a 1000-class model ('goldfish', ...), else 'class 0', 'class 1', ..."""
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i).split(',')[0] for i in range(1000)]
    return [f'class {i}' for i in range(num_classes)]


def labels_path(onnx_path: str) -> str:
    return onnx_path.rsplit('.', 1)[0] + '.labels.json'


def preprocess(image: Image.Image, size: int, crop_pct: float, mean, std) -> np.ndarray:
    """timm's eval transform in numpy: resize the short side to size / crop_pct, centre crop, normalise; CHW."""
    scale = math.floor(size / crop_pct)
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(scale * long / short)  # as torchvision's Resize(int) rounds
    image = image.convert('RGB').resize((scale, new_long) if w <= h else (new_long, scale), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    x = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)


class OnnxClassifier:
    """A minimal server-side model: a batch of PIL images in, (top-k indices, probabilities) out; ``labels`` (the
    class names, default: read from the ``.labels.json`` beside the ONNX file) name the indices."""

    def __init__(self, path: str, size: int, crop_pct: float, mean, std, labels=None):
        self.session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
        self.pre = dict(size=size, crop_pct=crop_pct, mean=mean, std=std)
        if labels is None:
            with open(labels_path(path)) as f:
                labels = json.load(f)
        self.labels = labels

    def __call__(self, images, k: int = 5):
        batch = np.stack([preprocess(im, **self.pre) for im in images])  # (B, 3, H, W)
        (logits,) = self.session.run(None, {'input': batch})
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        top = np.argsort(-probs, axis=1)[:, :k]
        return top, np.take_along_axis(probs, top, axis=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='smt_tiny')
    p.add_argument('--checkpoint', default=None, help='weights file (without it and --pretrained: random weights)')
    p.add_argument('--pretrained', action='store_true', help='the official weights (downloaded once)')
    p.add_argument('--out', default=None, help='ONNX file (default MODEL.onnx)')
    p.add_argument('--img-size', type=int, default=None)
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--images', nargs='*', default=[])
    args = p.parse_args(argv)

    path = args.out or f'{args.model}.onnx'
    pre = export(args.model, path, args.checkpoint, args.img_size, args.num_classes, args.pretrained)
    server = OnnxClassifier(path, **pre)
    rng = np.random.default_rng(0)
    images = [Image.open(f) for f in args.images] or [
        Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)) for _ in range(2)
    ]
    top, probs = server(images)
    for name, t, pr in zip(args.images or ['random-0', 'random-1'], top, probs):
        print(name, ', '.join(f'{server.labels[i]} {q:.3f}' for i, q in zip(t.tolist(), pr.tolist())))
    return top, probs


if __name__ == '__main__':
    main()
