"""FID / IS / precision-recall / teacher PSNR, the local-only Inception, and cached reference statistics.

Expected values come from closed forms (mean shift: FID = |delta|^2; IS of one-hot-like logits) or from
independent computations (scipy.linalg.sqrtm, torchmetrics' own FID end to end, a brute-force k-NN
loop, torch-fidelity's own Inception module), never from a previous run of the code under test.
"""
from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from diffcache.metrics import inception as inc
from diffcache.metrics.fidelity import TeacherFidelity
from diffcache.metrics.frechet import feature_stats, frechet_distance
from diffcache.metrics.generative import FeaturesAndLogits, QualityMetrics, build_quality_metrics, to_uint8
from diffcache.metrics.manifold import precision_recall
from diffcache.metrics.reference import load_reference, reference_from_images


def correlated(n=400, d=16, seed=0, scale=1.0):
    """(n, d) features with a full-rank, well-conditioned (cond < 100) non-diagonal covariance."""
    g = torch.Generator().manual_seed(seed)
    a = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    return scale * torch.randn(n, d, generator=g, dtype=torch.float64) @ a


# --- Fréchet distance -----------------------------------------------------------------------------------

def test_fid_of_a_set_against_itself_is_zero():
    # Exact arithmetic gives 0. float64 eigendecompositions have backward error ~ d * eps * |S| (eps = 2.2e-16),
    # so with d = 16 and cond(S) < 100 the round-off is < 1e-12 * tr(S); 1e-9 * tr(S) leaves a wide margin.
    mu, s = feature_stats(correlated())
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9 * float(s.trace())


def test_fid_of_a_pure_mean_shift_is_the_squared_shift_and_grows_monotonically():
    x = correlated()
    mu, s = feature_stats(x)
    direction = torch.linspace(-1, 1, x.shape[1], dtype=torch.float64)
    fids = []
    for step in [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]:
        delta = step * direction
        mu2, s2 = feature_stats(x + delta)  # same set shifted: covariance identical up to round-off
        fid = frechet_distance(mu, s, mu2, s2)
        assert fid == pytest.approx(float(delta @ delta), rel=1e-9, abs=1e-9 * float(s.trace()))
        fids.append(fid)
    assert all(a < b for a, b in zip(fids, fids[1:]))
    # An isotropic shift of every coordinate by c gives c^2 * dim.
    mu3, s3 = feature_stats(x + 0.5)
    assert frechet_distance(mu, s, mu3, s3) == pytest.approx(0.25 * x.shape[1], rel=1e-9)


def test_fid_equals_scipy_sqrtm_formula():
    x, y = correlated(seed=1), correlated(seed=2, scale=1.3) + 0.2
    mu1, s1 = (t.numpy() for t in feature_stats(x))
    mu2, s2 = (t.numpy() for t in feature_stats(y))
    covmean = scipy.linalg.sqrtm(s1 @ s2).real  # pytorch-fid's formula, an independent route
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="dimension"):
        frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


# --- torchmetrics FID / IS through QualityMetrics ---------------------------------------------------------

def tiny_extractor(seed=0, channels=3, size=16, classes=5):
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Conv2d(channels, 8, 3, stride=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1))
    return FeaturesAndLogits(body, nn.Linear(8, classes), input_shape=(channels, size, size))


class FeaturesOnly(nn.Module):
    def __init__(self, ext):
        super().__init__()
        self.ext = ext

    def forward(self, x):
        return self.ext(x)[0]


def images(n, seed, shift=0.0, size=16):
    g = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn(n, 3, size, size, generator=g) + shift).clamp(-1, 1)


def test_torchmetrics_fid_with_injected_extractor_equals_our_reference_path():
    ext = tiny_extractor()
    real, fake = images(96, 0), images(80, 1, shift=0.3)
    tm = FrechetInceptionDistance(feature=FeaturesOnly(ext), normalize=False, input_img_size=(3, 16, 16))
    tm.update(to_uint8(real), real=True)
    tm.update(to_uint8(fake), real=False)
    expected = float(tm.compute())  # torchmetrics' own end-to-end FID (returned in the features' float32)

    qm = QualityMetrics(ext, reference_from_images(to_uint8(real), ext), name="tiny", inception_score=False)
    for chunk in fake.split(32):  # batching must not matter
        qm.update(chunk)
    out = qm.compute()
    assert set(out) == {"tiny_fid", "tiny_precision", "tiny_recall"}  # the key names the extractor
    # torchmetrics rounds its float64 result to float32 (rel. 6e-8); 1e-5 leaves margin for its eigvals route.
    assert out["tiny_fid"] == pytest.approx(expected, rel=1e-5)
    assert out["tiny_fid"] > 0.01


def test_quality_metrics_naming_and_checkpoint_hygiene():
    ext = tiny_extractor()
    with pytest.raises(ValueError, match="name the extractor"):
        QualityMetrics(ext, None)
    with pytest.raises(ValueError, match="reserved"):
        QualityMetrics(ext, None, name="inception")
    with pytest.raises(ValueError, match="num_features"):
        QualityMetrics(nn.Conv2d(3, 3, 1), None, name="x")
    qm = QualityMetrics(ext, reference_from_images(to_uint8(images(8, 0)), ext), name="tiny")
    # Extractor weights never reach a checkpoint, an optimiser or DDP's per-step buffer broadcast.
    assert qm.state_dict() == {} and list(qm.parameters()) == [] and list(qm.buffers()) == []
    qm.train()
    assert not qm.extractor.training  # Lightning's .train() cannot switch the extractor out of eval


class LabelLogits(nn.Module):
    """Logits = strength * one_hot(class), the class written into pixel (0, 0) of channel 0."""

    num_features = 1

    def __init__(self, classes, strength):
        super().__init__()
        self.num_logits, self.classes, self.strength = classes, classes, strength

    def forward(self, x):
        c = x[:, 0, 0, 0].long() % self.classes
        logits = self.strength * nn.functional.one_hot(c, self.classes).double()
        return c[:, None].float(), logits


def run_is(classes, strength, n, splits=1):
    qm = QualityMetrics(LabelLogits(classes, strength), None, name="toy", is_splits=splits)
    x = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    x[:, 0, 0, 0] = (torch.arange(n) % classes).to(torch.uint8)  # balanced classes
    qm.update(x)
    return qm.compute()


def closed_form_is(classes, strength):
    # p(y|x): e^L / (e^L + C - 1) on the true class, 1 / (e^L + C - 1) elsewhere; p(y) uniform when balanced.
    z = math.exp(strength) + classes - 1
    p, q = math.exp(strength) / z, 1 / z
    return math.exp(p * math.log(p * classes) + (classes - 1) * q * math.log(q * classes))


def test_inception_score_uniform_is_one_and_confident_balanced_is_the_class_count():
    # Logits and IS run in float64; the sums of 100 terms carry round-off ~1e-14, so 1e-10 is safe.
    assert run_is(10, 0.0, 100)["toy_is"] == pytest.approx(1.0, rel=1e-10)
    assert run_is(10, 2.0, 100)["toy_is"] == pytest.approx(closed_form_is(10, 2.0), rel=1e-10)
    # L = 50: C - IS ~ C (C - 1) L e^-L ~ 1e-17, far below float64 round-off: IS = C.
    assert run_is(10, 50.0, 100)["toy_is"] == pytest.approx(10.0, rel=1e-10)


def test_inception_score_splits_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = run_is(7, 3.0, 70, splits=5), run_is(7, 3.0, 70, splits=5)
    assert a == b and torch.equal(torch.get_rng_state(), before)
    assert 1.0 < a["toy_is"] <= 7.0


# --- precision / recall -----------------------------------------------------------------------------------

def brute_force_pr(real, fake, k):
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def cov(man, r, q):
        d = np.sqrt(((q[:, None] - man[None]) ** 2).sum(-1))
        return float(np.mean([(row <= r).any() for row in d]))

    return cov(real, radii(real), fake), cov(fake, radii(fake), real)


def test_precision_recall_identical_disjoint_partial_and_brute_force():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(60, 5, generator=g)
    assert precision_recall(real, real.clone()) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(real, real + 100.0) == {"precision": 0.0, "recall": 0.0}
    half = torch.cat([real[:30], real[:30] + 100.0])  # half the fakes are real points, half are far away
    assert precision_recall(real, half)["precision"] == 0.5
    fake = 1.2 * torch.randn(50, 5, generator=g) + 0.3
    pr = precision_recall(real, fake, k=3)
    p, r = brute_force_pr(real.double().numpy(), fake.double().numpy(), 3)
    assert (pr["precision"], pr["recall"]) == (p, r)
    assert 0 < p < 1 and 0 < r < 1


# --- teacher fidelity -------------------------------------------------------------------------------------

def test_teacher_psnr_and_mse_against_closed_form():
    teacher = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    imgs = torch.tensor([0.1, 0.2], dtype=torch.float64)[:, None, None, None].expand(2, 3, 4, 4)
    m = TeacherFidelity()
    m.update(imgs[:1], teacher[:1])
    m.update(imgs[1:], teacher[1:])
    out = m.compute()
    assert float(out["mse"]) == pytest.approx((0.01 + 0.04) / 2, rel=1e-12)
    expected = (10 * math.log10(4 / 0.01) + 10 * math.log10(4 / 0.04)) / 2  # per-image PSNR, range 2 ([-1, 1])
    assert float(out["psnr"]) == pytest.approx(expected, rel=1e-12)
    m.reset()
    m.update(torch.full((1, 3, 2, 2), 3.0), torch.ones(1, 3, 2, 2))  # clamped to [-1, 1]: identical, 100 dB cap
    assert float(m.compute()["psnr"]) == pytest.approx(100.0)


# --- the standard Inception, local weights only -----------------------------------------------------------

@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A weights file with torch-fidelity's exact keys and shapes, random values (nothing downloaded)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():  # He init keeps activations input-dependent through the 40-odd layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):  # non-trivial statistics so the normalisation path is exercised
            m.running_var.uniform_(0.5, 1.5)
    sd = net.state_dict()
    path = tmp_path_factory.mktemp("inception") / inc.WEIGHTS_NAME
    torch.save(sd, path)
    return path


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    from torch_fidelity import feature_extractor_inceptionv3 as fe
    monkeypatch.setattr(fe, "load_state_dict_from_url", refuse)


def test_inception_runs_offline_tf_exact_by_default_and_matches_torch_fidelity(inception_weights, no_network):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    tf = build_quality_metrics("inception", inception_weights=inception_weights, inception_score=True)
    assert tf.extractor.net.use_antialias is False and tf.extractor.identity.endswith(":tf1-bilinear")
    feats, logits = tf.extractor(x)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert (feats[0] - feats[1]).abs().max() > 1e-2 * feats.abs().max()  # input-dependent, not collapsed
    ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=str(inception_weights))(x)
    # Same network, same TF1 resize: the two differ only by op scheduling; float32 round-off ~1e-6.
    torch.testing.assert_close(feats, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref[1], rtol=1e-5, atol=1e-5)

    aa = build_quality_metrics("inception", inception_weights=inception_weights, antialias=True).extractor
    # The config switch reaches torchmetrics' resize, and the identity (hence the reference cache key).
    assert aa.net.use_antialias is True and aa.identity != tf.extractor.identity
    assert (aa(x)[0] - feats).abs().max() > 1e-3  # a different resize on 64 -> 299 changes the features
    # Grayscale images are repeated to RGB.
    torch.testing.assert_close(tf.extractor(x[:, :1])[0], tf.extractor(x[:, :1].expand(-1, 3, -1, -1))[0])


def test_inception_weights_from_hub_cache_and_clear_error_when_missing(inception_weights, no_network,
                                                                         tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=inc.WEIGHTS_NAME) as e:
        inc.InceptionV3()
    assert str(tmp_path / "hub" / "checkpoints") in str(e.value)
    with pytest.raises(FileNotFoundError, match="Inception weights not found"):
        build_quality_metrics("inception", inception_weights=tmp_path / "nowhere.pth")
    calls = []  # only an explicit download=True fetches, into the hub cache torch-fidelity would use

    def fake_download(url, dst, *a, **k):
        calls.append(url)
        Path(dst).symlink_to(inception_weights)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert inc.find_weights(download=True) == inc.default_weights_path() and calls == [inc.WEIGHTS_URL]
    assert inc.find_weights() == inc.default_weights_path() and len(calls) == 1  # now a plain cache hit
    assert inc.find_weights(inception_weights.parent) == inception_weights  # a folder holding the file


def test_inception_quality_metrics_end_to_end_offline(inception_weights, no_network, tmp_path):
    """The default path: local Inception + ADM .npz with arr_0 and mu/sigma; plain fid / is keys."""
    c = 0.01
    arr = to_uint8(images(5, 5, size=32)).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "ref.npz", arr_0=arr, mu=np.zeros(2048), sigma=c * np.eye(2048))
    qm = build_quality_metrics("inception", reference=tmp_path / "ref.npz", inception_weights=inception_weights,
                               cache_dir=tmp_path / "cache", is_splits=1)
    assert qm.precision_recall.real_features.shape == (5, 2048)  # as ADM: precision/recall on arr_0's features
    fake = images(5, 6, size=32)
    qm.update(fake)
    out = qm.compute()
    assert set(out) == {"fid", "is", "precision", "recall"}
    # As ADM, FID uses the stored mu/sigma. With sigma_ref = c I, tr((S c I)^(1/2)) = sqrt(c) * sum of the
    # singular values of the centred features / sqrt(n - 1): an independent closed form.
    f = qm.extractor(to_uint8(fake))[0].double()
    cen = (f - f.mean(0)) / math.sqrt(f.shape[0] - 1)
    expected = (f.mean(0) @ f.mean(0) + (cen ** 2).sum() + c * 2048
                - 2 * math.sqrt(c) * torch.linalg.svdvals(cen).sum())
    assert out["fid"] == pytest.approx(float(expected), rel=1e-6)  # float64 on both sides, 2048-dim eigh
    assert 1.0 <= out["is"] <= 1008.0


# --- reference statistics ---------------------------------------------------------------------------------

class Counting(nn.Module):
    def __init__(self, ext):
        super().__init__()
        self.ext, self.calls, self.num_features = ext, 0, ext.num_features

    def forward(self, x):
        self.calls += 1
        return self.ext(x)


def write_pngs(folder, n=12, seed=0):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    arr = to_uint8(images(n, seed)).permute(0, 2, 3, 1).numpy()
    for i, a in enumerate(arr):
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    return arr


def test_reference_from_folder_is_cached_by_content(tmp_path):
    ext = Counting(tiny_extractor())
    arr = write_pngs(tmp_path / "ref")
    first = load_reference(tmp_path / "ref", ext, cache_dir=tmp_path / "cache", batch_size=5)
    assert ext.calls == 3  # 12 images in batches of 5
    direct = reference_from_images(torch.from_numpy(arr).permute(0, 3, 1, 2), ext.ext)
    # PNG round trip is lossless; float32 convolutions on other batch sizes/layouts differ by ~1e-7 relative.
    torch.testing.assert_close(first.mu, direct.mu, rtol=1e-6, atol=0)
    second = load_reference(tmp_path / "ref", ext, cache_dir=tmp_path / "cache")
    assert ext.calls == 3 and second.cache_file == first.cache_file  # hit: the extractor did not run
    torch.testing.assert_close(second.sigma, first.sigma, rtol=0, atol=0)
    write_pngs(tmp_path / "ref", n=1, seed=9)  # overwrite one image: content changes, the cache misses
    third = load_reference(tmp_path / "ref", ext, cache_dir=tmp_path / "cache")
    assert ext.calls == 4 and third.cache_file != first.cache_file
    assert not torch.allclose(third.mu, first.mu)
    other = load_reference(tmp_path / "ref", Counting(tiny_extractor(seed=1)), cache_dir=tmp_path / "cache")
    assert other.cache_file != third.cache_file  # another extractor, another entry


def test_reference_from_adm_npz(tmp_path):
    ext = tiny_extractor()
    arr = to_uint8(images(20, 3)).permute(0, 2, 3, 1).numpy()  # ADM layout: uint8 NHWC arr_0
    np.savez(tmp_path / "ref.npz", arr_0=arr)
    ref = load_reference(tmp_path / "ref.npz", ext, cache_dir=tmp_path / "cache")
    direct = reference_from_images(torch.from_numpy(arr).permute(0, 3, 1, 2), ext)
    torch.testing.assert_close(ref.mu, direct.mu, rtol=1e-6, atol=0)  # float32 features, as above
    assert ref.features.shape == (20, ext.num_features)

    mu, sigma = np.arange(8.0), np.eye(8)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    with pytest.raises(ValueError, match="no arr_0"):  # ADM mu/sigma are TF-Inception statistics
        load_reference(tmp_path / "stats.npz", ext)
    ext.identity = "torch-fidelity-inception-v3:abc:tf1-bilinear"  # pretend to be the TF-exact Inception
    stats = load_reference(tmp_path / "stats.npz", ext, cache_dir=tmp_path / "cache")
    assert stats.features is None and stats.cache_file is None
    np.testing.assert_array_equal(stats.mu.numpy(), mu)
    with pytest.warns(UserWarning, match="precision/recall"):
        qm = QualityMetrics(ext, stats, name="tiny", inception_score=False)
    qm.update(images(10, 4))
    assert set(qm.compute()) == {"tiny_fid"}


def test_missing_reference_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="reference not found"):
        load_reference(tmp_path / "missing.npz", tiny_extractor())
    (tmp_path / "x.txt").write_text("not an npz")
    with pytest.raises(ValueError, match="not an .npz"):
        load_reference(tmp_path / "x.txt", tiny_extractor())
