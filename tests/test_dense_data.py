"""COCO- and ADE20K-format datasets, their augmentations, bad-data handling, and the digits set builders."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from msconv.data.ade import (
    ADESegmentation,
    RandomRescale,
    collate_segmentation,
    rescale_size,
    segmentation_eval_transforms,
    segmentation_train_transforms,
)
from msconv.data.coco import CocoDetection, collate_detection, detection_eval_transforms, detection_train_transforms
from msconv.data.dense_digits import build_digits_ade, build_digits_coco


@pytest.fixture(scope='module')
def coco_set(tmp_path_factory):
    root = tmp_path_factory.mktemp('coco')
    return build_digits_coco(root, 'train', n_images=12, canvas=(96, 128), seed=1)


@pytest.fixture(scope='module')
def ade_root(tmp_path_factory):
    return build_digits_ade(tmp_path_factory.mktemp('ade'), 'training', n_images=6, canvas=(96, 128), seed=1)


def _mask_box(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_digits_coco_files_and_loader(coco_set):
    img_dir, ann_file = coco_set
    data = json.loads(ann_file.read_text())
    assert len(data['images']) == 12 and len(list(img_dir.glob('*.png'))) == 12
    assert [c['id'] for c in data['categories']] == list(range(1, 11))
    ds = CocoDetection(img_dir, ann_file, detection_eval_transforms())
    assert len(ds) == 12 and ds.skips.counts() == {} and ds.skips.notes == []
    n_boxes = 0
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, 96, 128) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
        assert isinstance(target['boxes'], tv_tensors.BoundingBoxes)
        assert target['labels'].min() >= 1 and target['labels'].max() <= 10
        for box, mask in zip(target['boxes'], target['masks']):
            torch.testing.assert_close(_mask_box(mask), box.as_subclass(torch.Tensor))  # tight box of the mask
        n_boxes += len(target['boxes'])
    assert n_boxes == len(data['annotations'])
    # digits were pasted where the mask is: mask pixels are brighter than the background
    image, target = ds[0]
    m = target['masks'][0].bool()
    assert image[:, m].mean() > image[:, ~target['masks'].any(0).bool()].mean() + 0.3


def test_detection_train_transforms_keep_boxes_and_masks_together(coco_set):
    img_dir, ann_file = coco_set
    random.seed(0)
    torch.manual_seed(0)
    for crop in (False, True):
        tf = detection_train_transforms(
            scales=(64, 80, 96), max_size=200, crop=crop, crop_scales=(80, 96), crop_size=(48, 80)
        )
        ds = CocoDetection(img_dir, ann_file, tf)
        shorter = set()
        for _ in range(3):
            for i in range(len(ds)):
                image, target = ds[i]
                shorter.add(min(image.shape[1:]))
                h, w = image.shape[1:]
                assert len(target['boxes']) == len(target['labels']) == len(target['masks'])
                for box, mask in zip(target['boxes'].as_subclass(torch.Tensor), target['masks']):
                    assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
                    if mask.sum() > 20:
                        diff = _mask_box(mask) - box
                        if crop:  # a cut digit's visible part lies inside its clipped box
                            assert diff[:2].min() >= -3 and diff[2:].max() <= 3  # up to 2x upscaling after the crop
                        else:  # resized masks stay within about a pixel of their resized box
                            assert diff.abs().max() <= 2.5
        assert shorter <= {64, 80, 96}
    images, targets = collate_detection([ds[0], ds[1]])
    assert type(images[0]) is torch.Tensor and type(targets[0]['boxes']) is torch.Tensor


def test_coco_bad_data_is_named_or_skipped(coco_set, tmp_path):
    img_dir, ann_file = coco_set
    data = json.loads(ann_file.read_text())
    bad = dict(
        data,
        annotations=data['annotations']
        + [dict(id=9999, image_id=1, category_id=77, bbox=[0, 0, 5, 5], iscrowd=0, segmentation=[[0, 0, 5, 0, 5, 5]])],
    )
    bad_file = tmp_path / 'bad.json'
    bad_file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r'bad\.json: annotation 9999: category_id 77'):
        CocoDetection(img_dir, bad_file)
    ds = CocoDetection(img_dir, bad_file, on_error='skip')
    assert ds.skips.counts() == {'annotation': 1} and len(ds) == 12

    missing = dict(data, images=data['images'] + [dict(id=500, file_name='nope.png', height=10, width=10)])
    missing_file = tmp_path / 'missing.json'
    missing_file.write_text(json.dumps(missing))
    with pytest.raises(ValueError, match='nope.png'):
        CocoDetection(img_dir, missing_file)
    assert CocoDetection(img_dir, missing_file, on_error='skip').skips.counts() == {'file': 1}

    corrupt_dir = tmp_path / 'imgs'
    corrupt_dir.mkdir()
    for p in img_dir.glob('*.png'):
        (corrupt_dir / p.name).write_bytes(p.read_bytes())
    (corrupt_dir / data['images'][0]['file_name']).write_bytes(b'not a png at all')
    ds = CocoDetection(corrupt_dir, ann_file, detection_eval_transforms())
    with pytest.raises(ValueError, match=data['images'][0]['file_name']):
        ds[0]
    ds = CocoDetection(corrupt_dir, ann_file, detection_eval_transforms(), on_error='skip')
    _, target = ds[0]
    assert target['image_id'] == data['images'][1]['id'] and ds.skips.counts() == {'file': 1}

    odd = dict(data, annotations=[dict(data['annotations'][0], segmentation=[[1, 2, 3]])])
    (tmp_path / 'odd.json').write_text(json.dumps(odd))
    with pytest.raises(ValueError, match='odd.json: annotation 1: segmentation'):
        CocoDetection(img_dir, tmp_path / 'odd.json')
    with pytest.raises(ValueError, match='on_error'):
        CocoDetection(img_dir, ann_file, on_error='ignore')
    (tmp_path / 'broken.json').write_text('{"images": [')
    with pytest.raises(ValueError, match='broken.json'):
        CocoDetection(img_dir, tmp_path / 'broken.json')


def test_coco_crowd_and_tiny_boxes_are_left_out(coco_set, tmp_path):
    img_dir, ann_file = coco_set
    data = json.loads(ann_file.read_text())
    anns = [dict(a) for a in data['annotations']]
    anns[0]['iscrowd'] = 1
    anns[1]['bbox'] = [anns[1]['bbox'][0], anns[1]['bbox'][1], 0.5, 10]
    f = tmp_path / 'crowd.json'
    f.write_text(json.dumps(dict(data, annotations=anns)))
    ds = CocoDetection(img_dir, f, filter_empty=True)
    assert ds.skips.counts() == {} and '1 crowd annotation(s)' in ds.skips.notes[0] and '1 box(es)' in ds.skips.notes[0]
    total = sum(len(ds.anns[i]) for i in ds.ids)
    assert total == len(anns) - 2


def test_digits_ade_files_and_loader(ade_root):
    ds = ADESegmentation(ade_root, 'training', segmentation_eval_transforms(), num_classes=11)
    assert len(ds) == 6
    image, mask = ds[0]
    assert image.shape == (3, 96, 128) and mask.shape == (96, 128) and mask.dtype == torch.int64
    values = set(mask.unique().tolist())
    assert 0 in values and 255 in values and values <= set(range(11)) | {255}  # background, digits, ignore band
    raw = np.array(Image.open(sorted((ade_root / 'annotations' / 'training').iterdir())[0]))
    assert torch.equal(mask[torch.from_numpy(raw == 1)], torch.zeros(int((raw == 1).sum()), dtype=torch.int64))


def test_segmentation_train_transforms(ade_root):
    random.seed(0)
    torch.manual_seed(0)
    ds = ADESegmentation(
        ade_root, 'training', segmentation_train_transforms(scale=(256, 64), crop_size=(80, 80)), num_classes=11
    )
    for i in range(len(ds)):
        image, mask = ds[i]
        assert image.shape == (3, 80, 80) and mask.shape == (80, 80)
        # rescaled by 0.5-2.0 of a 64-pixel shorter side: small ones are padded with ignore
        assert set(mask.unique().tolist()) <= set(range(11)) | {255}
    images, masks = collate_segmentation([ds[0], ds[1]])
    assert images.shape == (2, 3, 80, 80) and masks.shape == (2, 80, 80)
    with pytest.raises(ValueError, match='batch_size=1'):
        collate_segmentation([(torch.zeros(3, 8, 8), torch.zeros(8, 8)), (torch.zeros(3, 9, 8), torch.zeros(9, 8))])


def test_rescale_size_is_mmcv_keep_ratio():
    assert rescale_size(500, 1000, (2048, 512)) == (512, 1024)
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # long side bound
    torch.manual_seed(0)
    random.seed(0)
    t = RandomRescale((200, 100), (0.5, 2.0))
    for _ in range(5):
        img = tv_tensors.Image(torch.zeros(3, 50, 100, dtype=torch.uint8))
        out = t(img)
        assert 50 <= out.shape[1] <= 200 and abs(out.shape[2] / out.shape[1] - 2) < 0.05


def test_ade_bad_data(ade_root, tmp_path):
    import shutil

    root = tmp_path / 'ade'
    shutil.copytree(ade_root, root)
    first = sorted((root / 'annotations' / 'training').iterdir())[0]
    first.unlink()
    with pytest.raises(ValueError, match=first.stem):
        ADESegmentation(root, 'training', num_classes=11)
    ds = ADESegmentation(root, 'training', num_classes=11, on_error='skip')
    assert len(ds) == 5 and ds.skips.counts() == {'file': 1}

    second = sorted((root / 'annotations' / 'training').iterdir())[0]
    Image.fromarray(np.full((96, 128), 40, np.uint8)).save(second)  # label 39 with 11 classes
    ds = ADESegmentation(root, 'training', num_classes=11, on_error='skip')
    with pytest.raises(ValueError, match=f"{second.name}.*out of range"):
        ds.load(0)
    ds.transforms = segmentation_eval_transforms()
    _, mask = ds[0]  # skipped to the next readable pair
    assert ds.skips.counts() == {'file': 2} and mask.max() <= 255
    with pytest.raises(ValueError, match='annotations/validation'):
        ADESegmentation(root, 'validation')


def test_builders_validate_arguments(tmp_path):
    with pytest.raises(ValueError, match='split'):
        build_digits_coco(tmp_path, 'test')
    with pytest.raises(ValueError, match='digit_size'):
        build_digits_ade(tmp_path, 'training', digit_size=(4, 10))
    with pytest.raises(ValueError, match='n_images'):
        build_digits_coco(tmp_path, 'val', n_images=0)


def test_digits_ade_label_dilation_widens_the_digit_labels(tmp_path):
    plain = build_digits_ade(tmp_path / 'plain', 'validation', n_images=3, seed=3)
    wide = build_digits_ade(tmp_path / 'wide', 'validation', n_images=3, seed=3, label_dilation=2)
    for i in range(3):
        name = f"annotations/validation/{i:06d}.png"
        a, b = np.array(Image.open(plain / name)), np.array(Image.open(wide / name))
        assert np.array_equal(
            np.array(Image.open(plain / f"images/validation/{i:06d}.jpg")),
            np.array(Image.open(wide / f"images/validation/{i:06d}.jpg")),
        )
        # every stroke pixel keeps its class, and the classes spread over a wider area
        strokes = a >= 2
        assert np.array_equal(b[strokes], a[strokes])
        assert (b >= 2).sum() > 1.5 * strokes.sum()
        assert set(np.unique(b[b >= 2])) == set(np.unique(a[strokes]))
    with pytest.raises(ValueError, match='label_dilation must be an int >= 0, got -1'):
        build_digits_ade(tmp_path / 'bad', 'validation', n_images=1, label_dilation=-1)


def test_train_transforms_flip_probability(coco_set, ade_root):
    # flip=0 (digits are not mirror-symmetric) never flips, flip=1 always does; both pipelines check the argument
    img_dir, ann_file = coco_set
    plain = CocoDetection(img_dir, ann_file, detection_eval_transforms())
    image, target = plain[0]
    for flip in (0.0, 1.0):
        tf = detection_train_transforms(scales=(96,), max_size=200, crop=False, flip=flip)
        out, t = CocoDetection(img_dir, ann_file, tf)[0]
        want_img, want_masks = (image, target['masks']) if flip == 0 else (image.flip(-1), target['masks'].flip(-1))
        torch.testing.assert_close(out.as_subclass(torch.Tensor), want_img.as_subclass(torch.Tensor))
        assert torch.equal(t['masks'].as_subclass(torch.Tensor), want_masks.as_subclass(torch.Tensor))
    ds = ADESegmentation(ade_root, 'training', segmentation_eval_transforms(), num_classes=11)
    _, mask = ds[0]
    for flip in (0.0, 1.0):
        tf = segmentation_train_transforms(scale=(256, 96), ratio_range=(1.0, 1.0), crop_size=(96, 128), flip=flip)
        _, m = ADESegmentation(ade_root, 'training', tf, num_classes=11)[0]
        assert torch.equal(m, mask if flip == 0 else mask.flip(-1))
    for bad in (-0.1, 1.5, True, '0.5'):
        with pytest.raises(ValueError, match='flip must be a probability'):
            detection_train_transforms(flip=bad)
        with pytest.raises(ValueError, match='flip must be a probability'):
            segmentation_train_transforms(flip=bad)
