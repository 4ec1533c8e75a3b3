"""`generate(convention=...)` against float64 transcriptions of the official sampling loops, from the same noise.

References, written from the public code (not from sadm_lab):
* DiT (facebookresearch/DiT @ ed81ce2): `diffusion/__init__.py` (`create_diffusion`: linear betas, LEARNED_RANGE,
  eps), `diffusion/respace.py` (`space_timesteps`, `SpacedDiffusion` betas, `_WrappedModel` timestep map),
  `diffusion/gaussian_diffusion.py` (tables, `p_mean_variance`, `p_sample`, `p_sample_loop`), `models.py`
  (`forward_with_cfg`), `sample_ddp.py` (cfg only when > 1, `clip_denoised=False`, drop the null half).
* MaskDM (jiachenlei/maskdm @ 0e79a60): `gaussian_ddpm.py` (`linear_beta_schedule`, `cosine_beta_schedule`,
  `model_predictions`, `ddim_sample`), `eval.py` (250 steps, eta 1, clip_denoised True).

Tolerance: 1e-5 absolute on the final samples (generate keeps the state in float32 and calls the float32 network;
the references run the chain in float64 and call the same network on the state cast to float32).
"""
import math, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from sadm_lab.core import ConfigError
from sadm_lab.diffusion import Diffusion, space_timesteps
from sadm_lab.models.dit import DiT
from sadm_lab.sample import CONVENTIONS, Denoiser, generate, sample_ddim

pytestmark = pytest.mark.numerics       # (CI runs these again with the CPU dispatch at AVX2)

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
C, SIZE, K = 4, 4, 3            # 4 latent channels (so DiT's first-3-channels rule is visible), 3 classes


# ---------------------------------------------------------------- shared model
class TinyDiT(nn.Module):
    """A tiny DiT (4 channels, 3 classes + null, learned sigma) with random non-zero weights, so eps, variance channels
    and labels all matter. Untrained, its samples would blow up (|x| ~ 400 after an unclipped chain), so its eps
    channels get a skip connection, eps = x_t + 0.5 DiT(x_t)[:C] (a crude denoiser: samples stay O(1)), and its
    variance channels are squashed into the trained range by tanh. Everything else (labels, null class, the doubled
    batch) goes through the DiT."""
    def __init__(self, num_classes=K, learn_sigma=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.dit = DiT(input_size=SIZE, patch_size=2, in_channels=C, hidden_size=32, depth=2, num_heads=2,
                       num_classes=num_classes, learn_sigma=learn_sigma)
        with torch.no_grad():
            for p in self.dit.parameters():
                if p.requires_grad: p.normal_(0, 0.1)
        self.in_channels, self.input_size, self.num_classes = C, SIZE, num_classes
        self.learn_sigma, self.out_channels = learn_sigma, self.dit.out_channels
    def forward(self, x, t, y=None):
        out = self.dit(x, t, y)
        eps = x + 0.5 * out[:, :C]
        return torch.cat([eps, torch.tanh(out[:, C:])], 1) if self.learn_sigma else eps

def tiny_dit(num_classes=K, learn_sigma=True, seed=0):
    return TinyDiT(num_classes, learn_sigma, seed).eval().requires_grad_(False)

@pytest.fixture(scope='module')
def model(): return tiny_dit()

def net(model, x64, t, y):
    "The network on a float64 state, called as generate calls it (float32 in, float64 out)."
    t = torch.as_tensor(t, dtype=torch.long).expand(x64.shape[0]) if torch.as_tensor(t).ndim == 0 else t
    return model(x64.float(), t, y).double()

def randn(shape, g): return torch.randn(shape, generator=g, dtype=torch.float32).double()


# ---------------------------------------------------------------- DiT / ADM reference
def adm_linear_betas(T):
    "gaussian_diffusion.get_named_beta_schedule('linear', T)."
    scale = 1000 / T
    return np.linspace(scale * 0.0001, scale * 0.02, T, dtype=np.float64)

def adm_space_timesteps(T, n):
    "respace.space_timesteps(T, str(n)): one section, fractional stride accumulated, Python round."
    size, frac_stride = T, (1 if n <= 1 else (T - 1) / (n - 1))
    cur, taken = 0.0, []
    for _ in range(n):
        taken.append(round(cur)); cur += frac_stride
    assert size >= n
    return set(taken)

class ADMSpaced:
    "SpacedDiffusion(use_timesteps, betas): the respaced betas and the GaussianDiffusion tables p_sample reads."
    def __init__(self, betas, use_timesteps):
        ac, last, new, self.timestep_map = np.cumprod(1.0 - betas), 1.0, [], []
        for i, a in enumerate(ac):
            if i in use_timesteps:
                new.append(1 - a / last); last = a; self.timestep_map.append(i)
        b = self.betas = np.array(new, dtype=np.float64)
        acp = np.cumprod(1.0 - b)
        prev = np.append(1.0, acp[:-1])
        self.num_timesteps = len(b)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1)
        self.posterior_variance = b * (1.0 - prev) / (1.0 - acp)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = b * np.sqrt(prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - prev) * np.sqrt(1.0 - b) / (1.0 - acp)

def forward_with_cfg(model, x, t, y, cfg_scale, guided_channels=3):
    "models.DiT.forward_with_cfg (guided_channels=None: all channels, the 'standard approach' of its comment)."
    half = x[:len(x) // 2]
    out = net(model, torch.cat([half, half]), t, y)
    k = C if guided_channels is None else guided_channels
    eps, rest = out[:, :k], out[:, k:]
    cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
    h = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([h, h]), rest], 1)

def dit_reference(model, T, steps, n, batch_size, y, cfg_scale, g, *, guided_channels=3, variance='learned_range'):
    "sample_ddp.py per batch: z, [z; z] + null labels if cfg > 1, p_sample_loop(clip_denoised=False), first half."
    dif = ADMSpaced(adm_linear_betas(T), adm_space_timesteps(T, steps))
    outs = []
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        x, yb = randn((b, C, SIZE, SIZE), g), y[i:i + b]
        if cfg_scale > 1: x, yb = torch.cat([x, x]), torch.cat([yb, torch.full_like(yb, K)])
        for j in reversed(range(dif.num_timesteps)):          # p_sample_loop_progressive
            t = torch.full((len(x),), dif.timestep_map[j], dtype=torch.long)    # _WrappedModel maps to the original t
            out = (forward_with_cfg(model, x, t, yb, cfg_scale, guided_channels) if cfg_scale > 1
                   else net(model, x, t, yb))
            eps, var_values = torch.split(out, C, dim=1)      # p_mean_variance, LEARNED_RANGE
            min_log, max_log = dif.posterior_log_variance_clipped[j], math.log(dif.betas[j])
            frac = (var_values + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
            if variance == 'fixed_small': log_var = torch.full_like(log_var, min_log)
            x0 = dif.sqrt_recip_alphas_cumprod[j] * x - dif.sqrt_recipm1_alphas_cumprod[j] * eps   # no clipping
            mean = dif.posterior_mean_coef1[j] * x0 + dif.posterior_mean_coef2[j] * x
            noise = randn(x.shape, g)                          # p_sample: drawn at every step, masked at t = 0
            x = mean + float(j != 0) * torch.exp(0.5 * log_var) * noise
        outs.append(x[:b] if cfg_scale > 1 else x)
    return torch.cat(outs)


# ---------------------------------------------------------------- MaskDM reference
def maskdm_betas(schedule, T, s=0.008):
    "gaussian_ddpm.linear_beta_schedule / cosine_beta_schedule (shift=False)."
    if schedule == 'linear':
        scale = 1000 / T
        return torch.linspace(scale * 0.0001, scale * 0.02, T, dtype=torch.float64)
    x = torch.linspace(0, T, T + 1, dtype=torch.float64)
    ac = torch.cos(((x / T) + s) / (1 + s) * math.pi * 0.5) ** 2
    ac = ac / ac[0]
    return torch.clip(1 - (ac[1:] / ac[:-1]), 0, 0.999)

def maskdm_reference(model, schedule, objective, T, steps, n, batch_size, y, eta, g, *, clip=True, raw_eps=True):
    "GaussianDiffusion.ddim_sample per batch (raw_eps=False: eps re-derived from the clipped x0, sadm_lab's rule)."
    ac = torch.cumprod(1.0 - maskdm_betas(schedule, T), 0)
    times = list(reversed(torch.linspace(-1, T - 1, steps=steps + 1).int().tolist()))
    outs = []
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        img, yb = randn((b, C, SIZE, SIZE), g), (y[i:i + b] if y is not None else None)
        for time, time_next in zip(times[:-1], times[1:]):
            out = net(model, img, time, yb)[:, :C]            # a learned-sigma model: its first C channels
            a = ac[time]
            if objective == 'eps':                            # model_predictions(..., clip_x_start=clip)
                x_start = torch.sqrt(1.0 / a) * img - torch.sqrt(1.0 / a - 1) * out
                if clip: x_start = x_start.clamp(-1, 1)
                pred_noise = out
                if not raw_eps: pred_noise = (torch.sqrt(1.0 / a) * img - x_start) / torch.sqrt(1.0 / a - 1)
            else:                                             # pred_v: noise from the (clipped) x_start
                x_start = torch.sqrt(a) * img - torch.sqrt(1 - a) * out
                if clip: x_start = x_start.clamp(-1, 1)
                pred_noise = (torch.sqrt(1.0 / a) * img - x_start) / torch.sqrt(1.0 / a - 1)
            if time_next < 0: img = x_start; continue
            an = ac[time_next]
            sigma = eta * ((1 - a / an) * (1 - an) / (1 - a)).sqrt()
            c = (1 - an - sigma ** 2).sqrt()
            noise = randn(img.shape, g)                       # drawn even when eta = 0
            img = x_start * an.sqrt() + c * pred_noise + sigma * noise
        outs.append(img)
    return torch.cat(outs)


def gen(seed=0): return torch.Generator().manual_seed(seed)
def maxdiff(a, b): return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------- respacing
@pytest.mark.parametrize('T', [1000, 250, 100, 21])
def test_adm_and_maskdm_spacings_match_official_formulas(T):
    for n in range(1, T + 1):
        assert space_timesteps(T, n, spacing='adm') == sorted(adm_space_timesteps(T, n), reverse=True), (T, n)
        if n < T:
            official = list(reversed(torch.linspace(-1, T - 1, steps=n + 1).int().tolist()))[:-1]
            assert space_timesteps(T, n, spacing='maskdm') == official, (T, n)

def test_spacings_differ_where_documented():
    "'adm' is not numpy's linspace rounding for every n, 'maskdm' is not 'trailing' (but both agree at 250 of 1000)."
    assert space_timesteps(1000, 21, spacing='adm') != space_timesteps(1000, 21, spacing='linspace')
    assert space_timesteps(1000, 3, spacing='maskdm') == [999, 665, 332] != space_timesteps(1000, 3)
    assert space_timesteps(1000, 250, spacing='adm') == space_timesteps(1000, 250, spacing='linspace')
    assert space_timesteps(1000, 250, spacing='maskdm') == space_timesteps(1000, 250)


# ---------------------------------------------------------------- DiT
@pytest.mark.parametrize('cfg_scale', [1.0, 4.0])
def test_dit_convention_matches_adm_p_sample_loop(model, cfg_scale):
    "Two batches (3 = 2 + 1): also checks that the generator is consumed as ADM does (doubled batch, draw at t=0)."
    y, n, steps = torch.tensor([0, 2, 1]), 3, 25
    ref = dit_reference(model, 1000, steps, n, 2, y, cfg_scale, gen())
    ours = generate(model, Diffusion(), n, convention='dit', steps=steps, y=y, cfg_scale=cfg_scale, batch_size=2,
                    generator=gen(), progress=False)
    assert maxdiff(ours, ref) < TOL
    assert ref.abs().max() > 1.2            # so the samples were not clamped to [-1, 1] (DiT returns them raw)

def test_dit_default_steps_are_250(model):
    y = torch.tensor([1])
    ref = dit_reference(model, 1000, 250, 1, 1, y, 1.5, gen(3))
    assert maxdiff(generate(model, Diffusion(), 1, convention='dit', y=y, cfg_scale=1.5, generator=gen(3),
                            progress=False), ref) < TOL

def test_dit_convention_differs_from_variants(model):
    "Power: all-channel guidance or a fixed variance would be detected (each moves the samples by far more than TOL)."
    y, steps = torch.tensor([0, 2]), 25
    ours = generate(model, Diffusion(), 2, convention='dit', steps=steps, y=y, cfg_scale=4.0, generator=gen(),
                    progress=False)
    all_channels = dit_reference(model, 1000, steps, 2, 2, y, 4.0, gen(), guided_channels=None)
    small = dit_reference(model, 1000, steps, 2, 2, y, 4.0, gen(), variance='fixed_small')
    assert maxdiff(ours, all_channels) > 1e-2
    assert maxdiff(ours, small) > 1e-2

def test_dit_guidance_touches_only_first_three_channels(model):
    "One step from t=999 with the same noise: guided vs unguided differ in channels 0-2 only (the 4th eps channel and"
    " the variance come from the conditional half)."
    y = torch.tensor([0, 1])
    a = generate(model, Diffusion(), 2, convention='dit', steps=1, y=y, cfg_scale=1.0, generator=gen(),
                 progress=False)
    # steps=1: ADM's respacing keeps t=0 only: x0 = x_0-estimate at t=0, still guided on channels [:3]
    b = generate(model, Diffusion(), 2, convention='dit', steps=1, y=y, cfg_scale=4.0, generator=gen(),
                 progress=False)
    assert maxdiff(a[:, :3], b[:, :3]) > 1e-4
    assert maxdiff(a[:, 3:], b[:, 3:]) < 1e-6


# ---------------------------------------------------------------- MaskDM
@pytest.mark.parametrize('schedule,objective,eta', [('cosine', 'eps', 1.0), ('cosine', 'eps', 0.0),
                                                    ('linear', 'eps', 0.5), ('cosine', 'v', 1.0)])
def test_maskdm_convention_matches_ddim_sample(model, schedule, objective, eta):
    y, n, steps = torch.tensor([0, 1, 2]), 3, 20
    d = Diffusion(schedule=schedule, prediction=objective)
    ref = maskdm_reference(model, schedule, objective, 1000, steps, n, 2, y, eta, gen())
    ours = generate(model, d, n, convention='maskdm', steps=steps, eta=eta, y=y, batch_size=2, generator=gen(),
                    progress=False)
    assert maxdiff(ours, ref) < TOL

def test_maskdm_defaults_unconditional_model():
    "MaskDM's setting: unconditional eps model, 250 steps, eta 1, clipping."
    m = tiny_dit(num_classes=0, learn_sigma=False, seed=1)
    ref = maskdm_reference(m, 'cosine', 'eps', 1000, 250, 2, 2, None, 1.0, gen(5))
    ours = generate(m, Diffusion(schedule='cosine'), 2, convention='maskdm', generator=gen(5), progress=False)
    assert maxdiff(ours, ref) < TOL

def test_maskdm_raw_eps_is_the_difference_from_sadm_lab(model):
    "Power: sadm_lab's DDIM on the same timesteps re-derives eps from the clipped x0 = the reference with raw_eps=False;"
    " keeping the raw eps moves the samples by O(1)."
    y, steps, d = torch.tensor([0, 1, 2]), 20, Diffusion(schedule='cosine')
    mask = generate(model, d, 3, convention='maskdm', steps=steps, eta=0.0, y=y, generator=gen(), progress=False)
    ours = generate(model, d, 3, sampler='ddim', spacing='maskdm', steps=steps, eta=0.0, y=y, generator=gen(),
                    progress=False)
    rederived = maskdm_reference(model, 'cosine', 'eps', 1000, steps, 3, 3, y, 0.0, gen(), raw_eps=False)
    assert maxdiff(ours, rederived) < TOL
    assert maxdiff(mask, ours) > 0.1


# ---------------------------------------------------------------- the default is unchanged
def test_default_convention_is_the_previous_pipeline(model):
    "generate without `convention` = 'sadm_lab' = Denoiser(clip_x0=True, all-channel CFG) + DDIM eta 0 on 50"
    " 'trailing' steps, clamped (the pre-existing generate), bit for bit."
    y = torch.tensor([0, 1, 2])
    for cfg in (1.0, 4.0):
        a = generate(model, Diffusion(), 3, y=y, cfg_scale=cfg, batch_size=2, generator=gen(), progress=False)
        b = generate(model, Diffusion(), 3, y=y, cfg_scale=cfg, batch_size=2, generator=gen(), progress=False,
                     convention='sadm_lab')
        g, parts = gen(), []
        den = Denoiser(model, Diffusion(), cfg_scale=cfg, clip_x0=True)
        for i, bs in ((0, 2), (2, 1)):
            x = torch.randn((bs, C, SIZE, SIZE), generator=g)
            parts.append(sample_ddim(den, x, space_timesteps(1000, 50, spacing='trailing'), eta=0.,
                                     extra_args=dict(y=y[i:i + bs]), disable=True, generator=g).clamp(-1, 1))
        assert torch.equal(a, b) and torch.equal(a, torch.cat(parts))
    assert CONVENTIONS['sadm_lab']['fixed'] == ()

def test_conventions_differ_from_each_other(model):
    y = torch.tensor([0, 1])
    kw = dict(y=y, steps=20, generator=None, progress=False)
    outs = {c: generate(model, Diffusion(), 2, convention=c, **{**kw, 'generator': gen()}) for c in CONVENTIONS}
    assert maxdiff(outs['sadm_lab'], outs['dit']) > 1e-2
    assert maxdiff(outs['sadm_lab'], outs['maskdm']) > 1e-2
    assert maxdiff(outs['dit'], outs['maskdm']) > 1e-2


# ---------------------------------------------------------------- impossible combinations
def test_convention_errors(model):
    plain = tiny_dit(learn_sigma=False)
    d = Diffusion()
    with pytest.raises(ConfigError, match='learned-sigma'): generate(plain, d, 2, convention='dit', progress=False)
    with pytest.raises(ConfigError, match='eps-prediction'):
        generate(model, Diffusion(prediction='v'), 2, convention='dit', progress=False)
    with pytest.raises(ConfigError, match='cfg_scale >= 1'):
        generate(model, d, 2, convention='dit', cfg_scale=0.5, progress=False)
    with pytest.raises(ConfigError, match='class-conditional'):
        generate(tiny_dit(num_classes=0), d, 2, convention='dit', cfg_scale=2.0, progress=False)
    with pytest.raises(ConfigError, match='fixes sampler'):
        generate(model, d, 2, convention='dit', sampler='ddim', progress=False)
    with pytest.raises(ConfigError, match='fixes clip_x0'):
        generate(model, d, 2, convention='dit', clip_x0=True, progress=False)
    with pytest.raises(ConfigError, match='fixes spacing'):
        generate(model, d, 2, convention='maskdm', spacing='trailing', progress=False)
    with pytest.raises(ConfigError, match='no classifier-free guidance'):
        generate(model, d, 2, convention='maskdm', cfg_scale=1.5, progress=False)
    with pytest.raises(ConfigError, match='steps < T'):
        generate(model, d, 2, convention='maskdm', steps=1000, progress=False)
    with pytest.raises(ConfigError, match='unknown sampling convention'):
        generate(model, d, 2, convention='DiT', progress=False)


# ---------------------------------------------------------------- CLI
def _cli(*args):
    return subprocess.run([sys.executable, '-m', 'sadm_lab.cli', *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)

def test_cli_sample_convention(tmp_path):
    "`sadm-lab sample RUN --convention ...` = generate(convention=...) on the run; dit on a plain model is one error."
    from sadm_lab.train import load_run
    common = ['train.steps=1', 'eval.enabled=false', 'train.device=cpu', 'sample.grid_size=4', '--no-progress']
    run, plain = tmp_path / 'sigma', tmp_path / 'plain'
    assert _cli('train', 'smoke', 'model.learn_sigma=true', '--run-dir', run, *common).returncode == 0
    model, diffusion, cfg, _ = load_run(run, device='cpu')
    for conv in ('dit', 'maskdm'):
        r = _cli('sample', run, '-n', 3, '--convention', conv, '--steps', 3, '--device', 'cpu',
                 '--save-tensor', tmp_path / f'{conv}.pt')
        assert r.returncode == 0 and (run / 'samples' / f'cli-{conv}-3.png').is_file(), r.stderr
        want = generate(model, diffusion, 3, convention=conv, steps=3, cfg_scale=cfg.sample.cfg_scale,
                        batch_size=cfg.sample.batch_size, generator=gen(0), progress=False)
        assert maxdiff(torch.load(tmp_path / f'{conv}.pt'), want) < 1e-6
    r = _cli('sample', run, '-n', 2, '--convention', 'dit', '--sampler', 'ddim', '--device', 'cpu')
    assert r.returncode == 2 and 'fixes sampler' in r.stderr and 'Traceback' not in r.stderr
    assert _cli('train', 'smoke', '--run-dir', plain, *common).returncode == 0
    r = _cli('sample', plain, '-n', 2, '--convention', 'dit', '--device', 'cpu')
    assert r.returncode == 2 and 'learned-sigma' in r.stderr and 'Traceback' not in r.stderr
    r = _cli('sample', plain, '-n', 2, '--steps', 2, '--device', 'cpu', '--out', tmp_path / 'default.png')
    assert r.returncode == 0 and (tmp_path / 'default.png').is_file(), r.stderr
