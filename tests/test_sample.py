"Tests for sadm_lab.sample: step-by-step agreement with diffusers' schedulers, exact-denoiser checks, CFG, generate."
import math

import pytest
import torch
import torch.nn as nn

from sadm_lab.core import ConfigError
from sadm_lab.diffusion import Diffusion, space_timesteps
from sadm_lab.sample import (Denoiser, DenoiserOutput, sample_ddpm, sample_ddim, sample_dpmpp_2m, generate, SAMPLERS)

pytestmark = [pytest.mark.numerics,   # (CI runs these again with the CPU dispatch at AVX2)
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]  # diffusers + numpy 2

DIFFUSERS_SCHEDULE = dict(linear='linear', cosine='squaredcos_cap_v2')
DIFFUSERS_PREDICTION = dict(eps='epsilon', v='v_prediction')


# ---------------------------------------------------------------- toy models
def fn_output(x, t, C_out=None):
    "A fixed smooth function of (x_t, t) standing in for a trained network (random-looking model outputs)."
    tt = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1) if torch.as_tensor(t).ndim else float(t)
    out = 0.6 * torch.tanh(1.3 * x) + 0.4 * torch.sin(tt / 97. + 2 * x)
    return out

class FnModel(nn.Module):
    "Wraps `fn_output`; with learn_sigma the extra channels are `var_value` (in [-1, 1]) or a function of x."
    def __init__(self, C=2, size=4, num_classes=0, learn_sigma=False, var_value=None):
        super().__init__()
        self.in_channels, self.input_size, self.num_classes = C, size, num_classes
        self.learn_sigma, self.var_value = learn_sigma, var_value
        self.out_channels = C * (2 if learn_sigma else 1)
        self.dummy = nn.Parameter(torch.zeros(()))
    def forward(self, x, t, y=None, keep_idx=None):
        out = fn_output(x, t)
        if y is not None: out = out + 0.1 * y.to(x.dtype).view(-1, 1, 1, 1)
        if not self.learn_sigma: return out
        var = torch.tanh(x) if self.var_value is None else torch.full_like(x, self.var_value)
        return torch.cat([out, var], 1)

def run_diffusers(sched, x, generator, learn_sigma=False, **step_kw):
    "diffusers' sampling loop with the same model function; returns the list of states (entering each step) + final."
    states = []
    for t in sched.timesteps:
        states.append(x)
        out = fn_output(x, t)
        if learn_sigma: out = torch.cat([out, torch.tanh(x)], 1)
        x = sched.step(out, t, x, generator=generator, **step_kw).prev_sample
    return states + [x]

def align(sched, d, dtype):
    "float64 runs give diffusers our float64 alphas_cumprod (the same schedule); float32 runs keep diffusers' own."
    if dtype == torch.float64: sched.alphas_cumprod = d.alphas_cumprod.clone()
    return sched

TOL = {torch.float64: 1e-5, torch.float32: 1e-4}   # float32: diffusers' float32 cumprod differs by ~1e-6 relative

def run_ours(fn, model, d, x, ts, generator, **options):
    states = []
    x = fn(Denoiser(model, d, clip_x0=False), x, ts, disable=True, generator=generator,
           callback=lambda s: states.append(s['x']), **options)
    return states + [x]

def assert_trajectories_close(ours, ref, tol=1e-5):
    "Every state agrees to `tol`, absolute or relative to the state's scale (un-clipped toy models reach |x| ~ 50)."
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        err = ((a - b).abs() / (1 + b.abs())).max().item()
        assert err < tol, f"step {i}: max difference {err:.2e} (relative to 1 + |x|)"


# ---------------------------------------------------------------- agreement with diffusers
# Mapping (documented in nbs/api/03_diffusion and 05_sample):
#   schedule 'linear' <-> beta_schedule='linear', beta_start=1e-4, beta_end=0.02 (T=1000); 'cosine' <-> 'squaredcos_cap_v2'
#   space_timesteps(T, n, spacing=s) <-> DDIMScheduler(timestep_spacing=s, steps_offset=0) timesteps; DDPM and
#   DPM-Solver schedulers get our list through set_timesteps(timesteps=...).
#   clip_x0=False <-> clip_sample=False, thresholding=False; last step to clean data <-> set_alpha_to_one=True (DDIM),
#   prev_t=-1 -> alpha_prod=1 (DDPM), final_sigmas_type='zero' with lower_order_final (DPM-Solver).

@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
@pytest.mark.parametrize('prediction', ['eps', 'v'])
@pytest.mark.parametrize('spacing,variance', [('trailing', 'small'), ('linspace', 'small'), ('linspace', 'large')])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_ddpm_matches_diffusers(schedule, prediction, spacing, variance, dtype):
    from diffusers import DDPMScheduler
    d = Diffusion(schedule=schedule, prediction=prediction)
    ts = space_timesteps(1000, 10, spacing=spacing)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_SCHEDULE[schedule], beta_start=1e-4,
                          beta_end=0.02, clip_sample=False, thresholding=False,
                          variance_type=dict(small='fixed_small', large='fixed_large')[variance],
                          prediction_type=DIFFUSERS_PREDICTION[prediction])
    align(sched, d, dtype).set_timesteps(timesteps=ts)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ref = run_diffusers(sched, x, torch.Generator().manual_seed(1))
    ours = run_ours(sample_ddpm, FnModel(), d, x, ts, torch.Generator().manual_seed(1), variance=variance)
    assert_trajectories_close(ours, ref, TOL[dtype])

@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_ddpm_learned_variance_matches_diffusers(schedule, dtype):
    from diffusers import DDPMScheduler
    d = Diffusion(schedule=schedule)
    ts = space_timesteps(1000, 10, spacing='linspace')
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_SCHEDULE[schedule], clip_sample=False,
                          variance_type='learned_range')
    align(sched, d, dtype).set_timesteps(timesteps=ts)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ref = run_diffusers(sched, x, torch.Generator().manual_seed(1), learn_sigma=True)
    ours = run_ours(sample_ddpm, FnModel(learn_sigma=True), d, x, ts, torch.Generator().manual_seed(1), variance='learned')
    assert_trajectories_close(ours, ref, TOL[dtype])

@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
@pytest.mark.parametrize('prediction', ['eps', 'v'])
@pytest.mark.parametrize('spacing,steps', [('trailing', 20), ('leading', 25), ('trailing', 8)])
@pytest.mark.parametrize('eta', [0.0, 1.0, 0.5])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_ddim_matches_diffusers(schedule, prediction, spacing, steps, eta, dtype):
    from diffusers import DDIMScheduler
    d = Diffusion(schedule=schedule, prediction=prediction)
    ts = space_timesteps(1000, steps, spacing=spacing)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_SCHEDULE[schedule], beta_start=1e-4,
                          beta_end=0.02, clip_sample=False, thresholding=False, set_alpha_to_one=True, steps_offset=0,
                          timestep_spacing=spacing, prediction_type=DIFFUSERS_PREDICTION[prediction])
    align(sched, d, dtype).set_timesteps(steps)
    assert sched.timesteps.tolist() == ts
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ref = run_diffusers(sched, x, torch.Generator().manual_seed(1), eta=eta)
    ours = run_ours(sample_ddim, FnModel(), d, x, ts, torch.Generator().manual_seed(1), eta=eta)
    assert_trajectories_close(ours, ref, TOL[dtype])

@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
@pytest.mark.parametrize('prediction', ['eps', 'v'])
@pytest.mark.parametrize('spacing,steps', [('trailing', 20), ('linspace', 10), ('leading', 16)])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_dpmpp_2m_matches_diffusers(schedule, prediction, spacing, steps, dtype):
    from diffusers import DPMSolverMultistepScheduler
    d = Diffusion(schedule=schedule, prediction=prediction)
    ts = space_timesteps(1000, steps, spacing=spacing)
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_SCHEDULE[schedule],
                                        beta_start=1e-4, beta_end=0.02, algorithm_type='dpmsolver++', solver_order=2,
                                        solver_type='midpoint', lower_order_final=True, final_sigmas_type='zero',
                                        thresholding=False, prediction_type=DIFFUSERS_PREDICTION[prediction])
    align(sched, d, dtype).set_timesteps(timesteps=ts)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ref = run_diffusers(sched, x, None)
    ours = run_ours(sample_dpmpp_2m, FnModel(), d, x, ts, None)
    # the first state (pure noise) is the same tensor; the final DPM state is the last x0 estimate
    assert_trajectories_close(ours, ref, TOL[dtype])


# ---------------------------------------------------------------- exact denoisers
class PointOracle(nn.Module):
    "Exact eps-model when the data set is the single point xs."
    def __init__(self, xs, d): super().__init__(); self.xs, self.d, self.num_classes = xs, d, 0
    def forward(self, x, t, y=None): return self.d.eps_from_x0(x, t, self.xs.expand_as(x))

@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
@pytest.mark.parametrize('name', list(SAMPLERS))
def test_single_point_dataset_is_recovered(schedule, name):
    d = Diffusion(schedule=schedule)
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(1, 3, 4, 4, generator=g, dtype=torch.float64) * 1.8 - 0.9
    x = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    for steps in [1, 5, 50]:
        out = SAMPLERS[name](Denoiser(PointOracle(xs, d), d), x, space_timesteps(1000, steps), disable=True, generator=g)
        torch.testing.assert_close(out, xs.expand_as(out), rtol=0, atol=1e-8)

def test_ddim_eta0_point_oracle_every_step_on_the_path():
    "With the exact x0 oracle, each DDIM(eta=0) state is alpha_t' xs + sigma_t' eps_0: the noise direction is kept."
    d = Diffusion(schedule='cosine', prediction='v')
    g = torch.Generator().manual_seed(1)
    xs = torch.rand(1, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps0 = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    ts = space_timesteps(1000, 7, spacing='leading')
    ab = d.alphas_cumprod
    x = ab[ts[0]].sqrt() * xs + (1 - ab[ts[0]]).sqrt() * eps0

    class VOracle(nn.Module):
        num_classes = 0
        def forward(self, x, t, y=None):
            x0 = xs.expand_as(x)
            return d.v_from(x0, d.eps_from_x0(x, t, x0), t)
    states = []
    sample_ddim(Denoiser(VOracle(), d), x, ts, disable=True, callback=lambda s: states.append(s['x']))
    for t, s in zip(ts, states):
        torch.testing.assert_close(s, ab[t].sqrt() * xs + (1 - ab[t]).sqrt() * eps0, rtol=0, atol=1e-9)

class GaussianOracle(nn.Module):
    "Exact eps-model for data with iid N(mu, s^2) pixels: E[x0|x_t] = mu + a s^2 (x_t - a mu) / (a^2 s^2 + sigma^2)."
    def __init__(self, mu, s, d): super().__init__(); self.mu, self.s, self.d, self.num_classes = mu, s, d, 0
    def forward(self, x, t, y=None):
        ab = self.d.alphas_cumprod.to(x.dtype)[t].view(-1, 1, 1, 1)
        a, sig = ab.sqrt(), (1 - ab).sqrt()
        x0 = self.mu + a * self.s ** 2 * (x - a * self.mu) / (ab * self.s ** 2 + sig ** 2)
        return (x - a * x0) / sig

@pytest.mark.parametrize('name,steps,schedule,tol', [
    ('dpmpp_2m', 50, 'linear', 0.02), ('dpmpp_2m', 50, 'cosine', 0.02), ('dpmpp_2m', 25, 'cosine', 0.02),
    ('ddim', 250, 'linear', 0.025), ('ddim', 250, 'cosine', 0.025), ('ddpm', 1000, 'linear', 0.025)])
def test_gaussian_data_moments(name, steps, schedule, tol):
    """With the exact denoiser of N(mu, s^2) data the samples have mean mu and std s, up to the sampler's own
    discretisation error (first-order DDIM and 'small'-variance DDPM under-disperse by ~1.5% even at 250 / 1000 steps)."""
    mu, s = 0.3, 0.4
    d = Diffusion(schedule=schedule)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 1, 8, 8, generator=g, dtype=torch.float64)     # 65536 draws: sampling error ~0.3%
    out = SAMPLERS[name](Denoiser(GaussianOracle(mu, s, d), d, clip_x0=False), x, space_timesteps(1000, steps),
                         disable=True, generator=g)
    assert abs(out.mean().item() - mu) < 0.01, out.mean().item()
    assert abs(out.std().item() / s - 1) < tol, out.std().item()

def test_trailing_last_step_returns_posterior_mean():
    "Documented caveat: with few trailing steps the last state is t = T/n - 1 and the output is E[x0 | x_t] there."
    mu, s = 0.3, 0.4
    d = Diffusion(schedule='linear')
    x = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = space_timesteps(1000, 15)
    out = sample_dpmpp_2m(Denoiser(GaussianOracle(mu, s, d), d, clip_x0=False), x, ts, disable=True)
    ab = d.alphas_cumprod[ts[-1]].item()
    shrink = math.sqrt(ab * s ** 2 / (ab * s ** 2 + 1 - ab))           # std of the posterior mean / s
    assert abs(out.std().item() / (s * shrink) - 1) < 0.03 and shrink < 0.9

# ---------------------------------------------------------------- denoiser, CFG, determinism
class Spy(nn.Module):
    def __init__(self, m): super().__init__(); self.m, self.num_classes, self.calls = m, m.num_classes, []
    def forward(self, x, t, y=None): self.calls.append((x.shape[0], None if y is None else y.clone())); return self.m(x, t, y)

@pytest.mark.parametrize('prediction', ['eps', 'x0', 'v'])
def test_cfg(prediction):
    d = Diffusion(prediction=prediction)
    g = torch.Generator().manual_seed(0)
    spy = Spy(FnModel(C=2, num_classes=5, learn_sigma=True))
    x, t, y = torch.randn(4, 2, 4, 4, generator=g), torch.tensor([3, 300, 600, 999]), torch.tensor([0, 1, 4, 2])
    plain = d.to_x0_eps(spy.m(x, t, y)[:, :2], x, t)
    # cfg_scale=1: one conditional call, identical to the plain conditional prediction
    o1 = Denoiser(spy, d, cfg_scale=1.0, clip_x0=False)(x, t, y)
    assert spy.calls[-1][0] == 4
    assert torch.equal(o1.x0, plain[0]) and torch.equal(o1.eps, plain[1])
    # cfg_scale=s: doubled batch with the null class, eps (and x0) extrapolated from the unconditional prediction
    o = Denoiser(spy, d, cfg_scale=3.0, clip_x0=False)(x, t, y)
    assert spy.calls[-1][0] == 8 and torch.equal(spy.calls[-1][1], torch.tensor([0, 1, 4, 2, 5, 5, 5, 5]))
    unc = d.to_x0_eps(spy.m(x, t, torch.full_like(y, 5))[:, :2], x, t)
    torch.testing.assert_close(o.eps, unc[1] + 3.0 * (plain[1] - unc[1]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(o.x0, unc[0] + 3.0 * (plain[0] - unc[0]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(o.var_values, torch.tanh(x))          # variance channels from the conditional half
    # no labels: no guidance, unconditional call
    Denoiser(spy, d, cfg_scale=3.0)(x, t)
    assert spy.calls[-1] == (4, None)

def test_clip_x0_keeps_eps_consistent():
    d = Diffusion(prediction='x0')
    class Big(nn.Module):
        num_classes = 0
        def forward(self, x, t, y=None): return 3 * torch.ones_like(x)
    x, t = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.tensor([100, 900])
    o = Denoiser(Big(), d)(x, t)
    assert torch.equal(o.x0, torch.ones_like(x))
    torch.testing.assert_close(d.q_sample(o.x0, t, o.eps), x)
    o = Denoiser(Big(), d, clip_x0=False)(x, t)
    assert torch.equal(o.x0, 3 * torch.ones_like(x))
    assert isinstance(o, DenoiserOutput)

@pytest.mark.parametrize('name,options', [('ddpm', {}), ('ddim', dict(eta=1.0)), ('dpmpp_2m', {})])
def test_determinism_with_generator(name, options):
    d = Diffusion()
    den = Denoiser(FnModel(num_classes=3), d)
    ts = space_timesteps(1000, 6)
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    run = lambda seed: SAMPLERS[name](den, x, ts, extra_args=dict(y=torch.tensor([0, 2])), disable=True,
                                      generator=torch.Generator().manual_seed(seed), **options)
    assert torch.equal(run(5), run(5))
    assert torch.equal(run(5), run(6)) == (name == 'dpmpp_2m')          # only the ODE sampler ignores the noise

def test_learned_variance_endpoints():
    d = Diffusion(schedule='cosine')
    ts = space_timesteps(1000, 8, spacing='linspace')
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    run = lambda model, var: sample_ddpm(Denoiser(model, d), x, ts, disable=True, variance=var,
                                         generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(run(FnModel(learn_sigma=True, var_value=-1.), 'learned'), run(FnModel(), 'small'))
    torch.testing.assert_close(run(FnModel(learn_sigma=True, var_value=1.), 'learned'), run(FnModel(), 'large'))
    with pytest.raises(ConfigError, match='learned-sigma'): run(FnModel(), 'learned')
    with pytest.raises(ConfigError, match='variance'): run(FnModel(), 'tiny')

def test_callback_and_timestep_validation():
    d = Diffusion()
    den = Denoiser(FnModel(), d)
    ts = space_timesteps(1000, 5)
    for name in SAMPLERS:
        seen = []
        SAMPLERS[name](den, torch.randn(1, 2, 4, 4), ts, disable=True, callback=seen.append)
        assert [s['i'] for s in seen] == list(range(5)) and [s['t'] for s in seen] == ts
        assert all(s['x0'].shape == (1, 2, 4, 4) for s in seen)
        for bad in [[], [10, 10], [0, 5], [1000, 5], [5, -1]]:
            with pytest.raises(ConfigError, match='timesteps'):
                SAMPLERS[name](den, torch.randn(1, 2, 4, 4), bad, disable=True)


# ---------------------------------------------------------------- generate
def test_generate_shapes_labels_and_modes():
    spy = Spy(FnModel(C=2, size=4, num_classes=3))
    spy.in_channels, spy.input_size = 2, 4
    spy.train()
    out = generate(spy, Diffusion(), 7, sampler='ddpm', steps=3, batch_size=3, progress=False,
                   generator=torch.Generator().manual_seed(0))
    assert out.shape == (7, 2, 4, 4) and out.dtype == torch.float32 and out.device.type == 'cpu'
    assert out.abs().max() <= 1
    assert spy.training                                          # mode restored
    labels = torch.cat([y for _, y in spy.calls[::3]])          # first step of each batch
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0]              # balanced arange(n) % num_classes
    spy.calls.clear()
    generate(spy, Diffusion(), 2, steps=2, y=1, cfg_scale=2.0, progress=False)
    assert spy.calls[0][0] == 4 and spy.calls[0][1].tolist() == [1, 1, 3, 3]

def test_generate_is_seeded_and_validates():
    m = FnModel(C=1, size=4, num_classes=0)
    for sampler in SAMPLERS:
        a = generate(m, Diffusion(), 3, sampler=sampler, steps=4, eta=1.0, progress=False,
                     generator=torch.Generator().manual_seed(0))
        b = generate(m, Diffusion(), 3, sampler=sampler, steps=4, eta=1.0, progress=False,
                     generator=torch.Generator().manual_seed(0))
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match='unconditional'): generate(m, Diffusion(), 2, y=0, progress=False)
    with pytest.raises(ConfigError, match='unknown sampler'): generate(m, Diffusion(), 2, sampler='heun')
    with pytest.raises(ConfigError, match='sampling steps'): generate(m, Diffusion(), 2, steps=0)
    mc = FnModel(C=1, size=4, num_classes=3)
    with pytest.raises(ConfigError, match='shape'): generate(mc, Diffusion(), 3, y=torch.tensor([0, 1]), progress=False)
