"The widgets' logic without a browser: numbers against independent references, controls, the dashboard's threads."
import json, math, os, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip('ipywidgets')
pytest.importorskip('plotly')

from sadm_lab.config import get_config
from sadm_lab.core import ConfigError
from sadm_lab.masking import Masker, visible_count
from sadm_lab.structure import structural_distance
from sadm_lab.train import RunDir, Trainer, build_data, build_diffusion, build_network
from sadm_lab.widgets import (FeatureSpace, ManifoldExplorer, MaskVisualiser, MetricsTail, TrainingDashboard,
                              affinity_distance, align_layout, batch_structure, denoise_batch, knn_edges, layout_pca,
                              layout_umap, masked_prediction, memory_now)


@pytest.fixture(scope='module')
def tiny():
    cfg = get_config('smoke')
    data = build_data(cfg)
    torch.manual_seed(0)
    return build_network(cfg, data).eval(), build_diffusion(cfg), data


@pytest.fixture(scope='module')
def sadm_run(tmp_path_factory):
    "A finished 6-step SADM run of the smoke preset (structure encoder in its checkpoint)."
    d = tmp_path_factory.mktemp('sadm') / 'run'
    cfg = get_config('smoke', ['train.steps=6', 'train.ckpt_every=3', 'sadm.enabled=true', 'sadm.variant=literal',
                               'sadm.warmup_steps=0', 'sadm.affinity=gaussian', 'sadm.tau=4.0', 'eval.enabled=false', 'mask.strategy=block',
                               'mask.ratio=0.5', 'mask.block_size=2', 'mask.pretrain_steps=2', 'sadm.start_step=3'])
    Trainer(cfg, d, progress=False).fit()
    return d


def test_denoise_batch_is_the_trainers_prediction(tiny):
    net, diff, data = tiny
    x0, y = data.images[:10], data.labels[:10]
    t = torch.full((10,), 300)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    x_t = diff.q_sample(x0, t, noise)
    with torch.no_grad(): eps = net(x_t, t, y)[:, :x0.shape[1]]
    ref = ((x_t.double() - diff._coef('sigma', t, x_t).double() * eps.double()) / diff._coef('alpha', t, x_t).double()).clamp(-1, 1)
    got = denoise_batch(net, diff, x0, 300, y=y, seed=5)
    assert torch.allclose(got.double(), ref, atol=1e-5)
    with pytest.raises(ConfigError, match=r'timesteps must be in \[0, 999\]'): denoise_batch(net, diff, x0, 1000)


def test_batch_structure_matches_independent_float64_formulas():
    g = torch.Generator().manual_seed(3)
    x0, xh = torch.randn(12, 1, 4, 4, generator=g), torch.randn(12, 1, 4, 4, generator=g)
    r = batch_structure(x0, xh, FeatureSpace('pixels'), kind='cosine', k=3)
    mean = x0.double().mean(0)
    za, zb = (x0.double() - mean).flatten(1).numpy(), (xh.double() - mean).flatten(1).numpy()
    ca = za @ za.T / np.outer(np.linalg.norm(za, axis=1), np.linalg.norm(za, axis=1))
    cb = zb @ zb.T / np.outer(np.linalg.norm(zb, axis=1), np.linalg.norm(zb, axis=1))
    off = ~np.eye(12, dtype=bool)
    assert math.isclose(r['distance'], np.abs(ca - cb)[off].mean(), rel_tol=1e-5)   # features are float32
    np.testing.assert_allclose(r['a_real'].numpy(), ca, atol=1e-6)
    assert r['layout'].shape == (24, 2) and r['dist'].shape == (24, 24)
    # chordal distances of the joint batch against scipy
    from scipy.spatial.distance import cdist
    z = np.concatenate([za, zb])
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    np.testing.assert_allclose(r['dist'].numpy(), cdist(zn, zn), atol=1e-7)
    with pytest.raises(ConfigError, match='index-aligned'): batch_structure(x0, xh[:5], FeatureSpace('pixels'))


def test_knn_edges_degree_and_symmetry():
    z = torch.randn(30, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = -torch.cdist(z, z)
    e = knn_edges(a, 4)
    assert (e[:, 0] < e[:, 1]).all()
    deg = torch.bincount(e.flatten(), minlength=30)
    assert (deg >= 4).all()                      # every node keeps its own k neighbours
    d = affinity_distance(z, 'gaussian')
    ref = torch.tensor([[math.dist(a_, b_) for b_ in z.tolist()] for a_ in z.tolist()], dtype=torch.float64)
    assert torch.allclose(d, ref, atol=1e-12)


def test_layout_umap_keeps_clusters_apart():
    pytest.importorskip('umap')
    g = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randn(20, 5, generator=g) * 0.1 + c for c in (torch.zeros(5), torch.full((5,), 4.0))])
    xy = layout_umap(affinity_distance(z, 'gaussian'), k=5)
    a, b = xy[:20], xy[20:]
    gap = np.linalg.norm(a.mean(0) - b.mean(0))
    spread = max(np.linalg.norm(a - a.mean(0), axis=1).max(), np.linalg.norm(b - b.mean(0), axis=1).max())
    assert gap > 1.5 * spread                     # two well separated clusters stay two clusters


def test_umap_leaves_torchs_thread_count_alone():
    "numba's first parallel call sets the calling thread's OpenMP count to every core; layout_umap undoes it."
    pytest.importorskip('umap')
    code = ("import torch; from sadm_lab.widgets import layout_umap, affinity_distance\n"
            "before = torch.get_num_threads()\n"
            "layout_umap(affinity_distance(torch.randn(24, 4, generator=torch.Generator().manual_seed(0))), k=4)\n"
            "print(before, torch.get_num_threads())")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ['1', '1'], r.stdout


def test_align_layout_is_least_squares_optimal():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(15, 2)), rng.normal(size=(15, 2))
    best = ((align_layout(a, b) - b) ** 2).sum()
    for th in np.linspace(0, 2 * np.pi, 73):      # no rotation/reflection + scale + shift does better
        for refl in (1, -1):
            r = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]) @ np.diag([1, refl])
            a0 = (a - a.mean(0)) @ r
            s = max((a0 * (b - b.mean(0))).sum() / (a0 ** 2).sum(), 0)
            assert ((a0 * s + b.mean(0) - b) ** 2).sum() >= best - 1e-9
    assert layout_pca(torch.randn(1, 3)).shape == (1, 2)


def test_explorer_from_a_sadm_run_uses_its_encoder_and_affinity(sadm_run):
    ex = ManifoldExplorer.from_run(sadm_run, batch_size=16, layout='pca', k=3)
    assert ex.wait(60)
    assert ex.encoder is not None and ex.spaces[0] == 'encoder' and ex.settings['space'] == 'encoder'
    assert ex.settings['kind'] == 'gaussian' and ex.tau == 4.0
    r = ex.result
    t = torch.full((16,), r['t'])
    with torch.no_grad(): za, zb = ex.encoder(r['x0'], t).double(), ex.encoder(r['x0_hat'], t).double()
    assert math.isclose(r['distance'], float(structural_distance(za, zb, kind='gaussian', tau=4.0)), rel_tol=1e-6)
    before = r['distance']
    ex.controls['t'].value = 900
    assert ex.wait(60) and ex.result['t'] == 900 and ex.result['distance'] != before
    assert "t = 900" in ex.fig.layout.annotations[1].text
    old = ex.x0.clone()
    ex.new_batch.click(); ex.wait(60)
    assert not torch.equal(old, ex.x0)
    with pytest.raises(ConfigError, match='not available'):
        ManifoldExplorer(ex.model, ex.diffusion, ex.data, space='encoder', layout='pca')


@pytest.mark.parametrize('variant', ['linear', 'samples', 'representation'])
def test_explorer_from_a_variant_run_shows_what_it_compares(tmp_path, variant):
    cfg = get_config('smoke', ['train.steps=2', 'sadm.enabled=true', 'sadm.warmup_steps=0', 'eval.enabled=false',
                               f'sadm.variant={variant}', 'sadm.sampler_steps=2', 'sadm.outside_encoder=random'])
    Trainer(cfg, tmp_path / 'r', progress=False).fit()
    ex = ManifoldExplorer.from_run(tmp_path / 'r', batch_size=8, layout='pca', k=2)
    assert ex.wait(60)
    assert f"sadm.variant={variant!r}" in ex.objective_label.value
    assert ('by construction' in ex.objective_label.value) == (variant == 'representation')
    assert (ex.encoder is None) == (variant == 'representation')          # its state holds a projector, no encoder
    assert ex.settings['compare'] == ('samples' if variant == 'samples' else 'predictions')
    assert ex.result['statistic'] == ('MMD²' if variant == 'samples' else 'D')
    if variant == 'linear': assert ex.settings['kind'] == 'dot'


def test_explorer_umap_replaces_pca_and_ignores_stale_requests(tiny):
    pytest.importorskip('umap')
    net, diff, data = tiny
    ex = ManifoldExplorer(net, diff, data, batch_size=24, layout='umap', k=4)
    for t in (100, 200, 300): ex.controls['t'].value = t      # superseded requests are skipped
    assert ex.wait(180)
    assert ex.result['t'] == 300 and ex.result['layout_kind'] == 'umap'
    assert 'UMAP layout' in ex.status.value
    xs = np.array(ex.fig.data[1].x + ex.fig.data[4].x)
    assert np.allclose(xs, ex.result['layout'][:, 0])
    n_edges = len(ex.result['edges_real'])
    assert len(ex.fig.data[0].x) == 3 * n_edges


def test_mask_visualiser_counts_and_prediction(sadm_run):
    mv = MaskVisualiser.from_run(sadm_run, n_images=8)
    assert mv.settings['strategy'] == 'block' and mv.settings['block_size'] == 2
    assert mv.wait(60)
    for strategy, ratio in (('patch', 0.25), ('patch', 0.9), ('block', 0.5), ('block', 0.75)):
        mv.controls['strategy'].value, mv.controls['ratio'].value = strategy, ratio
        assert mv.wait(60)
        n = visible_count(strategy, (4, 4), ratio=ratio, block_size=2)
        assert mv.result['visible'] == n and f"<b class='sadm-visible-n'>{n}</b> / 16" in mv.count.value
        assert int((~mv.result['mask']).sum(1).unique()) == n
    assert mv.controls['crop_size'].disabled and not mv.controls['block_size'].disabled
    mv.controls['strategy'].value = 'crop'; mv.controls['crop_size'].value = 3
    assert mv.wait(60) and mv.result['visible'] == 9 and mv.controls['ratio'].disabled
    mv.controls['strategy'].value = 'patch'; mv.controls['ratio'].value = 0.95   # 15 of 16 masked: 1 visible, fine
    assert mv.wait(60) and mv.result['visible'] == 1
    # the prediction on visible patches equals the model's visible-token forward pass, placed at the kept positions
    model, diff = mv.model, mv.diffusion
    keep = Masker('patch', (4, 4), ratio=0.5)(4, generator=torch.Generator().manual_seed(1))
    from sadm_lab.masking import mask_to_keep_idx, token_view
    ki = mask_to_keep_idx(keep)
    x0 = mv.images[:4]
    pred = masked_prediction(model, diff, x0, ki, 50, y=mv.labels[:4], seed=2)
    out = diff.training_losses(model, x0, y=mv.labels[:4], t=torch.full((4,), 50), view=token_view(model, ki),
                               noise=torch.randn(x0.shape, generator=torch.Generator().manual_seed(2)))['pred_x0']
    tok = model.patchify(pred)
    for b in range(4):
        assert torch.allclose(tok[b, ki[b]], out[b].clamp(-1, 1), atol=1e-6)
        assert (tok[b][keep[b]] == 0).all()


def test_memory_now_reports_this_process():
    m = memory_now('cpu')
    assert 10 < m['rss_mb'] < 1e6 and 'gpu_mem_mb' not in m
    status = Path('/proc/self/status')
    if not status.is_file(): pytest.skip('no /proc here')
    def vmrss():                                   # an independent reading: VmRSS in kB from /proc/self/status
        return next(int(l.split()[1]) for l in status.read_text().splitlines() if l.startswith('VmRSS:')) / 1024
    before, got, after = vmrss(), memory_now()['rss_mb'], vmrss()
    assert min(before, after) - 2 <= got <= max(before, after) + 2


def test_metrics_tail_waits_for_a_half_written_line(tmp_path):
    p = tmp_path / 'metrics.jsonl'
    tail = MetricsTail(p)
    assert tail.read() == []
    p.write_text(json.dumps({'step': 1}) + '\n' + '{"step": ')
    assert tail.read() == [{'step': 1}]
    with open(p, 'a') as f: f.write('2}\n')
    assert tail.read() == [{'step': 2}] and tail.read() == []
    p.write_text(json.dumps({'step': 0}) + '\n')    # truncated (resume): read from the start
    assert tail.read() == [{'step': 0}]


def test_dashboard_stop_button_ends_training_with_a_checkpoint_and_resume_is_exact(tmp_path):
    cfg = get_config('smoke', ['train.steps=100000', 'train.log_every=2', 'train.ckpt_every=100000', 'eval.enabled=false'])
    dash = TrainingDashboard(refresh_s=0.0)
    th = dash.train(cfg, tmp_path / 'run')
    t0 = time.time()
    while len(dash.series.get('loss', ([], []))[0]) < 5 and time.time() - t0 < 120: time.sleep(0.05)
    assert not dash.stop_button.disabled
    dash.stop_button.click()                         # what the user does
    assert dash.wait(120) and not th.is_alive()
    step = dash.trainer.step
    assert 5 <= step < 100000 and dash.stopped_at == step
    run = RunDir(tmp_path / 'run')
    assert len(run.checkpoints()) == 1              # written by the stop, not by the schedule
    assert any(r.get('event') == 'stopped' for r in run.read_metrics())
    assert 'stopped at step' in dash.status.value and dash.stop_button.disabled
    # every step reached the curve, and the memory panel got the process's resident memory at each log line
    assert dash.series['loss'][0] == list(range(1, step + 1))
    assert len(dash.series['mem'][0]) == len(dash.series['loss_log'][0]) > 0
    # following the stopped run folder says it stopped (not finished)
    fol = TrainingDashboard(refresh_s=0.0)
    fol.follow(tmp_path / 'run', interval=0.05)
    assert fol.wait(30) and fol.stopped_at == step and f'stopped at step {step}' in fol.status.value
    # the stopped run resumes exactly where it stopped
    tr = Trainer(get_config('smoke', ['train.steps=100000', 'train.log_every=2', 'train.ckpt_every=100000', 'eval.enabled=false']),
                 tmp_path / 'run', resume=True, progress=False)
    assert tr.step == step


def test_stopping_and_starting_again_at_once_resumes_exactly(tmp_path):
    "The stop/start race: Stop, then train again at once, three times over (some stops land before a single step)."
    from sadm_lab.core import SadmError
    cfg = get_config('smoke', ['train.steps=16', 'train.log_every=4', 'train.ckpt_every=100', 'eval.enabled=false',
                               'train.sample_every=0'])
    ref = Trainer(cfg, tmp_path / 'ref', progress=False).fit()
    dash = TrainingDashboard(refresh_s=0.0)
    dash.train(cfg, tmp_path / 'r')
    with pytest.raises(SadmError, match='busy'): dash.train(cfg, tmp_path / 'r')    # not asked to stop: refused
    for pause in (0.0, 0.05, 0.2):
        time.sleep(pause)
        dash.stop()
        dash.train(cfg, tmp_path / 'r', resume=True)   # waits for the stopping thread, then resumes its checkpoint
    assert dash.wait(120)
    events = [r['event'] for r in RunDir(tmp_path / 'r').read_metrics() if r.get('kind') == 'event']
    # every segment opens (start/resume) and closes (stopped/end) once, in order; a stop that lands after the run has
    # finished (a fast machine) leaves a resume of the finished run, which closes with 'end' again
    events = [e for e in events if e in ('start', 'resume', 'stopped', 'end')]     # not 'stage'
    opens, closes = events[0::2], events[1::2]
    assert len(events) % 2 == 0 and opens[0] == 'start' and set(opens[1:]) <= {'resume'}, events
    assert set(closes) <= {'stopped', 'end'} and closes[-1] == 'end' and 'stopped' in closes, events
    assert all(c == 'end' for c in closes[closes.index('end'):]), events    # nothing trains after the end
    assert dash.trainer.step == 16 and dash.stop_button.disabled and 'finished at step 16' in dash.status.value
    for k, v in ref.unwrapped.state_dict().items(): assert torch.equal(v, dash.trainer.unwrapped.state_dict()[k]), k
    assert torch.get_num_threads() >= 1


def test_dashboard_reports_errors(tmp_path):
    dash = TrainingDashboard(refresh_s=0.0)
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'config.json').write_text('{not json')
    with pytest.raises(ConfigError, match='not valid JSON'):       # bad input fails at once, in the caller
        dash.train(get_config('smoke', ['train.steps=3']), tmp_path / 'bad')
    tr = Trainer(get_config('smoke', ['train.steps=50', 'eval.enabled=false']), tmp_path / 'run', progress=False)
    step = tr.train_step
    def failing():
        if tr.step == 3: raise RuntimeError('boom at step 3')
        return step()
    tr.train_step = failing
    dash.train(tr)
    with pytest.raises(RuntimeError, match='boom'): dash.wait(60)
    assert 'training failed: RuntimeError: boom at step 3' in dash.status.value and dash.stop_button.disabled


def test_dashboard_follows_a_cli_run_while_it_trains(tmp_path):
    run_dir = tmp_path / 'cli-run'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    p = subprocess.Popen([sys.executable, '-m', 'sadm_lab.cli', 'train', 'smoke', '--run-dir', str(run_dir),
                          'train.steps=60', 'train.log_every=5', 'train.sample_every=20', 'eval.enabled=false'],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        dash = TrainingDashboard(refresh_s=0.0)
        t0 = time.time()
        while not (run_dir / 'metrics.jsonl').exists() and time.time() - t0 < 120: time.sleep(0.1)
        dash.follow(run_dir, interval=0.1)
        seen_growing = []
        while dash.thread.is_alive() and time.time() - t0 < 180:
            seen_growing.append(len(dash.series.get('loss_log', ([], []))[0])); time.sleep(0.2)
        assert dash.wait(5)
        out = p.communicate(timeout=120)[0].decode()
        assert p.returncode == 0, out[-2000:]
    finally:
        if p.poll() is None: p.kill()
    logged = [r for r in RunDir(run_dir).read_metrics() if r.get('kind') == 'train']
    assert dash.series['loss_log'][0] == [r['step'] for r in logged] == list(range(5, 61, 5))
    assert dash.stopped_at == 60 and 'finished' in dash.status.value
    assert dash.samples.value[:4] == b'\x89PNG'
    assert len(set(seen_growing)) > 1               # the curve grew while the other process trained
