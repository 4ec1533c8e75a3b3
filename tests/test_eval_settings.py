"""The evaluation settings of a run: FID against the test split (`eval.reference`), precision/recall
(`eval.precision_recall`), published statistics (`eval.reference_stats`) and sampling precision (`sample.precision`)."""
import json

import numpy as np
import pytest
import torch
from scipy import linalg

from sadm_lab.config import get_config
from sadm_lab.core import ConfigError
from sadm_lab.metrics import ReferenceStats, precision_recall, split_real
from sadm_lab.train import Trainer, build_data, make_evaluator, sampling_precision


def fid64(a: np.ndarray, b: np.ndarray) -> float:
    "FID of two feature sets in float64 with scipy's matrix square root: the independent reference."
    a, b = a.astype(np.float64), b.astype(np.float64)
    m1, m2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


@pytest.fixture(scope='module')
def test_ref_run(tmp_path_factory):
    cfg = get_config('smoke', ['eval.reference=test', 'eval.num_samples=60', 'eval.precision_recall=true'])
    tr = Trainer(cfg, tmp_path_factory.mktemp('runs') / 'ref-test', progress=False)
    tr.fit()
    return tr


def test_fid_against_the_test_split_matches_an_independent_computation(test_ref_run):
    tr = test_ref_run
    (rec,) = [r for r in tr.run.read_metrics() if r.get('kind') == 'eval']
    test = build_data(tr.cfg, split='test')
    assert rec['reference'] == 'test' and rec['n_fake'] == 60 and rec['n_ref'] == len(test) - 60
    assert len(test) < len(tr.data) // 2                       # not the training split
    ext = tr.evaluator().extractor
    fake = tr.sample_images(60, seed=4321)                     # what the evaluation drew
    ref_idx, floor_idx = split_real(len(test), 60, seed=0)
    with torch.no_grad():
        f_fake, f_ref, f_floor = (ext(x).double().numpy() for x in (fake, test.images[ref_idx], test.images[floor_idx]))
    assert rec['fid'] == pytest.approx(fid64(f_fake, f_ref), rel=1e-6, abs=1e-8)
    assert rec['fid_floor'] == pytest.approx(fid64(f_floor, f_ref), rel=1e-6, abs=1e-8)
    want = precision_recall(torch.from_numpy(f_ref), torch.from_numpy(f_fake), k=3)
    assert (rec['precision'], rec['recall']) == pytest.approx((want['precision'], want['recall']))
    assert 0 <= rec['precision'] <= 1 and 0 <= rec['recall'] <= 1


def test_cli_eval_uses_the_run_reference(test_ref_run, capsys):
    from sadm_lab.cli import main
    assert main(['eval', str(tr_path(test_ref_run)), '-n', '40', '--json']) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res['n_ref'] == len(build_data(test_ref_run.cfg, split='test')) - 40 and 'precision' in res


def tr_path(tr): return tr.run.path


class Fake2048(torch.nn.Module):
    "Stands in for Inception (2048-d features) so the published-statistics path runs in a second."
    name, version, num_features = 'inception', 'test', 2048

    def __init__(self, *_, **__):
        super().__init__()
        self.register_buffer('w', torch.randn(2048, 64, generator=torch.Generator().manual_seed(0)))

    def forward(self, x): return torch.tanh(torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1) @ self.w.T).double()

    @property
    def tag(self): return 'inception:test'


def test_published_statistics_score_without_floor(tmp_path, monkeypatch):
    import sadm_lab.metrics as metrics
    monkeypatch.setattr(metrics, 'InceptionFeatures', Fake2048)
    monkeypatch.setattr('sadm_lab.train.check_eval_settings', lambda *a, **k: None)   # no weights file needed
    data = build_data(get_config('smoke'))
    g = torch.Generator().manual_seed(1)
    real_feats = Fake2048()(data.images[:400]).numpy()
    stats = ReferenceStats(real_feats.mean(0), np.cov(real_feats, rowvar=False), 400)
    path = stats.save(tmp_path / 'published.npz')
    ev = make_evaluator(data, features='inception', reference_stats=str(path))
    fake = torch.rand(50, *data.images.shape[1:], generator=g) * 2 - 1
    res = ev(fake)
    assert res['floor'] is None and 'no real-vs-real floor' in res['floor_note']
    assert res['fid'] == pytest.approx(fid64(Fake2048()(fake).numpy(), real_feats), rel=1e-5)


@pytest.mark.parametrize('overrides, msg', [
    (['eval.reference_stats=stats.npz'], 'published statistics of Inception features'),
    (['eval.reference_stats=absent.npz', 'eval.features=inception'], 'no such file'),
    (['eval.reference_stats=stats.npz', 'eval.features=inception', 'eval.precision_recall=true'], 'drop one'),
    (['eval.reference=test', 'eval.num_samples=100'], "'test' split"),
    (['eval.reference=valid'], 'eval.reference'),
    (['sample.precision=fp8'], 'sample.precision'),
])
def test_bad_eval_settings_are_refused_before_training(tmp_path, monkeypatch, overrides, msg):
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / 'stats.npz', mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ConfigError, match=msg):
        Trainer(get_config('smoke', overrides), tmp_path / 'run', progress=False)
    assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_sampling_precision(tmp_path):
    from sadm_lab.sample import generate
    tr = Trainer(get_config('smoke', ['train.steps=2']), tmp_path / 'run', progress=False)
    torch.manual_seed(0)
    with torch.no_grad():                                   # DiT starts with a zero output layer: give it weights
        for p in tr.unwrapped.parameters(): p.normal_(0, 0.1)
    def draw(prec):
        with sampling_precision(prec, 'cpu'):
            return generate(tr.unwrapped, tr.diffusion, 8, steps=5, generator=torch.Generator().manual_seed(3),
                            clip_x0=False, clamp=False)     # (an untrained network's samples would clamp to +-1)
    full, again, half = draw('fp32'), draw('fp32'), draw('bf16')
    assert torch.equal(full, again) and half.dtype == torch.float32
    rel = (half - full).norm() / full.norm()
    assert 0 < rel < 0.05                                   # bf16 changes the numbers, not the picture
    with pytest.raises(ConfigError, match='needs a CUDA device'): sampling_precision('fp16', 'cpu')
