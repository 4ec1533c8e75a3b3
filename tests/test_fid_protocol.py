"Tests for the FID protocol of large runs: cached reference statistics, streaming, published statistics, precision/recall."
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist

from sadm_lab.core import DataError, ConfigError
from sadm_lab.metrics import (FeatureExtractor, FIDEvaluator, ReferenceStats, feature_stats, fid_stats_cache_dir,
                              fid_with_floor, format_fid, knn_radii, load_reference_stats, precision_recall,
                              sampled_batches, stream_features)

pytestmark = pytest.mark.numerics       # (CI runs these again with the CPU dispatch at AVX2)


class CountingFeatures(FeatureExtractor):
    "Fixed random features; counts images and records batch sizes it was given."
    name = 'random'

    def __init__(self, d=16, seed=0, version='test'):
        super().__init__(d)
        self.version, self.seen, self.batches = version, 0, []
        g = torch.Generator().manual_seed(seed)
        self.register_buffer('w', torch.randn(d, 16, generator=g))

    def forward(self, x):
        self.seen += len(x); self.batches.append(len(x))
        return torch.tanh(F.adaptive_avg_pool2d(x.float(), 4).flatten(1) @ self.w.T).double()


def images(n, seed, lo=-1., width=2.):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * width + lo


@pytest.fixture
def real(): return images(300, 0)


@pytest.fixture
def fake(): return images(100, 1, -1, 1.6)


# ---- reference statistics cached by content --------------------------------------------------------------------

def test_second_evaluator_loads_reference_and_floor_statistics(real, fake, tmp_path):
    ext = CountingFeatures()
    e1 = FIDEvaluator(real, ext, n=100, cache=tmp_path)
    assert e1.ref_source == 'computed' and ext.seen == 200
    r1 = e1(fake)
    assert ext.seen == 200 + 100 + 100                    # fakes, then the floor set D (m = n: cached too)
    with np.load(e1.cache_path, allow_pickle=False) as z:
        assert {'mu', 'sigma', 'n', 'floor_mu', 'floor_sigma', 'floor_n', 'protocol'} <= set(z.files)
        assert z['mu'].shape == (16,) and z['sigma'].shape == (16, 16) and int(z['n']) == 200
        info = json.loads(str(z['protocol']))
    assert info['features'] == 'random' and info['n'] == 100 and info['seed'] == 0 and info['image_shape'] == [1, 8, 8]
    assert e1.cache_path.parent == tmp_path and not list(tmp_path.glob('*.tmp'))

    ext2 = CountingFeatures()                             # same network, a fresh counter
    e2 = FIDEvaluator(real, ext2, n=100, cache=tmp_path)
    assert e2.ref_source == 'cache' and e2.cache_path == e1.cache_path
    assert e2.floor() == r1['floor'] and ext2.seen == 0  # neither R nor D went through the network
    assert e2(fake) == r1 and ext2.seen == 100            # only the generated images
    torch.testing.assert_close(e2.ref_stats.cov, e1.ref_stats.cov, rtol=0, atol=0)


@pytest.mark.parametrize('change', ['pixel', 'seed', 'n', 'n_ref', 'version', 'dtype', 'order'])
def test_other_images_or_protocol_give_another_key(real, tmp_path, change):
    base = dict(n=100, n_ref=None, seed=0)
    e1 = FIDEvaluator(real, CountingFeatures(), cache=tmp_path, **base)
    x, ext, kw = real.clone(), CountingFeatures(), dict(base)
    if change == 'pixel': x[250, 0, 3, 3] += 1e-3
    elif change == 'seed': kw['seed'] = 1
    elif change == 'n': kw['n'] = 99
    elif change == 'n_ref': kw['n_ref'] = 150
    elif change == 'version': ext = CountingFeatures(version='other')
    elif change == 'dtype': x = x.double()
    elif change == 'order': x = x.flip(0)
    e2 = FIDEvaluator(x, ext, cache=tmp_path, **kw)
    assert e2.ref_source == 'computed' and e2.cache_path != e1.cache_path and ext.seen > 0


def test_corrupt_or_foreign_cache_file_is_recomputed(real, fake, tmp_path):
    e1 = FIDEvaluator(real, CountingFeatures(), n=100, cache=tmp_path)
    r1 = e1(fake)
    e1.cache_path.write_bytes(b'not an npz')
    with pytest.warns(UserWarning, match='cannot read cached FID statistics'):
        e2 = FIDEvaluator(real, CountingFeatures(), n=100, cache=tmp_path)
    assert e2.ref_source == 'computed' and e2(fake) == r1
    other = FIDEvaluator(real.flip(0), CountingFeatures(), n=100, cache=tmp_path)
    e1.cache_path.write_bytes(other.cache_path.read_bytes())     # a valid file for other images
    with pytest.warns(UserWarning, match='other images or protocol'):
        assert FIDEvaluator(real, CountingFeatures(), n=100, cache=tmp_path).ref_source == 'computed'


def test_cache_folder_and_opt_out(real, tmp_path, monkeypatch):
    monkeypatch.setenv('SADM_LAB_CACHE', str(tmp_path))
    assert fid_stats_cache_dir() == tmp_path / 'fid_stats' and fid_stats_cache_dir(tmp_path / 'x') == tmp_path / 'x'
    e = FIDEvaluator(real, CountingFeatures(), n=100)
    assert e.cache_path.parent == tmp_path / 'fid_stats' and e.cache_path.is_file()
    e0 = FIDEvaluator(real, CountingFeatures(), n=100, cache=False)
    assert e0.cache_path is None and e0.ref_source == 'computed' and len(list((tmp_path / 'fid_stats').iterdir())) == 1


def test_torchmetrics_backend_agrees_with_float64_on_cached_statistics(real, fake, tmp_path):
    a = fid_with_floor(real, fake, CountingFeatures(), backend='float64', cache=tmp_path)
    b = fid_with_floor(real, fake, CountingFeatures(), backend='torchmetrics', cache=tmp_path)   # loads a's file
    assert a['fid'] == pytest.approx(b['fid'], rel=1e-6) and a['floor'] == pytest.approx(b['floor'], rel=1e-6)


# ---- streaming ---------------------------------------------------------------------------------------------------

def test_stream_of_batches_scores_like_the_tensor(real, fake, tmp_path):
    ext = CountingFeatures()
    ev = FIDEvaluator(real, ext, n=100, batch_size=16, cache=tmp_path)
    whole = ev(fake)
    pulled = []
    def gen():                                            # lazily produced, uneven batches
        for i in range(0, 100, 37):
            pulled.append(i); yield fake[i:i + 37]
    ext.batches.clear()
    streamed = ev.score_batches(gen(), total=100)
    assert streamed['fid'] == pytest.approx(whole['fid'], rel=1e-10) and streamed['floor'] == whole['floor']
    assert pulled == [0, 37, 74] and max(ext.batches) <= 16   # re-chunked to the evaluator's batch size
    calls = []
    def sample(k, i): calls.append((k, i)); return fake[i * 32:i * 32 + k]
    res = ev.score_batches(sampled_batches(sample, 100, batch_size=32, progress=True), total=100)
    assert calls == [(32, 0), (32, 1), (32, 2), (4, 3)] and res['fid'] == pytest.approx(whole['fid'], rel=1e-10)


def test_stream_features_and_feature_stats_accept_iterables(real):
    ext = CountingFeatures()
    st = feature_stats(ext, iter([real[:70], real[70:]]), batch_size=64, progress=True)
    ref = feature_stats(ext, real)
    assert st.n == 300 and max(ext.batches) <= 256
    torch.testing.assert_close(st.mean, ref.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(st.cov, ref.cov, rtol=0, atol=1e-12)
    assert [len(f) for f in stream_features(ext, [real[:10], real[10:15]], batch_size=4)] == [4, 4, 2, 4, 1]
    with pytest.raises(DataError, match=r'in \[-1, 1\]'): feature_stats(ext, [real[:5], real[:5] * 3])


def test_more_fakes_than_the_floor_set(real, fake, tmp_path):
    ev = FIDEvaluator(real, CountingFeatures(), n=50, cache=tmp_path)
    res = ev.score_batches([fake, fake])
    assert res['n_fake'] == 200 and res['floor'] is None and 'floor set holds 50' in res['floor_note']
    assert 'no real-vs-real floor' in format_fid(res)
    with pytest.raises(DataError, match='compares 2..50'): ev(fake)   # the tensor call keeps the strict protocol
    with pytest.raises(DataError, match='at least 2'): ev.score_batches([fake[:1]])


# ---- precision and recall ----------------------------------------------------------------------------------------

def brute_force_pr(real, fake, k):
    "Independent float64 reference: every pairwise distance with scipy, radii from sorted rows (self at index 0)."
    rr, rf = np.sort(cdist(real, real), 1)[:, k], np.sort(cdist(fake, fake), 1)[:, k]
    return (cdist(fake, real) <= rr[None]).any(1).mean(), (cdist(real, fake) <= rf[None]).any(1).mean(), rr


@pytest.mark.parametrize('k,batch_size,shift,seed', [(3, 1024, .5, 0), (1, 7, 1., 1), (5, 13, 0., 2), (3, 50, 2., 3)])
def test_precision_recall_matches_brute_force(k, batch_size, shift, seed):
    g = np.random.default_rng(seed)
    real, fake = g.normal(size=(120, 10)), g.normal(size=(90, 10)) * 1.3 + shift
    p, r, radii = brute_force_pr(real, fake, k)
    got = precision_recall(torch.from_numpy(real), fake, k=k, batch_size=batch_size)
    assert got['precision'] == pytest.approx(p, abs=1e-12) and got['recall'] == pytest.approx(r, abs=1e-12)
    assert got['k'] == k
    if shift in (.5, 1.): assert 0 < p < 1 and 0 < r < 1     # not a trivial all-or-nothing case
    np.testing.assert_allclose(knn_radii(torch.from_numpy(real), k, batch_size=batch_size).numpy(), radii, rtol=1e-9)


def test_precision_recall_known_answers():
    x = torch.randn(60, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert precision_recall(x, x) == dict(precision=1., recall=1., k=3)
    assert precision_recall(x, x + 100) == dict(precision=0., recall=0., k=3)
    # fakes collapsed onto a corner of the real set: all realistic, little covered
    corner = x[x[:, 0] > 1]
    res = precision_recall(x, corner[:, None].expand(-1, 3, -1).reshape(-1, 8).contiguous() + 1e-9)
    assert res['precision'] == 1 and res['recall'] < 0.5
    with pytest.raises(DataError, match='k < number'): precision_recall(x[:3], x)
    with pytest.raises(DataError, match='same D'): precision_recall(x, x[:, :4])


def test_evaluator_precision_recall_uses_cached_reference_features(real, fake, tmp_path):
    plain = FIDEvaluator(real, CountingFeatures(), n=100, cache=tmp_path)    # a file without reference features
    ext = CountingFeatures()
    e1 = FIDEvaluator(real, ext, n=100, cache=tmp_path, precision_recall=True)
    assert e1.ref_source == 'computed' and ext.seen == 200 and e1.cache_path == plain.cache_path
    r1 = e1(fake)
    assert {'precision', 'recall', 'k'} <= set(r1) and r1['fid'] == plain(fake)['fid']
    ref = e1.ref_features.double().numpy()
    feats = CountingFeatures()(fake).numpy()
    p, r, _ = brute_force_pr(ref, feats, 3)
    assert r1['precision'] == pytest.approx(p, abs=1e-12) and r1['recall'] == pytest.approx(r, abs=1e-12)
    ext2 = CountingFeatures()
    e2 = FIDEvaluator(real, ext2, n=100, cache=tmp_path, precision_recall=True)
    assert e2.ref_source == 'cache' and ext2.seen == 0 and e2(fake) == r1
    assert 'precision' in format_fid(r1)


# ---- published reference statistics ------------------------------------------------------------------------------

def _npz(path, **arrays):
    with open(path, 'wb') as f: np.savez(f, **arrays)
    return path


def test_adm_and_pytorch_fid_style_files_score_without_floor(real, fake, tmp_path):
    ev = FIDEvaluator(real, CountingFeatures(), n=100, cache=tmp_path / 'c')
    mu, sigma = ev.ref_stats.mean.numpy(), ev.ref_stats.cov.numpy()
    adm = _npz(tmp_path / 'VIRTUAL_toy.npz', arr_0=np.zeros((3, 8, 8, 3), np.uint8), mu=mu, sigma=sigma)
    pfid = _npz(tmp_path / 'pfid.npz', mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    want = ev(fake)['fid']
    for path, rel in ((adm, 1e-10), (pfid, 1e-4), (ev.cache_path, 1e-10)):
        ext = CountingFeatures()
        pe = FIDEvaluator.from_reference_stats(path, ext)
        res = pe(fake)
        assert res['fid'] == pytest.approx(want, rel=rel) and ext.seen == 100
        assert res['floor'] is None and 'no real-vs-real floor' in res['floor_note'] and res['reference'] == str(path)
        assert 'no real-vs-real floor' in format_fid(res)
    assert load_reference_stats(ev.cache_path, num_features=16).n == 200
    saved = ReferenceStats(mu, sigma, 200).save(tmp_path / 'ours.npz')
    assert load_reference_stats(saved, num_features=None).n == 200
    big = FIDEvaluator.from_reference_stats(adm, CountingFeatures()).score_batches([fake] * 5)   # any number of fakes
    assert big['n_fake'] == 500
    with pytest.raises(ConfigError, match='needs the reference sample size'):
        FIDEvaluator.from_reference_stats(adm, CountingFeatures(), backend='torchmetrics')


def test_malformed_reference_statistics_are_refused(tmp_path):
    s, m = np.eye(2048), np.zeros(2048)
    cases = [('missing.npz', dict(mu=m), 'has no sigma'),
             ('nokeys.npz', dict(arr_0=np.zeros(3)), 'has no mu or sigma'),
             ('shape.npz', dict(mu=m, sigma=np.eye(2047)), 'mu has shape'),
             ('mu2d.npz', dict(mu=s, sigma=s), 'mu has shape'),
             ('dim.npz', dict(mu=np.zeros(64), sigma=np.eye(64)), '64-d statistics, but the feature network gives 2048'),
             ('asym.npz', dict(mu=m, sigma=s + np.triu(np.ones((2048, 2048)), 1)), 'not symmetric'),
             ('nan.npz', dict(mu=m * np.nan, sigma=s), 'NaN'),
             ('pickle.npz', dict(mu=np.array([{'a': 1}], dtype=object), sigma=s), 'pickled')]
    for name, arrays, msg in cases:
        with pytest.raises(DataError, match=msg): load_reference_stats(_npz(tmp_path / name, **arrays))
    np.save(tmp_path / 'single.npy', m)
    with pytest.raises(DataError, match='not an .npz'): load_reference_stats(tmp_path / 'single.npy')
    with pytest.raises(DataError, match='do not exist'): load_reference_stats(tmp_path / 'absent.npz')
    (tmp_path / 'junk.npz').write_bytes(b'junk')
    with pytest.raises(DataError, match='cannot read'): load_reference_stats(tmp_path / 'junk.npz')
    ok = _npz(tmp_path / 'ok.npz', mu=np.zeros(16), sigma=np.eye(16))
    with pytest.raises(DataError, match='2048-d features'): load_reference_stats(ok)
    with pytest.raises(DataError, match='holds 16-d'): FIDEvaluator.from_reference_stats(ok, CountingFeatures(d=8))
    with pytest.raises(DataError, match='are 16-d'):
        FIDEvaluator.from_reference_stats(load_reference_stats(ok, num_features=None), CountingFeatures(d=8))


# ---- benchmark bookkeeping -----------------------------------------------------------------------------------------

def test_fid_eval_time_benchmark_runs(tmp_path, capsys):
    import importlib.util
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location('fid_eval_time', root / 'benchmarks' / 'fid_eval_time.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    (row,) = mod.main(['--n', '60', '--features', 'classifier', '--out', str(tmp_path / 'r.json')])
    assert row['n'] == 60 and row['build_cached_s'] <= row['build_cold_s'] + 0.05 and row['extract_img_per_s'] > 0
    assert json.loads((tmp_path / 'r.json').read_text())[0]['features'] == 'classifier'
    assert '| classifier | digits | 60 |' in capsys.readouterr().out
    (row,) = mod.main(['--n', '30', '--features', 'classifier', '--preset', 'smoke'])   # a preset's own data
    assert (row['data'], row['n'], row['n_ref']) == ('smoke', 30, 40)            # 2N + 10 reals: N floor, the rest R
    with pytest.raises(SystemExit, match='fewer than 2N'):
        mod.main(['--n', '5000', '--features', 'classifier', '--preset', 'smoke'])
