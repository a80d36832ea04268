"""Fine-tune an msconv backbone on an ImageFolder, in plain PyTorch.

    python examples/finetune_imagefolder.py --data DATA --model smt_tiny --checkpoint smt_tiny.pth --epochs 5

DATA holds ``train/<class>/*.jpg`` and ``val/<class>/*.jpg`` (torchvision's ImageFolder layout). The backbone
keeps its trunk (official or msconv weights through ``--checkpoint``; the 1000-class head is dropped with a
warning) and gets a new classifier with one output per class folder. The model's own ``pretrained_cfg`` gives
the input size, mean and std. ``msconv train MODEL --data DATA`` runs the full recipe (augmentation, EMA,
checkpoints, resume); this script shows the few lines needed in your own loop.
"""

from __future__ import annotations

import argparse

import timm
import timm.data
import timm.optim
import torch
from torch import nn
from torchvision.datasets import ImageFolder

import msconv


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', required=True, help='folder with train/ and val/ ImageFolder splits')
    p.add_argument('--model', default='smt_tiny')
    p.add_argument('--checkpoint', default=None, help='official or msconv weights to start from')
    p.add_argument('--img-size', type=int, default=None, help='input size (default: the model cfg)')
    p.add_argument('--epochs', type=int, default=5)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--lr', type=float, default=1e-4)
    p.add_argument('--max-steps', type=int, default=None, help='stop each epoch after this many steps')
    return p.parse_args(argv)


def main(argv=None) -> float:
    args = parse_args(argv)
    train_set = ImageFolder(f'{args.data}/train')
    val_set = ImageFolder(f'{args.data}/val')
    model = msconv.create_model(args.model, checkpoint_path=args.checkpoint, num_classes=len(train_set.classes))

    cfg = timm.data.resolve_data_config({}, model=model)
    if args.img_size:
        cfg['input_size'] = (3, args.img_size, args.img_size)
    train_set.transform = timm.data.create_transform(**cfg, is_training=True)
    val_set.transform = timm.data.create_transform(**cfg)
    train_loader = torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=True, drop_last=True)
    val_loader = torch.utils.data.DataLoader(val_set, args.batch_size)

    # AdamW without weight decay on norms, biases and the parameters the model names (timm's rule)
    opt = timm.optim.create_optimizer_v2(model, 'adamw', lr=args.lr, weight_decay=0.05)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    for epoch in range(args.epochs):
        model.train()
        for step, (x, y) in enumerate(train_loader):
            if args.max_steps is not None and step >= args.max_steps:
                break
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += (model(x).argmax(1) == y).sum().item()
        top1 = 100.0 * correct / len(val_set)
        print(f'epoch {epoch + 1}/{args.epochs}: train loss {loss.item():.3f}, val top-1 {top1:.1f}%')
    return top1


if __name__ == '__main__':
    main()
