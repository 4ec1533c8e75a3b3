"""Latent diffusion with a (tiny, random, offline) VAE: the codec, the cache, a latent run end to end on CPU, and its
export to a diffusers DiTPipeline folder."""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

from sadm_lab.config import get_config
from sadm_lab.core import ConfigError, DataError
from sadm_lab.latent import LatentCodec, cache_latents, load_latents, tiny_vae
from sadm_lab.train import RunDir, Trainer, load_run

diffusers = pytest.importorskip('diffusers')
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def vae_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('vae') / 'tiny-vae'
    vae = tiny_vae(image_channels=1, latent_channels=4, seed=3)
    vae.save_pretrained(d)
    return d


def test_codec_scaling_and_shapes_against_the_vae_itself(vae_dir):
    codec = LatentCodec.from_pretrained(vae_dir)
    vae = diffusers.AutoencoderKL.from_pretrained(vae_dir).eval()
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    z = codec.encode(x, mode='mean')
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        torch.testing.assert_close(z, ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(codec.decode(z), vae.decode(ref / vae.config.scaling_factor).sample.clamp(-1, 1),
                                   atol=1e-6, rtol=1e-5)
    assert codec.latent_shape((1, 8, 8)) == (4, 4, 4) and codec.factor == 2
    draw = codec.encode(x, generator=torch.Generator().manual_seed(0))
    assert (draw - z).abs().max() > 1e-3                     # a posterior draw, not the mean
    with pytest.raises(DataError, match='not divisible'): codec.latent_shape((1, 9, 9))
    with pytest.raises(ConfigError, match='no such folder'): LatentCodec.from_pretrained(vae_dir / 'nope' / 'x')


def test_cache_is_resumable_deterministic_and_keyed(vae_dir, tmp_path, monkeypatch):
    codec = LatentCodec.from_pretrained(vae_dir)
    x, y = torch.rand(9, 1, 8, 8) * 2 - 1, torch.arange(9) % 4
    full = cache_latents(x, codec, labels=y, cache_dir=tmp_path / 'a', shard_size=4, progress=False)
    z_full, y_full, man = load_latents(full)
    assert z_full.shape == (9, 4, 4, 4) and torch.equal(y_full, y) and len(man['shards']) == 3
    calls = []
    real = LatentCodec.encode
    def failing(self, images, **kw):                          # interrupted while encoding the second shard
        calls.append(len(images))
        if len(calls) == 2: raise KeyboardInterrupt
        return real(self, images, **kw)
    monkeypatch.setattr(LatentCodec, 'encode', failing)
    with pytest.raises(KeyboardInterrupt):
        cache_latents(x, codec, labels=y, cache_dir=tmp_path / 'b', shard_size=4, progress=False)
    with pytest.raises(DataError, match='incomplete'): load_latents(next((tmp_path / 'b').iterdir()))
    monkeypatch.setattr(LatentCodec, 'encode', real)
    again = cache_latents(x, codec, labels=y, cache_dir=tmp_path / 'b', shard_size=4, progress=False)
    torch.testing.assert_close(load_latents(again)[0], z_full, atol=0, rtol=0)   # resumed == uninterrupted
    other = cache_latents(x.flip(0), codec, labels=y, cache_dir=tmp_path / 'b', shard_size=4, progress=False)
    assert other != again                                     # other images: another key, another folder


def test_a_latent_run_trains_samples_evaluates_and_resumes(vae_dir, tmp_path, monkeypatch):
    monkeypatch.setenv('SADM_LAB_CACHE', str(tmp_path / 'cache'))
    ov = [f'data.vae={vae_dir}', 'train.steps=4', 'eval.num_samples=40', 'train.eval_every=0', 'train.ckpt_every=2',
          'train.sample_every=0', 'sample.steps=5', 'sample.grid_size=10']
    tr = Trainer(get_config('smoke', ov), tmp_path / 'run', progress=False)
    assert tr.data.images.shape[1:] == (4, 4, 4) and tr.pixel_data.images.shape[1:] == (1, 8, 8)
    assert tr.unwrapped.in_channels == 4 and tr.unwrapped.input_size == 4
    imgs = tr.sample_images(6)
    assert imgs.shape == (6, 1, 8, 8) and imgs.abs().max() <= 1          # decoded images
    tr.fit()
    ev = [r for r in RunDir(tmp_path / 'run').read_metrics() if r.get('kind') == 'eval'][-1]
    assert ev['fid'] > 0 and ev['n_fake'] == 40 and 'nn_ratio' in ev
    # the cache was made once: a second run on the same data and VAE does not encode again
    monkeypatch.setattr(LatentCodec, 'encode', lambda *a, **k: pytest.fail('encoded again'))
    tr2 = Trainer(get_config('smoke', ov[:1] + ['train.steps=2', 'eval.enabled=false']), tmp_path / 'run2',
                  progress=False)
    assert torch.equal(tr2.data.images, tr.data.images)
    # exact resume of a latent run
    part = Trainer(get_config('smoke', ov[:1] + ['train.steps=2', 'eval.enabled=false', 'train.ckpt_every=2']),
                   tmp_path / 'part', progress=False).fit()
    part = Trainer(get_config('smoke', ov[:1] + ['train.steps=4', 'eval.enabled=false', 'train.ckpt_every=2']),
                   tmp_path / 'part', resume=True, progress=False).fit()
    whole = Trainer(get_config('smoke', ov[:1] + ['train.steps=4', 'eval.enabled=false', 'train.ckpt_every=2']),
                    tmp_path / 'whole', progress=False).fit()
    for k, v in whole.unwrapped.state_dict().items(): assert torch.equal(part.unwrapped.state_dict()[k], v), k
    # sampling from the run folder decodes
    model, diffusion, cfg, _ = load_run(tmp_path / 'run')
    assert model.latent_codec is not None and model.in_channels == 4
    out = tmp_path / 's.pt'
    r = subprocess.run([sys.executable, '-m', 'sadm_lab.cli', 'sample', str(tmp_path / 'run'), '-n', '4', '--steps',
                        '3', '--device', 'cpu', '--out', str(tmp_path / 's.png'), '--save-tensor', str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, 'SADM_LAB_CACHE': str(tmp_path / 'cache')})
    assert r.returncode == 0, r.stderr
    from sadm_lab.core import safe_torch_load
    assert safe_torch_load(out).shape == (4, 1, 8, 8)


def test_a_latent_run_exports_to_a_ditpipeline_that_samples_what_sadm_lab_samples(vae_dir, tmp_path, monkeypatch):
    from sadm_lab.interop import export_diffusers, sample_with_diffusers
    from sadm_lab.sample import generate
    from sadm_lab.train import latent_sampling
    monkeypatch.setenv('SADM_LAB_CACHE', str(tmp_path / 'cache'))
    cfg = get_config('smoke', [f'data.vae={vae_dir}', 'train.steps=3', 'eval.enabled=false', 'train.lr=3e-3',
                               'model.time_freq_shift=1', 'model.learn_sigma=true'])
    Trainer(cfg, tmp_path / 'run', progress=False).fit()
    folder = export_diffusers(tmp_path / 'run', tmp_path / 'out')
    assert json.loads((folder / 'model_index.json').read_text())['_class_name'] == 'DiTPipeline'
    model, diffusion, _, _ = load_run(tmp_path / 'run')
    labels = [0, 3, 7, 9]
    z = generate(model, diffusion, 4, sampler='ddim', steps=10, y=torch.tensor(labels), progress=False,
                 generator=torch.Generator().manual_seed(0), **latent_sampling(model.latent_codec))
    ours = model.latent_codec.decode(z)
    pipe = diffusers.DiTPipeline.from_pretrained(folder)
    theirs = pipe(class_labels=labels, guidance_scale=1.0, num_inference_steps=10,
                  generator=torch.Generator().manual_seed(0), output_type='np').images
    theirs = torch.from_numpy(theirs).permute(0, 3, 1, 2)
    assert ours.std() > 0.01
    torch.testing.assert_close(theirs, (ours + 1) / 2, atol=1e-4, rtol=0)
    loop = sample_with_diffusers(folder, 4, steps=10, class_labels=labels, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loop, ours, atol=2e-4, rtol=0)
    card = (folder / 'README.md').read_text()
    assert 'latents of the VAE' in card


def test_widgets_refuse_latent_runs_clearly(vae_dir, tmp_path, monkeypatch):
    from sadm_lab.core import SadmError
    from sadm_lab.widgets import ManifoldExplorer, MaskVisualiser
    monkeypatch.setenv('SADM_LAB_CACHE', str(tmp_path / 'cache'))
    Trainer(get_config('smoke', [f'data.vae={vae_dir}', 'train.steps=1', 'eval.enabled=false']), tmp_path / 'run',
            progress=False).fit()
    for cls in (ManifoldExplorer, MaskVisualiser):
        with pytest.raises(SadmError, match='trains on VAE latents'): cls.from_run(tmp_path / 'run')


def test_latent_exports_say_how_to_rebuild_the_run(vae_dir, tmp_path, monkeypatch):
    from sadm_lab.interop import diffusers_overrides, export_diffusers, export_safetensors, load_safetensors_model
    monkeypatch.setenv('SADM_LAB_CACHE', str(tmp_path / 'cache'))
    Trainer(get_config('smoke', [f'data.vae={vae_dir}', 'train.steps=1', 'eval.enabled=false']), tmp_path / 'run',
            progress=False).fit()
    folder = export_diffusers(tmp_path / 'run', tmp_path / 'out')
    ov = diffusers_overrides(folder)
    assert (ov['data.vae'], ov['data.resolution'], ov['data.channels']) == (str(folder / 'vae'), 8, 1)
    f = export_safetensors(tmp_path / 'run', tmp_path / 'm.safetensors')
    model, _, cfg = load_safetensors_model(f)
    assert model.latent_codec is not None and model.latent_codec.latent_shape((1, 8, 8)) == (4, 4, 4)
    card = (tmp_path / 'm.md').read_text()
    assert 'codec.decode(latents)' in card and 'latent_sampling' in card
