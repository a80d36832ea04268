"""Face recognition parts: margin heads, the insightface .bin reader, verification metrics, identity folders."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import msconv
from msconv.data.face import FaceIdentityFolder, load_bin, save_bin
from msconv.engine.verification import evaluate_verification, verification_metrics
from msconv.layers import ArcFace, CosFace

# ------------------------------------------------------------------ margin heads


def _angles(head, emb):
    return torch.acos(F.linear(F.normalize(emb), F.normalize(head.weight)).clamp(-1, 1).double())


def test_arcface_target_logit_is_cos_theta_plus_m():
    torch.manual_seed(0)
    head = ArcFace(16, 10, s=64.0, m=0.5)
    emb, labels = torch.randn(6, 16), torch.tensor([0, 3, 9, 2, 2, 5])
    logits = head(emb, labels)
    theta = _angles(head, emb)
    expected = 64.0 * torch.cos(theta)
    for i, y in enumerate(labels.tolist()):
        t = theta[i, y]
        expected[i, y] = 64.0 * (torch.cos(t + 0.5) if t + 0.5 < math.pi else torch.cos(t) - 0.5 * math.sin(0.5))
    assert torch.allclose(logits.double(), expected, atol=1e-3)
    # the margin lowers exactly the target logits
    plain = 64.0 * head.cosine(emb)
    lowered = logits < plain - 1e-4
    assert lowered.sum() == 6 and lowered[torch.arange(6), labels].all()


def test_arcface_past_pi_uses_monotone_fallback():
    head = ArcFace(2, 2, s=1.0, m=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    emb = torch.tensor([[-1.0, 0.01]])  # theta ~ pi against class 0
    out = head(emb, torch.tensor([0]))
    cos_t = head.cosine(emb)[0, 0]
    assert out[0, 0].item() == pytest.approx((cos_t - 0.5 * math.sin(0.5)).item(), abs=1e-6)


def test_cosface_subtracts_margin_and_trains():
    torch.manual_seed(0)
    head = CosFace(8, 5, s=30.0, m=0.35)
    emb, labels = torch.randn(4, 8, requires_grad=True), torch.tensor([1, 0, 4, 4])
    logits = head(emb, labels)
    expected = 30.0 * head.cosine(emb)
    expected[torch.arange(4), labels] -= 30.0 * 0.35
    assert torch.allclose(logits, expected, atol=1e-5)
    F.cross_entropy(logits, labels).backward()
    assert emb.grad.abs().sum() > 0 and head.weight.grad.abs().sum() > 0


def test_margin_heads_bad_input():
    head = ArcFace(8, 5)
    with pytest.raises(ValueError, match=r'\(B, 8\)'):
        head(torch.randn(2, 7), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match='labels'):
        head(torch.randn(2, 8), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match='labels'):
        head(torch.randn(2, 8), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match='margin'):
        CosFace(8, 5, m=2.0)


# ------------------------------------------------------------------ a small synthetic verification set


def _face_pairs(num_pairs: int = 40, size: int = 32, seed: int = 0):
    """Pairs built from skimage's bundled LFW faces: genuine = the same face with a brightness change and noise,
    impostor = two different faces. Alternating genuine/impostor."""
    from skimage.data import lfw_subset

    faces = torch.from_numpy(lfw_subset()[:100]).float()  # (100, 25, 25) in [0, 1]; the first 100 are faces
    faces = F.interpolate(faces[:, None], size=(size, size), mode='bilinear', align_corners=False)
    g = torch.Generator().manual_seed(seed)
    imgs, issame = [], []
    for i in range(num_pairs):
        a = i % 100
        if i % 2 == 0:
            b_img = (faces[a] * 0.9 + 0.05 + 0.02 * torch.randn(faces[a].shape, generator=g)).clamp(0, 1)
            issame.append(True)
        else:
            b_img = faces[(a + 37) % 100]
            issame.append(False)
        imgs += [faces[a], b_img]
    images = (torch.stack(imgs).repeat(1, 3, 1, 1) * 255).round().to(torch.uint8)
    return images, torch.tensor(issame)


class _PixelEmbedding(nn.Module):
    """A fixed embedding: mean-centred, contrast-normalised pixels (enough to tell faces apart here)."""

    def forward(self, x):
        x = x.mean(1).flatten(1)
        return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)


def test_bin_roundtrip(tmp_path):
    images, issame = _face_pairs(10)
    path = tmp_path / 'pairs.bin'
    save_bin(path, images, issame)
    loaded, same = load_bin(path)
    assert loaded.dtype == torch.uint8 and loaded.shape == images.shape
    assert torch.equal(loaded, images) and torch.equal(same, issame)
    resized, _ = load_bin(path, image_size=(20, 24))
    assert resized.shape == (20, 3, 20, 24)


def test_bin_protocol2_python3_bytes_load(tmp_path):
    images, issame = _face_pairs(4)
    save_bin(tmp_path / 'a.bin', images, issame)
    with open(tmp_path / 'a.bin', 'rb') as f:
        bins, same = pickle.load(f)
    with open(tmp_path / 'p2.bin', 'wb') as f:
        pickle.dump((bins, same), f, protocol=2)  # bytes go through _codecs.encode
    loaded, _ = load_bin(tmp_path / 'p2.bin')
    assert torch.equal(loaded, images)


class _Evil:
    def __reduce__(self):
        return (print, ('pwned',))


def test_bin_refuses_code_execution(tmp_path):
    path = tmp_path / 'evil.bin'
    with open(path, 'wb') as f:
        pickle.dump(([b'x', _Evil()], [True]), f)
    with pytest.raises(ValueError, match='refusing to load global builtins.print'):
        load_bin(path)


def test_verification_separates_faces(tmp_path):
    images, issame = _face_pairs(40)
    save_bin(tmp_path / 'pairs.bin', images, issame)
    images, issame = load_bin(tmp_path / 'pairs.bin')
    res = evaluate_verification(_PixelEmbedding(), images, issame, batch_size=16)
    assert res['accuracy'] >= 0.95 and res['tar_at_far'] >= 0.9 and res['far'] == 0.0
    assert 0 < res['best_threshold'] < 4 and res['num_pairs'] == 40
    # the same images with shuffled labels: no threshold can do better than chance by much
    g = torch.Generator().manual_seed(0)
    shuffled = issame[torch.randperm(40, generator=g)]
    bad = evaluate_verification(_PixelEmbedding(), images, shuffled, batch_size=16)
    assert bad['accuracy'] < 0.8


def test_verification_metrics_by_hand():
    # 10 folds of 2 pairs: genuine at distance 0.5, impostor at 1.5 -> perfect at any threshold in (0.5, 1.5]
    dist = np.array([0.5, 1.5] * 10)
    same = np.array([True, False] * 10)
    r = verification_metrics(dist, same)
    assert r['accuracy'] == 1.0 and r['accuracy_std'] == 0.0 and 0.5 < r['best_threshold'] <= 1.5
    assert r['tar_at_far'] == 1.0 and r['far'] == 0.0
    # flip one genuine pair far away: it is lost in its fold only
    dist[0] = 3.0
    r = verification_metrics(dist, same)
    assert r['accuracy'] == pytest.approx(0.95) and r['tar_at_far'] == pytest.approx(0.9)


def test_verification_runs_a_face_model():
    torch.manual_seed(0)
    model = msconv.create_model('test_scsc_faceresnet')
    images, issame = _face_pairs(20, size=64)
    res = evaluate_verification(model, images, issame, batch_size=8)
    assert model.training  # mode restored
    # the same score from embeddings computed here, one image at a time (eval mode, mean/std, flip sum, L2)
    model.eval()
    mean = torch.tensor(model.pretrained_cfg['mean']).view(3, 1, 1)
    std = torch.tensor(model.pretrained_cfg['std']).view(3, 1, 1)
    with torch.no_grad():
        emb = []
        for img in images:
            x = ((img.float() / 255 - mean) / std)[None]
            e = model(x) + model(x.flip(3))
            emb.append(e[0] / e[0].norm())
    emb = torch.stack(emb)
    dist = (emb[0::2] - emb[1::2]).pow(2).sum(1).numpy()
    expected = verification_metrics(dist, issame.numpy())
    assert res['accuracy'] == pytest.approx(expected['accuracy'])
    assert res['best_threshold'] == pytest.approx(expected['best_threshold'])
    with pytest.raises(ValueError, match='2 images per pair'):
        evaluate_verification(model, images[:-1], issame)


def test_face_model_embedding_contract():
    model = msconv.create_model('test_scsc_faceresnet').eval()
    assert model.pretrained_cfg['classifier'] == 'head.fc' and model.num_classes == 64
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 64)
    with pytest.raises(ValueError, match='img_size'):
        model(torch.randn(1, 3, 80, 80))


def test_face_identity_folder(tmp_path):
    from PIL import Image

    for ident in ('alice', 'bob'):
        (tmp_path / ident).mkdir()
        for j in range(3):
            Image.fromarray(np.full((8, 8, 3), j * 40, dtype=np.uint8)).save(tmp_path / ident / f'{j}.png')
    ds = FaceIdentityFolder(tmp_path)
    assert len(ds) == 6 and ds.num_identities == 2 and ds[4][1] == 1
    with pytest.raises(ValueError, match='root'):
        FaceIdentityFolder(tmp_path / 'missing')
