"""A careless dataset, file by file: every case ends with the file named (a warning, the refusal, the skip record)
and nothing lost, or with an exact, documented conversion (``msconv.data.images``).

Classification and face folders (``CheckedImageFolder``), COCO (``CocoDetection``) and ADE20K
(``ADESegmentation``) share one account of what they could not use (``msconv.data.skips.SkippedFiles``): each file
or annotation is named once, counted once, and the split is refused past one threshold.
All files are generated here and tiny (a 60000x60000 "bomb" is a 60-byte PNG header)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from msconv.data.loader import CheckedImageFolder, DataError, count_unreadable, unreadable_message

# ----------------------------------------------------------------------------------------------- generated files


def raw_png(path: Path, width: int, height: int, depth: int, color_type: int, rows: bytes = b'') -> Path:
    """A PNG written chunk by chunk: any header (a 60000x60000 bomb) and 16-bit colour, which Pillow cannot write."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + tag + data + struct.pack('>I', zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack('>IIBBBBB', width, height, depth, color_type, 0, 0, 0)
    body = chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(rows or b'\x00')) + chunk(b'IEND', b'')
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + body)
    return path


def bomb_png(path: Path) -> Path:
    return raw_png(path, 60000, 60000, 8, 0)  # 3.6e9 pixels: over PIL's decompression-bomb limit


def rgb16_png(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit RGB PNG of ``pixels`` (H, W, 3) uint16."""
    h, w, _ = pixels.shape
    rows = b''.join(b'\x00' + row.astype('>u2').tobytes() for row in pixels)
    return raw_png(path, w, h, 16, 2, rows)


def truncated_jpeg(path: Path) -> Path:
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(path, format='JPEG', quality=95)
    path.write_bytes(path.read_bytes()[:300])
    return path


def image_folder(root: Path, n: int = 4, classes=('a', 'b'), size: int = 8) -> Path:
    """``root/<class>/<i>.png``: n plain images per class, grey level 10 * i + 100 * class index."""
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((size, size, 3), (10 * i + 100 * ci) % 256, np.uint8)).save(root / c / f'{i}.png')
    return root


def read_all(ds):
    """Every item of ``ds`` once, in order, with the warnings raised while reading them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        items = [ds[i] for i in range(len(ds))]
    return items, [str(w.message) for w in caught]


# ----------------------------------------------------------------------------------------------- issue 22, items 1-4


def test_decompression_bomb_is_skipped_with_its_name_and_counted(tmp_path):
    root = image_folder(tmp_path / 'train')
    bomb_png(root / 'a' / 'bomb.png')
    ds = CheckedImageFolder(root)
    items, messages = read_all(ds)  # before: PIL.Image.DecompressionBombError, no file named
    assert len(items) == len(ds) == 9
    assert [m for m in messages if 'bomb.png' in m and 'decompression-bomb' in m], messages
    assert ds.unreadable == 1 and count_unreadable(ds) == 1


def test_train_and_eval_skip_a_bomb_by_name(tmp_path, capsys, one_thread):
    """``msconv train`` and ``msconv eval`` (before: exit 1, a DecompressionBombError traceback naming no file)."""
    from msconv_cli import main

    data = tmp_path / 'data'
    image_folder(data / 'train', n=60, size=16)
    image_folder(data / 'val', n=60, size=16)
    bomb_png(data / 'train' / 'a' / '0-bomb.png')
    bomb_png(data / 'val' / 'a' / '0-bomb.png')
    common = ['--workers', '0', '--image-size', '32', '--batch-size', '121']
    argv = ['train', 'test_smt', '--data', str(data), '--output', str(tmp_path), '--preset', 'demo']
    argv += ['--epochs', '1', '--no-progress', '--set', 'plot=false'] + common
    with pytest.warns(UserWarning, match=r"skipping .*0-bomb\.png: over the decompression-bomb limit"):
        assert main(argv) == 0
    records = [json.loads(line) for line in next(tmp_path.glob('*/metrics.jsonl')).read_text().splitlines()]
    assert [r['skipped_files'] for r in records if r['kind'] == 'val'] == [1]  # counted once in the metrics
    train_records = [r for r in records if r['kind'] == 'train']
    assert train_records[-1]['skipped_files'] == 1 and train_records[-1]['step'] == 1  # one batch of 121: all read
    listed = (next(tmp_path.glob('*/skipped.tsv'))).read_text().splitlines()  # the run folder names them
    assert listed[0] == 'split\tkind\tname\treason' and len(listed) == 3
    assert {line.split('\t')[0] for line in listed[1:]} == {'train', 'val'}
    assert all(line.split('\t')[2].endswith('0-bomb.png') for line in listed[1:])
    with pytest.warns(UserWarning, match=r"0-bomb\.png"):
        assert main(['eval', 'test_smt', '--data', str(data)] + common) == 0
    assert '(120 images, 1 unusable file left out (named above))' in capsys.readouterr().out


def test_adjacent_unreadable_files_count_once_each(tmp_path):
    root = image_folder(tmp_path / 'train', n=100)
    (root / 'a' / 'empty-1.png').write_bytes(b'')
    (root / 'a' / 'empty-2.png').write_bytes(b'')  # sorted next to each other: the first one's stand-in is bad too
    ds = CheckedImageFolder(root)
    assert len(ds) == 202
    read_all(ds)
    assert ds.unreadable == 2  # before: 3 (the second file counted again as the first one's retry)
    assert unreadable_message(ds, 'train', 0.01) is None  # 2 of 202 is within 1%
    (root / 'b' / '0-empty.png').write_bytes(b'')
    ds = CheckedImageFolder(root)
    _, messages = read_all(ds)
    msg = unreadable_message(ds, 'train', 0.01)
    assert ds.unreadable == 3 and msg is not None
    assert '3 of 203' in msg and all(f'{n}.png' in msg for n in ('a/empty-1', 'a/empty-2', 'b/0-empty'))


def test_files_met_in_loader_workers_are_counted_in_the_main_process(tmp_path):
    from torch.utils.data import DataLoader

    from msconv.data.skips import skipped_files

    root = image_folder(tmp_path / 'train', n=6)
    (root / 'a' / 'x-empty.png').write_bytes(b'')
    truncated_jpeg(root / 'b' / 'y-truncated.jpg')
    ds = CheckedImageFolder(root, transform=lambda im: np.asarray(im).copy())
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for _ in range(2):  # two epochs of two workers each (fresh processes): each file counted once
            assert sum(len(x) for x, _ in DataLoader(ds, batch_size=4, num_workers=2)) == 14
    assert ds.unreadable == 2 and skipped_files(ds) is ds.skips
    assert [Path(e[0]).name for e in ds.skips.entries()] == ['x-empty.png', 'y-truncated.jpg']
    assert ds.skips.metrics() == {'skipped_files': 2}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        ds[len(ds) - 1]  # y-truncated.jpg, replaced without being read again
    assert ds.unreadable == 2 and not caught


def test_directory_symlink_loop_is_read_once_and_announced(tmp_path):
    root = image_folder(tmp_path / 'train')
    os.symlink('.', root / 'a' / 'loop')
    (tmp_path / 'extra').mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'extra' / 'x.png')
    os.symlink(tmp_path / 'extra', root / 'b' / 'more')  # a link to another folder is followed, once
    with pytest.warns(UserWarning, match=r"a/loop.*already read"):
        ds = CheckedImageFolder(root)
    assert len(ds) == 9  # before: class a read 41 times
    assert sorted(Path(p).name for p, t in ds.samples if t == 0) == ['0.png', '1.png', '2.png', '3.png']
    assert [Path(p).relative_to(root).as_posix() for p, t in ds.samples if t == 1][-1] == 'b/more/x.png'
    assert any('loop' in n for n in ds.skips.notes) and ds.unreadable == 0  # announced; nothing lost


def test_folder_files_and_order_are_torchvisions(tmp_path):
    """Without loops or hidden entries, the files and their order are those of torchvision's ImageFolder."""
    from torchvision.datasets import ImageFolder

    root = image_folder(tmp_path / 'train', n=3, classes=('b', 'a', 'c-d'))
    for sub in ('a/x', 'a/x/deeper', 'a/x-y', 'c-d/0'):
        image_folder(root / sub, n=2, classes=('p', 'q'))
    (root / 'a' / 'Z.JPG').write_bytes((root / 'a' / '0.png').read_bytes())
    os.symlink(root / 'b', root / 'a' / 'link-to-b')  # a link to another class's folder is that class's too
    ours, theirs = CheckedImageFolder(root), ImageFolder(str(root))
    assert ours.classes == theirs.classes and ours.samples == theirs.samples and len(ours) == 3 * 3 + 4 * 4 + 1 + 3


def test_sixteen_bit_images_keep_their_values(tmp_path):
    gray = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040).astype(np.uint16)  # 0 .. 65520
    root = image_folder(tmp_path / 'train')
    Image.fromarray(gray).save(root / 'a' / 'gray16.png')
    rgb = np.stack([gray, gray[::-1], 65535 - gray], -1)
    rgb16_png(root / 'b' / 'rgb16.png', rgb)
    ds = CheckedImageFolder(root)
    by_name = {Path(p).name: i for i, (p, _) in enumerate(ds.samples)}
    img, _ = ds[by_name['gray16.png']]
    expect = (gray >> 8).astype(np.uint8)  # the high byte: 65535 -> 255, 0 -> 0 (Pillow reads 16-bit colour so)
    assert np.array_equal(np.asarray(img), np.repeat(expect[..., None], 3, -1))  # before: 255 nearly everywhere
    img, _ = ds[by_name['rgb16.png']]
    assert np.array_equal(np.asarray(img), (rgb >> 8).astype(np.uint8))


# ----------------------------------------------------------------------------------------------- issue 22, item 7


@pytest.fixture(scope='module')
def coco_digits(tmp_path_factory):
    """4 images, 7 annotations (RLE masks), 48x48 canvases."""
    from msconv.data.dense_digits import build_digits_coco

    return build_digits_coco(tmp_path_factory.mktemp('coco'), 'train', n_images=4, canvas=(48, 48), digit_size=(16, 20))


def _coco_copy(coco_digits, tmp_path, edit):
    """A copy of the digits set (images and json) with ``edit(data, image_dir)`` applied; returns (dir, json)."""
    img_dir, ann = coco_digits
    new_dir = tmp_path / 'train'
    shutil.copytree(img_dir, new_dir)
    data = json.loads(ann.read_text())
    edit(data, new_dir)
    new_ann = tmp_path / 'instances_train.json'
    new_ann.write_text(json.dumps(data))
    return new_dir, new_ann


def _bad_annotations(data, img_dir):
    anns = data['annotations']
    anns[0]['category_id'] = 77  # unknown category
    anns[1]['bbox'][2] = -3  # negative width
    anns[2]['segmentation'] = []  # empty segmentation
    anns[3]['segmentation'] = dict(anns[3]['segmentation'], size=[24, 24])  # RLE of the wrong size
    data['images'].append(dict(id=99, file_name='missing.png', height=48, width=48))
    truncated_jpeg(img_dir / 'truncated.jpg')
    data['images'].append(dict(id=98, file_name='truncated.jpg', height=48, width=48))
    anns.append(dict(anns[4], id=1000, image_id=98))


def test_dense_annotations_are_skipped_named_counted_and_refused(coco_digits, tmp_path):
    from msconv.data.coco import CocoDetection, detection_eval_transforms

    img_dir, ann = _coco_copy(coco_digits, tmp_path, _bad_annotations)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        ds = CocoDetection(img_dir, ann, detection_eval_transforms(), on_error='skip')
        for i in range(len(ds)):  # before: the RLE of the wrong size stopped the loop with a ValueError
            ds[i]
    text = '\n'.join(str(w.message) for w in caught)
    for needle in ('annotation 1: category_id 77', 'annotation 2: bbox', 'annotation 3: segmentation', 'annotation 4:'):
        assert needle in text, text
    assert 'missing.png' in text and 'truncated.jpg' in text
    counts = ds.skips.counts()
    assert counts == {'annotation': 4, 'file': 2}, counts
    msg = unreadable_message(ds, 'train', 0.01)  # before: None (nothing counted), the run went on
    assert msg is not None and 'annotation 1' in msg and 'missing.png' in msg
    assert unreadable_message(ds, 'train', 0.9) is None
    with pytest.raises(DataError, match=r'4 of 8 annotations'):
        ds.skips.check('train')


def test_dense_annotation_refusal_stops_the_training_run(coco_digits, tmp_path):
    """Most training annotations unusable: the run refuses naming the first ones (before: exit 0, AP on the rest)."""
    from test_engine_dense import DET

    from msconv.engine import train

    root = tmp_path / 'coco'
    (root / 'annotations').mkdir(parents=True)
    img_dir, ann = _coco_copy(coco_digits, root, _bad_annotations)
    ann.rename(root / 'annotations' / 'instances_train.json')
    shutil.copytree(coco_digits[0], root / 'val')
    shutil.copy(coco_digits[1], root / 'annotations' / 'instances_val.json')
    cfg = dict(DET, data=str(root), output=str(tmp_path / 'runs'), arch='retinanet', batch_size=2, max_steps=1)
    cfg.update(det_scales=[48], det_max_size=48, dense_kwargs=dict(min_size=48, max_size=48, channels=16))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(
            DataError,
            # refused before step 1: what the json shows (the truncated image would be met when read)
            match=r"2 of 8 annotations and 1 of 6 files in train.*threshold=0.01.*annotation 1 \(category_id 77",
        ):
            train(cfg)


# ----------------------------------------------------------------------------------------------- a careless dataset


def _item(ds, name):
    """The item of ``ds`` (a CheckedImageFolder) read from the file called ``name``."""
    index = [Path(p).name for p, _ in ds.samples].index(name)
    return ds[index][0]


def test_exif_rotation_is_applied_as_viewers_show_it(tmp_path):
    root = image_folder(tmp_path / 'train')
    pixels = np.zeros((8, 16, 3), np.uint8)
    pixels[:, :8, 0] = 255  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(root / 'a' / 'rotated.jpg', exif=exif.tobytes(), quality=100)
    img = _item(CheckedImageFolder(root), 'rotated.jpg')
    with Image.open(root / 'a' / 'rotated.jpg') as im:
        shown = ImageOps.exif_transpose(im.convert('RGB'))
    assert img.size == (8, 16)  # before: (16, 8), the camera's raw orientation
    assert np.array_equal(np.asarray(img), np.asarray(shown))


@pytest.mark.parametrize('case', ['gray', 'bilevel', 'palette_alpha', 'cmyk', 'png_named_jpg', 'unicode'])
def test_documented_conversions_are_exact(tmp_path, case):
    """Each mode reaches RGB by PIL's own conversion (documented in msconv.data.images); nothing else changes."""
    root = image_folder(tmp_path / 'train')
    rng = np.random.RandomState(0)
    name = f'{case}.png'
    if case == 'gray':
        im = Image.fromarray(rng.randint(0, 256, (8, 8), dtype=np.uint8))
        expect = np.repeat(np.asarray(im)[..., None], 3, -1)
    elif case == 'bilevel':
        im = Image.fromarray(rng.rand(8, 8) > 0.5)
        expect = np.repeat(np.asarray(im, dtype=np.uint8)[..., None] * 255, 3, -1)
    elif case == 'palette_alpha':
        im = Image.fromarray(rng.randint(0, 2, (8, 8), dtype=np.uint8), 'P')
        im.putpalette([255, 0, 0, 0, 255, 0])
        im.info['transparency'] = 0  # index 0 transparent: its colour is kept, the alpha dropped
        expect = np.array([[255, 0, 0], [0, 255, 0]], np.uint8)[np.asarray(im)]
    elif case == 'cmyk':
        im = Image.fromarray(rng.randint(0, 256, (8, 8, 4), dtype=np.uint8), 'CMYK')
        name = 'cmyk.jpg'
        expect = None  # PIL's CMYK -> RGB of the decoded file (no colour profile)
    elif case == 'png_named_jpg':
        im = Image.fromarray(rng.randint(0, 256, (8, 8, 3), dtype=np.uint8))
        name = 'really-a-png.jpg'
        expect = np.asarray(im)
    else:
        im = Image.fromarray(rng.randint(0, 256, (8, 8, 3), dtype=np.uint8))
        name = 'naïve-图像.png'
        expect = np.asarray(im)
    path = root / 'a' / name
    if case == 'png_named_jpg':
        im.save(path, format='PNG')
    else:
        im.save(path, **({'transparency': 0} if case == 'palette_alpha' else {}))
    if expect is None:
        with Image.open(path) as f:
            expect = np.asarray(f.convert('RGB'))
    items, messages = read_all(CheckedImageFolder(root))
    img = _item(CheckedImageFolder(root), name)
    assert img.mode == 'RGB' and np.array_equal(np.asarray(img), expect)
    assert not messages and len(items) == 9


@pytest.mark.parametrize(
    'case',
    ['truncated_jpeg', 'empty_file', 'text_named_png', 'unicode_corrupt', 'no_permission', 'bomb', 'int32_tiff'],
)
def test_unusable_image_files_are_named_and_counted_once(tmp_path, case):
    root = image_folder(tmp_path / 'train')
    name = {'unicode_corrupt': 'kaputt-图.png', 'truncated_jpeg': 'truncated.jpg', 'int32_tiff': 'int32.tif'}.get(
        case, f'{case}.png'
    )
    path = root / 'a' / name
    if case == 'truncated_jpeg':
        truncated_jpeg(path)
    elif case == 'empty_file':
        path.write_bytes(b'')
    elif case in ('text_named_png', 'unicode_corrupt'):
        path.write_text('not an image\n')
    elif case == 'no_permission':
        if os.geteuid() == 0:
            pytest.skip('running as root: a mode-000 file stays readable, so there is nothing to skip')
        image_folder(tmp_path / 'tmp', n=1)
        shutil.copy(tmp_path / 'tmp' / 'a' / '0.png', path)
        path.chmod(0)
    elif case == 'bomb':
        bomb_png(path)
    else:  # 32-bit integer samples: no defined 8-bit scale
        Image.fromarray(np.full((8, 8), 70000, np.int32)).save(path)
    ds = CheckedImageFolder(root)
    for _ in range(2):  # two epochs: named once, counted once
        items, messages = read_all(ds)
        assert len(items) == 9
    assert len([m for m in messages if name in m]) <= 1
    assert ds.unreadable == 1 and ds.skips.count() == 1
    assert [e[0] for e in ds.skips.entries()] == [str(path)]
    assert name in unreadable_message(ds, 'train', 0.01)


def test_files_that_are_not_images_are_named_not_silently_ignored(tmp_path):
    """Files without an image extension are left out as torchvision's ImageFolder leaves them, but by name, in
    one note (the log and skipped.tsv): not counted against the threshold, so a README or a GIF beside the
    images does not refuse the run (2 such files among 8 images were refused at the 1% default before)."""
    root = image_folder(tmp_path / 'train')
    (root / 'a' / 'notes.txt').write_text('labels by hand')
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / 'a' / 'anim.gif', save_all=True)
    (root / 'a' / '.DS_Store').write_bytes(b'\0\0\0\1Bud1')  # hidden files are no data: left out, not counted
    (root / '.ipynb_checkpoints').mkdir()  # nor are hidden folders a class
    with pytest.warns(UserWarning, match=r'left out 2 file\(s\) without an image extension.*a/anim.gif, a/notes.txt'):
        ds = CheckedImageFolder(root)
    assert len(ds) == 8 and ds.classes == ['a', 'b']
    assert ds.skips.entries() == [] and ds.skips.count() == 0
    assert unreadable_message(ds, 'train', 0.01) is None
    assert len(ds.skips.notes) == 1 and 'notes.txt' in ds.skips.notes[0] and '.DS_Store' not in ds.skips.notes[0]


def test_broken_links_and_pipes_are_named_not_opened(tmp_path):
    """A named pipe called ``.png`` would block ``Image.open`` for ever; a broken link fails at every epoch."""
    root = image_folder(tmp_path / 'train')
    os.mkfifo(root / 'a' / 'pipe.png')
    os.symlink(tmp_path / 'gone.png', root / 'b' / 'broken.png')
    with pytest.warns(UserWarning, match='pipe.png'):
        ds = CheckedImageFolder(root)
    items, messages = read_all(ds)
    assert len(items) == len(ds) == 8 and not messages
    assert sorted(Path(e[0]).name for e in ds.skips.entries()) == ['broken.png', 'pipe.png']


def test_animated_images_give_their_first_frame(tmp_path):
    from msconv.data.images import load_image

    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (30, 200)]
    frames[0].save(tmp_path / 'anim.gif', save_all=True, append_images=frames[1:])
    assert np.asarray(load_image(tmp_path / 'anim.gif')).max() == 30


def test_extreme_aspect_ratio_is_skipped_before_resizing(tmp_path):
    """A 1x70000 strip is 70 kB, but the eval transform's shorter-side resize would make it 36x2.5M pixels."""
    from types import SimpleNamespace

    from msconv.data.loader import build_dataset

    data = tmp_path / 'data'
    image_folder(data / 'train')
    image_folder(data / 'val')
    Image.new('L', (70000, 1)).save(data / 'val' / 'a' / 'strip.png')
    cfg = SimpleNamespace(data=str(data), interpolation='bicubic', crop_pct=0.875, bad_image_threshold=0.01)
    ds = build_dataset(cfg, 'val', 32, (0.5,) * 3, (0.5,) * 3)
    items, messages = read_all(ds)  # before: a 36x2520000 resize (272 MB here; 5.9 GB at 224 pixels)
    assert len(items) == 9 and [m for m in messages if 'strip.png' in m and 'aspect ratio' in m]
    assert ds.unreadable == 1


def test_empty_class_folder_is_refused_by_name(tmp_path):
    root = image_folder(tmp_path / 'train')
    (root / 'c').mkdir()
    (root / 'c' / 'readme.txt').write_text('todo')
    with pytest.raises(ValueError, match=r"class folder\(s\) \['c'\] contain no images"):
        CheckedImageFolder(root)


def test_coco_zero_byte_json_and_duplicate_ids(coco_digits, tmp_path):
    from msconv.data.coco import CocoDetection

    img_dir, ann = coco_digits
    empty = tmp_path / 'empty.json'
    empty.write_bytes(b'')
    with pytest.raises(ValueError, match='empty.json'):
        CocoDetection(img_dir, empty, on_error='skip')

    def duplicate(data, _):
        data['images'].append(dict(data['images'][1], id=1))  # a second file with image id 1
        data['annotations'].append(dict(data['annotations'][-1]))  # an annotation id used twice

    d, a = _coco_copy(coco_digits, tmp_path, duplicate)
    with pytest.raises(ValueError, match=r'image id 1 is given to 2 files .*000000.png.*000001.png'):
        CocoDetection(d, a)
    with pytest.warns(UserWarning, match='image id 1'):
        ds = CocoDetection(d, a, on_error='skip')
    data = json.loads(a.read_text())
    on_image_1 = sum(x['image_id'] == 1 for x in data['annotations'])
    assert data['annotations'][-1]['image_id'] != 1
    # before: the second entry silently replaced the first, and image 1's annotations landed on 000001.png
    assert sorted(ds.ids) == [2, 3, 4] and ds.images[2]['file_name'] == '000001.png'
    assert ds.skips.counts() == {'file': 2, 'annotation': on_image_1 + 1}
    assert sum(len(ds.anns[i]) for i in ds.ids) == len(data['annotations']) - on_image_1 - 1


def test_ade_zero_byte_annotation_is_named(tmp_path):
    from msconv.data.ade import ADESegmentation
    from msconv.data.dense_digits import build_digits_ade

    root = build_digits_ade(tmp_path / 'ade', 'training', n_images=3, canvas=(48, 48), digit_size=(16, 20))
    label = sorted((root / 'annotations' / 'training').iterdir())[1]
    label.write_bytes(b'')
    ds = ADESegmentation(root, 'training', num_classes=11, on_error='skip')
    items, messages = read_all(ds)
    assert len(items) == 3 and [m for m in messages if label.name in m and 'annotation' in m]
    assert ds.skips.counts() == {'file': 1} and label.name in unreadable_message(ds, 'training', 0.01)


def test_face_folder_shares_the_account(tmp_path):
    from msconv.data.face import FaceIdentityFolder

    root = image_folder(tmp_path / 'faces', classes=('alice', 'bob'))
    bomb_png(root / 'bob' / 'bomb.png')
    ds = FaceIdentityFolder(root)
    items, messages = read_all(ds)
    assert len(items) == 9 and [m for m in messages if 'bomb.png' in m]
    assert 'bomb.png' in unreadable_message(ds, 'train', 0.01) and unreadable_message(ds, 'train', 0.2) is None


# ----------------------------------------------------------------------------------------------- dense evaluation


class _ConstantDetector(torch.nn.Module):
    """The same box, score and class on every image (enough for COCOeval to tell one detection from two)."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images):
        one = dict(boxes=torch.tensor([[8.0, 8.0, 30.0, 34.0]]), scores=torch.tensor([0.9]), labels=torch.tensor([1]))
        return [dict(one) for _ in images]


def test_unusable_val_image_is_left_out_of_coco_ap_not_replaced(coco_digits, tmp_path):
    """Before: the next image stood in for an unusable one, so its detections were scored twice (a duplicate
    image id in COCOeval) and the AP was not the AP of the usable images."""
    from msconv.data.coco import CocoDetection, detection_eval_transforms
    from msconv.dense.evaluation import coco_results, evaluate_coco

    def drop(data, img_dir):  # the reference: the same set without image 2 and its annotations
        data['images'] = [im for im in data['images'] if im['id'] != 2]
        data['annotations'] = [a for a in data['annotations'] if a['image_id'] != 2]

    ref_dir, ref_ann = _coco_copy(coco_digits, tmp_path / 'ref', drop)
    bad_dir, bad_ann = _coco_copy(coco_digits, tmp_path / 'bad', lambda data, d: None)
    truncated_jpeg(bad_dir / '000001.png')  # image id 2
    model = _ConstantDetector()
    ref = CocoDetection(ref_dir, ref_ann, detection_eval_transforms(), with_masks=False, exclude=True)
    bad = CocoDetection(bad_dir, bad_ann, detection_eval_transforms(), with_masks=False, on_error='skip', exclude=True)
    with pytest.warns(UserWarning, match='000001.png'):
        _, _, ids = coco_results(model, bad)
    assert sorted(ids) == [1, 3, 4]  # before: [1, 3, 3, 4]
    assert evaluate_coco(model, bad) == evaluate_coco(model, ref)
    assert bad.skips.counts() == {'file': 1}


def test_unusable_val_image_is_left_out_of_miou_not_replaced(tmp_path):
    """Before: the next image stood in for an unusable one and its pixels counted twice in mIoU."""
    from msconv.data.ade import ADESegmentation, segmentation_eval_transforms
    from msconv.data.dense_digits import build_digits_ade
    from msconv.dense.evaluation import evaluate_segmentation

    root = build_digits_ade(tmp_path / 'ade', 'validation', n_images=4, canvas=(48, 48), digit_size=(16, 20))
    ref_root = tmp_path / 'ref'
    shutil.copytree(root, ref_root)
    for sub in ('images', 'annotations'):  # the reference: the same set without image 000001
        for p in (ref_root / sub / 'validation').glob('000001.*'):
            p.unlink()
    truncated_jpeg(root / 'images' / 'validation' / '000001.jpg')
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 11, 3, padding=1)
    opts = dict(num_classes=11, on_error='skip', exclude=True)
    bad = ADESegmentation(root, 'validation', segmentation_eval_transforms(), **opts)
    ref = ADESegmentation(ref_root, 'validation', segmentation_eval_transforms(), **opts)
    with pytest.warns(UserWarning, match='000001.jpg'):
        got = evaluate_segmentation(model, bad, 11, scale=None)
    want = evaluate_segmentation(model, ref, 11, scale=None)
    # before: 000002's pixels counted twice (mIoU 0.0078 for 0.0060)
    assert [got[k] for k in ('mIoU', 'mAcc', 'aAcc')] == [want[k] for k in ('mIoU', 'mAcc', 'aAcc')]
    np.testing.assert_array_equal(got['IoU'], want['IoU'])
    assert bad.skips.counts() == {'file': 1}
