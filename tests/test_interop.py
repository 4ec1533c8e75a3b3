"""Runs that travel: export to diffusers (checked against diffusers' own model and scheduler), import of diffusers DiTs,
one safetensors file with a model card, and the CLI around them."""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

from sadm_lab.config import get_config
from sadm_lab.core import CheckpointError, ConfigError, SadmError, atomic_torch_save, file_sha256, safe_torch_load
from sadm_lab.diffusion import space_timesteps
from sadm_lab.interop import (diffusers_overrides, diffusers_scheduler_config, export_diffusers, export_safetensors,
                              load_diffusers_dit, load_safetensors_model, read_safetensors, sample_with_diffusers)
from sadm_lab.train import RunDir, Trainer, load_run

diffusers = pytest.importorskip('diffusers')
ROOT = Path(__file__).resolve().parents[1]


def cli(*args, env=None):
    return subprocess.run([sys.executable, '-m', 'sadm_lab.cli', *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env=env)


def make_run(path, *overrides, steps=2, randomize=True):
    "A tiny trained run; its checkpoint's weights replaced by random ones so that every weight matters."
    cfg = get_config('smoke', ['train.steps=%d' % steps, 'eval.enabled=false', *overrides])
    Trainer(cfg, path, progress=False).fit()
    if randomize:
        ck_path = RunDir(path).latest_checkpoint()
        ck = safe_torch_load(ck_path)
        g = torch.Generator().manual_seed(1)
        rnd = {k: (v if k == 'pos_embed' else 0.2 * torch.randn(v.shape, generator=g)) for k, v in ck['model'].items()}
        ck['model'] = rnd
        if ck.get('ema') is not None:
            ck['ema'] = {k: (rnd[k[len('model.'):]] if k.startswith('model.') else v) for k, v in ck['ema'].items()}
        atomic_torch_save(ck, ck_path)
        RunDir(path).checksum_path(ck_path).write_text(file_sha256(ck_path) + '\n')   # (as the trainer writes it)
    return path


def inputs(model, b=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.tensor([0, 1, 250, 700, 999])[:b]
    y = torch.randint(0, max(model.num_classes, 1), (b,), generator=g)
    return x, t, y


def diffusers_model(folder, shift=None):
    d = diffusers.DiTTransformer2DModel.from_pretrained(Path(folder) / 'transformer').eval()
    if shift is not None:
        for blk in d.transformer_blocks: blk.norm1.emb.time_proj.downscale_freq_shift = shift
    return d


CASES = {
    'eps-cosine-cfg': [],
    'x0-linear-sigma-nonull': ['diffusion.prediction=x0', 'diffusion.schedule=linear', 'model.learn_sigma=true',
                               'model.class_dropout_prob=0'],
    'v-unconditional': ['diffusion.prediction=v', 'data.conditional=false'],
    'diffusers-features': ['model.time_freq_shift=1', 'model.patch_size=4'],
}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp('interop')
    return {name: make_run(base / name, *ov) for name, ov in CASES.items()}


@pytest.mark.parametrize('case', list(CASES))
@torch.no_grad()
def test_exported_transformer_equals_the_run_model(runs, tmp_path, case):
    run = runs[case]
    folder = export_diffusers(run, tmp_path / 'out')
    info = json.loads((folder / 'sadm_lab.json').read_text())
    model = load_run(run, weights='ema')[0]
    x, t, y = inputs(model)
    ours = model(x, t, y if model.num_classes else None)
    assert ours.abs().mean() > 0.05                                   # random weights: every layer contributes
    yd = y if model.num_classes else torch.zeros_like(y)              # unconditional: one class, zero embedding
    fixed = diffusers_model(folder, shift=info['time_freq_shift'])(x, t, class_labels=yd).sample
    torch.testing.assert_close(fixed, ours, atol=2e-5, rtol=1e-5)
    plain = diffusers_model(folder)(x, t, class_labels=yd).sample     # diffusers as it loads, without the one line
    if model.time_freq_shift == 1: torch.testing.assert_close(plain, ours, atol=2e-5, rtol=1e-5)
    else: assert (plain - ours).abs().max() > 1e-3                   # the shift matters: the README's line is needed
    assert info['num_classes'] == model.num_classes and info['null_class'] == (model.null_class is not None)


@pytest.mark.parametrize('case', list(CASES))
def test_diffusers_ddim_walks_the_same_trajectory_as_sadm_lab_sample(runs, tmp_path, case):
    run = runs[case]
    folder = export_diffusers(run, tmp_path / 'out')
    out = tmp_path / 'ours.pt'
    r = cli('sample', run, '-n', 6, '--sampler', 'ddim', '--steps', 10, '--seed', 3, '--device', 'cpu',
            '--out', tmp_path / 'g.png', '--save-tensor', out)
    assert r.returncode == 0, r.stderr
    ours = safe_torch_load(out)
    theirs = sample_with_diffusers(folder, 6, steps=10, generator=torch.Generator().manual_seed(3))
    assert ours.shape == theirs.shape and ours.std() > 0.1
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_exported_scheduler_has_the_runs_schedule_and_the_documented_step_limit(runs, tmp_path):
    for case in ('eps-cosine-cfg', 'x0-linear-sigma-nonull'):
        model, diffusion, cfg, _ = load_run(runs[case])
        sched = diffusers.DDIMScheduler.from_config(diffusers_scheduler_config(diffusion))
        torch.testing.assert_close(sched.alphas_cumprod.double(), diffusion.alphas_cumprod, atol=1e-6, rtol=1e-5)
        assert sched.config.prediction_type == {'eps': 'epsilon', 'x0': 'sample'}[cfg.diffusion.prediction]
        sched.set_timesteps(10)
        assert sched.timesteps.tolist() == space_timesteps(1000, 10)
    # a step count that does not divide T: diffusers steps to t - T//steps, sadm_lab to the next trailing timestep
    folder = export_diffusers(runs['eps-cosine-cfg'], tmp_path / 'out')
    model, diffusion, _, _ = load_run(runs['eps-cosine-cfg'])
    from sadm_lab.sample import generate
    ours = generate(model, diffusion, 4, sampler='ddim', steps=7, generator=torch.Generator().manual_seed(0),
                    progress=False)
    theirs = sample_with_diffusers(folder, 4, steps=7, generator=torch.Generator().manual_seed(0))
    assert (ours - theirs).abs().max() > 1e-4


@torch.no_grad()
def test_a_diffusers_native_dit_imports_exactly_and_unsupported_ones_are_refused(tmp_path):
    torch.manual_seed(0)
    d = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=6,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=5).eval()
    for p in d.parameters(): p.copy_(0.2 * torch.randn_like(p))
    emb0 = d.transformer_blocks[0].norm1.emb.state_dict()
    d.transformer_blocks[1].norm1.emb.load_state_dict(emb0)          # the official layout: one shared embedder
    d.save_pretrained(tmp_path / 'native')
    m = load_diffusers_dit(tmp_path / 'native')
    assert (m.time_freq_shift, m.num_classes, m.learn_sigma, m.null_class) == (1, 5, True, 5)
    x = torch.randn(4, 3, 8, 8); t = torch.tensor([0, 3, 400, 999]); y = torch.tensor([0, 2, 4, 5])  # 5: null
    torch.testing.assert_close(m(x, t, y), d(x, t, class_labels=y).sample, atol=1e-4, rtol=1e-4)  # norm_eps 1e-5
    ov = diffusers_overrides(tmp_path / 'native')
    assert ov['model.hidden_size'] == 32 and ov['model.time_freq_shift'] == 1 and ov['data.channels'] == 3
    # a pipeline folder (transformer/ inside) resolves to its transformer
    (tmp_path / 'pipe').mkdir(); (tmp_path / 'native').rename(tmp_path / 'pipe' / 'transformer')
    assert load_diffusers_dit(tmp_path / 'pipe').depth == 2
    # per-block embedders that differ cannot be represented: refused with the size of the difference
    with torch.no_grad(): d.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(0.1)
    d.save_pretrained(tmp_path / 'own-emb')
    with pytest.raises(CheckpointError, match='own timestep/label embedders in block 1'):
        load_diffusers_dit(tmp_path / 'own-emb')
    cfg_path = tmp_path / 'pipe' / 'transformer' / 'config.json'
    c = json.loads(cfg_path.read_text())
    c.update(activation_fn='gelu', norm_eps=1e-3)
    cfg_path.write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="activation_fn='gelu'.*norm_eps=0.001"):
        load_diffusers_dit(tmp_path / 'pipe')
    with pytest.raises(CheckpointError, match='no such folder'): load_diffusers_dit(tmp_path / 'missing' / 'x')


def test_the_hub_offline_gives_one_clear_error(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(CheckpointError, match="cannot fetch 'nobody/no-such-dit' from the Hugging Face\\s+hub"):
        load_diffusers_dit('nobody/no-such-dit')


def test_fine_tuning_from_a_diffusers_folder_like_an_official_checkpoint(runs, tmp_path):
    folder = export_diffusers(runs['diffusers-features'], tmp_path / 'exp')
    ov = diffusers_overrides(folder)
    cfg = get_config('smoke', ['train.steps=3', 'eval.enabled=false', 'train.lr=0', 'train.ema_decay=0',
                               *[f'{k}={v}' for k, v in ov.items()], f'train.init_from={folder}'])
    tr = Trainer(cfg, tmp_path / 'ft', progress=False)
    src = load_diffusers_dit(folder)
    for k, v in src.state_dict().items(): torch.testing.assert_close(tr.unwrapped.state_dict()[k], v)
    tr.fit()
    assert tr.step == 3
    # the same weights under the other timestep features would be another function: refused up front
    other = [f'{k}={v}' for k, v in ov.items() if k != 'model.time_freq_shift']
    bad = get_config('smoke', ['eval.enabled=false', *other, f'train.init_from={folder}'])
    with pytest.raises(ConfigError, match='model.time_freq_shift=1'):
        Trainer(bad, tmp_path / 'ft2', progress=False)


def test_safetensors_export_with_model_card(tmp_path):
    run = make_run(tmp_path / 'run', 'eval.enabled=true', 'eval.num_samples=40', 'train.log_every=1', steps=3,
                   randomize=False)
    f = export_safetensors(run, tmp_path / 'out' / 'smoke.safetensors')
    sd, meta = read_safetensors(f)
    model, diffusion, cfg, _ = load_run(run, weights='ema')
    assert set(sd) == set(model.state_dict()) and all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert json.loads(meta['config']) == cfg.to_dict() and meta['step'] == '3' and meta['weights'] == 'ema'
    m2, d2, cfg2 = load_safetensors_model(f)
    x, t, y = inputs(model)
    with torch.no_grad(): torch.testing.assert_close(m2(x, t, y), model(x, t, y), atol=0, rtol=0)
    assert cfg2 == cfg and d2.num_timesteps == diffusion.num_timesteps
    card = (tmp_path / 'out' / 'smoke.md').read_text()
    recs = RunDir(run).read_metrics()
    ev = [r for r in recs if r.get('kind') == 'eval'][-1]
    start = next(r for r in recs if r.get('event') == 'start')
    assert f"| 3 | {ev['fid']:.2f} | {ev['fid_floor']:.2f} | {ev['nn_ratio']:.2f} |" in card
    assert f"{ev['n_fake']} generated vs {ev['n_ref']} real" in card
    assert '| images seen | 96 |' in card and 'steps 1-3' in card
    assert start['provenance']['sadm_lab'] in card and json.dumps(cfg.to_dict(), indent=2) in card
    # fine-tuning from the file, and the destination rules
    ft = get_config('smoke', ['train.steps=1', 'eval.enabled=false', f'train.init_from={f}'])
    tr = Trainer(ft, tmp_path / 'ft', progress=False)
    assert all(torch.equal(tr.unwrapped.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(SadmError, match='already exists'): export_safetensors(run, f)
    with pytest.raises(ConfigError, match='must end in .safetensors'): export_safetensors(run, tmp_path / 'm.pt')


def test_a_failed_export_leaves_nothing_behind(runs, tmp_path, monkeypatch):
    import sadm_lab.interop as io
    def boom(*a, **k): raise OSError('disk full')
    monkeypatch.setattr(io, '_save_safetensors', boom)
    with pytest.raises(OSError, match='disk full'): export_diffusers(runs['eps-cosine-cfg'], tmp_path / 'out')
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    first = export_diffusers(runs['eps-cosine-cfg'], tmp_path / 'out')
    with pytest.raises(SadmError, match='already exists'): export_diffusers(runs['eps-cosine-cfg'], first)
    export_diffusers(runs['v-unconditional'], first, force=True)       # replaced whole, no leftovers
    assert json.loads((first / 'sadm_lab.json').read_text())['num_classes'] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']


def test_cli_export_and_import(runs, tmp_path):
    run = runs['eps-cosine-cfg']
    r = cli('export', run, '--to', 'diffusers', tmp_path / 'd')
    assert r.returncode == 0 and (tmp_path / 'd' / 'README.md').is_file(), r.stderr
    readme = (tmp_path / 'd' / 'README.md').read_text()
    assert 'def sample_with_diffusers' in readme and 'downscale_freq_shift' in readme
    r = cli('export', run, '--to', 'safetensors', tmp_path / 's.safetensors', '--weights', 'model')
    assert r.returncode == 0 and (tmp_path / 's.md').is_file(), r.stderr
    r = cli('import', tmp_path / 'd', '--json')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == diffusers_overrides(tmp_path / 'd')
    r = cli('import', tmp_path / 'd')
    assert r.returncode == 0 and 'train.init_from=' in r.stdout and 'loads exactly' in r.stdout
    r = cli('export', run, '--to', 'diffusers', tmp_path / 'd')                    # exists
    assert r.returncode == 2 and 'already exists' in r.stderr and 'Traceback' not in r.stderr
    uvit = make_run(tmp_path / 'uvit', 'model.preset=UViT-T/2', 'model.depth=3', 'model.hidden_size=32',
                    randomize=False)
    r = cli('export', uvit, '--to', 'diffusers', tmp_path / 'u')
    assert r.returncode == 2 and 'export this run with `--to safetensors`' in r.stderr
    env = {**os.environ, 'HF_HUB_OFFLINE': '1'}
    r = cli('import', 'nobody/no-such-dit', env=env)
    assert r.returncode == 2 and 'Hugging Face hub' in r.stderr and 'Traceback' not in r.stderr
