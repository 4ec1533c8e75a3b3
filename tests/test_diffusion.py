"Tests for sadm_lab.diffusion against closed-form float64 formulas and diffusers' schedules."
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from sadm_lab.core import ConfigError
from sadm_lab.diffusion import (Diffusion, get_betas, linear_betas, cosine_betas, space_timesteps, respaced_betas,
                                drop_labels)
from sadm_lab.masking import token_view

pytestmark = pytest.mark.numerics       # (CI runs these again with the CPU dispatch at AVX2)

f64 = torch.float64


# ---------------------------------------------------------------- independent references (numpy, float64)
def ref_linear(T):
    return np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=np.float64)

def ref_cosine(T, s=0.008):
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])

def ref_abar(betas): return np.cumprod(1 - np.asarray(betas, dtype=np.float64))

def per_sample(t, ab):
    "alpha_t, sigma_t as (B,1,1,1) float64 tensors from a numpy abar."
    a = torch.tensor(np.sqrt(ab[t.numpy()]), dtype=f64).view(-1, 1, 1, 1)
    s = torch.tensor(np.sqrt(1 - ab[t.numpy()]), dtype=f64).view(-1, 1, 1, 1)
    return a, s


# ---------------------------------------------------------------- schedules
@pytest.mark.parametrize('T', [1000, 250, 4000])
def test_linear_schedule_closed_form(T):
    b = get_betas('linear', T)
    assert b.dtype == f64 and b.shape == (T,)
    np.testing.assert_allclose(b.numpy(), ref_linear(T), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(Diffusion(timesteps=T).alphas_cumprod.numpy(), ref_abar(ref_linear(T)), rtol=1e-10)

@pytest.mark.parametrize('T', [1000, 100])
def test_cosine_schedule_closed_form(T):
    b = cosine_betas(T)
    np.testing.assert_allclose(b.numpy(), ref_cosine(T), rtol=1e-10, atol=1e-14)
    # away from the clipped tail, abar_t equals f((t+1)/T)/f(0) exactly (eq. 17 of Nichol & Dhariwal)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    ab = Diffusion(schedule='cosine', timesteps=T).alphas_cumprod
    for t in [0, T // 4, T // 2, 3 * T // 4]:
        assert abs(ab[t].item() - f((t + 1) / T) / f(0)) < 1e-12

@pytest.mark.parametrize('schedule,dname', [('linear', 'linear'), ('cosine', 'squaredcos_cap_v2')])
def test_schedules_match_diffusers(schedule, dname):
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=dname, beta_start=1e-4, beta_end=0.02)
    d = Diffusion(schedule=schedule, timesteps=1000)
    # diffusers keeps float32 schedules: agreement up to float32 rounding accumulated in the cumprod
    np.testing.assert_allclose(d.betas.numpy(), ref.betas.double().numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ref.alphas_cumprod.double().numpy(), rtol=1e-5, atol=1e-8)

def test_schedule_errors():
    with pytest.raises(ConfigError, match='unknown noise schedule'): get_betas('sqrt')
    with pytest.raises(ConfigError, match='unknown noise schedule'): Diffusion(schedule='sqrt')
    for bad in [0, 1, -5, 2.5, True, '1000']:
        with pytest.raises(ConfigError, match='timesteps must be an integer'): Diffusion(timesteps=bad)
    with pytest.raises(ConfigError, match='>= 21'): linear_betas(20)
    assert linear_betas(21).max() < 1
    with pytest.raises(ConfigError, match='prediction'): Diffusion(prediction='eps2')
    with pytest.raises(ConfigError, match='loss_weighting'): Diffusion(loss_weighting='snr')
    with pytest.raises(ConfigError, match='min_snr_gamma'): Diffusion(min_snr_gamma=0)


# ---------------------------------------------------------------- respacing
@pytest.mark.parametrize('spacing', ['leading', 'trailing', 'linspace'])
@pytest.mark.parametrize('T,n', [(1000, 50), (1000, 7), (1000, 3), (1000, 1000), (100, 33), (4000, 250)])
def test_space_timesteps_match_diffusers_ddim(spacing, T, n):
    from diffusers import DDIMScheduler
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=0)
    ref.set_timesteps(n)
    ts = space_timesteps(T, n, spacing=spacing)
    assert len(ts) == n and ts == sorted(set(ts), reverse=True) and 0 <= ts[-1] and ts[0] < T
    assert ts == ref.timesteps.tolist()

def test_space_timesteps_defaults_and_errors():
    assert space_timesteps(1000, 10) == space_timesteps(1000, 10, spacing='trailing')
    assert space_timesteps(1000, 10)[0] == 999
    for bad in [0, 1001, -1, 2.0]:
        with pytest.raises(ConfigError, match='sampling steps'): space_timesteps(1000, bad)
    with pytest.raises(ConfigError, match='spacing'): space_timesteps(1000, 10, spacing='uniform')

def test_respaced_betas_improved_diffusion():
    ab = Diffusion(schedule='cosine').alphas_cumprod
    ts = space_timesteps(1000, 25, spacing='linspace')
    kept = sorted(ts)
    nb = respaced_betas(ab, ts)
    ref = [1 - ab[kept[0]].item()] + [1 - ab[k].item() / ab[j].item() for j, k in zip(kept, kept[1:])]
    np.testing.assert_allclose(nb.numpy(), ref, rtol=1e-12)
    # the new chain reproduces abar at the kept indices
    np.testing.assert_allclose(torch.cumprod(1 - nb, 0).numpy(), ab[kept].numpy(), rtol=1e-9)


# ---------------------------------------------------------------- forward process and conversions
@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_q_sample_snr_and_conversions(schedule):
    g = torch.Generator().manual_seed(0)
    d = Diffusion(schedule=schedule)
    ab = ref_abar(ref_linear(1000) if schedule == 'linear' else ref_cosine(1000))
    x0 = torch.randn(6, 3, 5, 5, generator=g, dtype=f64)
    eps = torch.randn(6, 3, 5, 5, generator=g, dtype=f64)
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    a, s = per_sample(t, ab)
    xt = d.q_sample(x0, t, eps)
    torch.testing.assert_close(xt, a * x0 + s * eps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d.snr(t), torch.tensor(ab[t.numpy()] / (1 - ab[t.numpy()]), dtype=f64), rtol=1e-9, atol=0)
    v = a * eps - s * x0
    torch.testing.assert_close(d.v_from(x0, eps, t), v, rtol=1e-12, atol=1e-12)
    # round trips from x_t (x0 from eps divides by alpha_t, tiny at t=999 for cosine: compare in a relative sense)
    torch.testing.assert_close(d.x0_from_eps(xt, t, eps), x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d.eps_from_x0(xt, t, x0), eps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d.x0_from_v(xt, t, v), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(d.eps_from_v(xt, t, v), eps, rtol=1e-10, atol=1e-10)
    for pred_name, pred in [('eps', eps), ('x0', x0), ('v', v)]:
        dp = Diffusion(schedule=schedule, prediction=pred_name)
        torch.testing.assert_close(dp.target(x0, eps, t), pred)
        px0, peps = dp.to_x0_eps(pred, xt, t)
        torch.testing.assert_close(px0, x0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(peps, eps, rtol=1e-6, atol=1e-6)

def test_float32_inputs_keep_dtype_and_precision():
    d = Diffusion()
    x0, eps = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    t = torch.tensor([0, 3, 300, 999])
    xt = d.q_sample(x0, t, eps)
    assert xt.dtype == torch.float32
    ref = d.q_sample(x0.double(), t, eps.double())
    torch.testing.assert_close(xt.double(), ref, rtol=1e-6, atol=1e-6)
    # an int timestep broadcasts over the batch
    torch.testing.assert_close(d.q_sample(x0, 5, eps), d.q_sample(x0, torch.full((4,), 5), eps))

def test_q_posterior_formula_and_respaced_jumps():
    g = torch.Generator().manual_seed(1)
    d = Diffusion(schedule='linear')
    ab = ref_abar(ref_linear(1000))
    x0, xt = torch.randn(4, 1, 3, 3, generator=g, dtype=f64), torch.randn(4, 1, 3, 3, generator=g, dtype=f64)
    t, tp = torch.tensor([999, 500, 20, 5]), torch.tensor([949, 250, -1, 4])
    abt = ab[t.numpy()]; abp = np.where(tp.numpy() < 0, 1.0, ab[np.maximum(tp.numpy(), 0)])
    beta = 1 - abt / abp
    c0 = torch.tensor(beta * np.sqrt(abp) / (1 - abt), dtype=f64).view(-1, 1, 1, 1)
    ct = torch.tensor(np.sqrt(1 - beta) * (1 - abp) / (1 - abt), dtype=f64).view(-1, 1, 1, 1)
    var = torch.tensor(beta * (1 - abp) / (1 - abt), dtype=f64).view(-1, 1, 1, 1)
    mean, v, logv = d.q_posterior(x0, xt, t, tp)
    torch.testing.assert_close(mean, c0 * x0 + ct * xt, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v, var, rtol=1e-10, atol=0)
    assert v[2].item() == 0 and torch.isfinite(logv).all()          # jump to clean data: deterministic
    torch.testing.assert_close(mean[2], x0[2], rtol=1e-10, atol=1e-12)
    # default t_prev = t - 1: the posterior of the full chain (Ho et al. eq. 7 with betas_t)
    b = ref_linear(1000)
    m1, v1, _ = d.q_posterior(x0, xt, torch.tensor([999, 1, 0, 400]))
    tt = np.array([999, 1, 0, 400]); abp1 = np.where(tt > 0, ab[np.maximum(tt - 1, 0)], 1.0)
    np.testing.assert_allclose(v1.flatten().numpy(), b[tt] * (1 - abp1) / (1 - ab[tt]), rtol=1e-9)


# ---------------------------------------------------------------- training losses
class TokenLinear(nn.Module):
    "Per-token linear model with the DESIGN token contract (features ordered (p_row, p_col, C))."
    def __init__(self, C=3, p=2, size=8, learn_sigma=False, num_classes=0):
        super().__init__()
        self.in_channels, self.patch_size, self.input_size, self.num_classes = C, p, size, num_classes
        self.out_channels, self.learn_sigma = C * (2 if learn_sigma else 1), learn_sigma
        self.num_patches = (size // p) ** 2
        self.lin = nn.Linear(p * p * C, p * p * self.out_channels)
    def patchify(self, x):
        B, C, H, W = x.shape; p = self.patch_size
        return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, p * p * C)
    def unpatchify(self, z):
        B, p, C, h = z.shape[0], self.patch_size, self.out_channels, self.input_size // self.patch_size
        return z.reshape(B, h, h, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * p, h * p)
    def forward(self, x, t, y=None, keep_idx=None):
        z = self.lin(self.patchify(x)) * (1 + t.to(x.dtype).view(-1, 1, 1) / 1000)
        if keep_idx is not None: return z.gather(1, keep_idx[..., None].expand(-1, -1, z.shape[-1]))
        return self.unpatchify(z)

def random_keep(B, N, n_keep, g):
    return torch.rand(B, N, generator=g).argsort(1)[:, :n_keep].sort(1).values

def pixel_mask(keep_idx, N, p, size):
    "(B,1,H,W) float mask of the pixels of kept patches (row-major token grid)."
    B, h = keep_idx.shape[0], size // p
    m = torch.zeros(B, N); m.scatter_(1, keep_idx, 1.)
    return m.view(B, 1, h, h).repeat_interleave(p, 2).repeat_interleave(p, 3)

def test_patchify_roundtrip_of_test_model():
    m = TokenLinear()
    x = torch.randn(2, 3, 8, 8)
    z = m.patchify(x)
    assert z.shape == (2, 16, 12)
    # token 5 = patch row 1, col 1; features ordered (p_row, p_col, C)
    torch.testing.assert_close(z[:, 5].view(2, 2, 2, 3), x[:, :, 2:4, 2:4].permute(0, 2, 3, 1))
    m.out_channels = 3
    torch.testing.assert_close(m.unpatchify(z), x)

@pytest.mark.parametrize('prediction', ['eps', 'x0', 'v'])
@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_training_losses_unmasked_matches_formula(prediction, schedule):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = TokenLinear().double()
    d = Diffusion(schedule=schedule, prediction=prediction)
    x0 = torch.rand(5, 3, 8, 8, generator=g, dtype=f64) * 2 - 1
    out = d.training_losses(m, x0, generator=g)
    for k in ['loss', 'mse', 'weight', 't']: assert out[k].shape == (5,), k
    assert out['pred_x0'].shape == x0.shape and out['pred_x0'].requires_grad
    t, noise = out['t'], out['noise']
    assert ((0 <= t) & (t < 1000)).all()
    ab = ref_abar(ref_linear(1000) if schedule == 'linear' else ref_cosine(1000))
    a, s = per_sample(t, ab)
    xt = a * x0 + s * noise
    torch.testing.assert_close(out['x_t'], xt)
    pred = m(xt, t)
    target = dict(eps=noise, x0=x0, v=a * noise - s * x0)[prediction]
    torch.testing.assert_close(out['mse'], ((pred - target) ** 2).mean((1, 2, 3)))
    torch.testing.assert_close(out['loss'], out['mse'])            # loss_weighting='none'
    pred_x0 = dict(eps=(xt - s * pred) / a, x0=pred, v=a * xt - s * pred)[prediction]
    torch.testing.assert_close(out['pred_x0'], pred_x0, rtol=1e-6, atol=1e-6)

@pytest.mark.parametrize('prediction', ['eps', 'x0', 'v'])
def test_min_snr_weight_equals_x0_space_formula(prediction):
    "Hang et al. 2023: whatever the parameterisation, the weighted loss is min(SNR, gamma) * ||x0 - x0_hat||^2."
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    m = TokenLinear().double()
    gamma = 5.0
    d = Diffusion(schedule='cosine', prediction=prediction, loss_weighting='min_snr', min_snr_gamma=gamma)
    x0 = torch.rand(8, 3, 8, 8, generator=g, dtype=f64) * 2 - 1
    t = torch.tensor([0, 5, 50, 200, 400, 600, 900, 999])
    out = d.training_losses(m, x0, t=t, generator=g)
    ab = ref_abar(ref_cosine(1000))[t.numpy()]
    snr = torch.tensor(ab / (1 - ab), dtype=f64)
    x0_mse = ((out['pred_x0'] - x0) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(out['loss'], torch.clamp(snr, max=gamma) * x0_mse, rtol=1e-6, atol=1e-12)
    expected_w = dict(eps=torch.clamp(snr, max=gamma) / snr, x0=torch.clamp(snr, max=gamma),
                      v=torch.clamp(snr, max=gamma) / (snr + 1))[prediction]
    torch.testing.assert_close(out['weight'], expected_w, rtol=1e-9, atol=0)

@pytest.mark.parametrize('learn_sigma', [False, True])
def test_masked_all_tokens_equals_unmasked_exactly(learn_sigma):
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    m = TokenLinear(learn_sigma=learn_sigma)
    d = Diffusion(prediction='v', loss_weighting='min_snr')
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    t, noise = d.sample_t(4, generator=g), torch.randn(x0.shape, generator=g)
    full = torch.arange(16).expand(4, 16)
    assert token_view(m, full) is None                  # every token kept: the ordinary call
    a = d.training_losses(m, x0, t=t, noise=noise, view=token_view(m, full))
    b = d.training_losses(m, x0, t=t, noise=noise)
    assert torch.equal(a['loss'], b['loss']) and torch.equal(a['mse'], b['mse'])
    assert torch.equal(a['pred_x0'], b['pred_x0'])

@pytest.mark.parametrize('prediction', ['eps', 'v'])
@pytest.mark.parametrize('learn_sigma', [False, True])
def test_masked_loss_is_mean_over_visible_pixels(prediction, learn_sigma):
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    m = TokenLinear(learn_sigma=learn_sigma).double()
    d = Diffusion(prediction=prediction)
    x0 = torch.rand(4, 3, 8, 8, generator=g, dtype=f64) * 2 - 1
    t, noise = d.sample_t(4, generator=g), torch.randn(x0.shape, generator=g, dtype=f64)
    keep = random_keep(4, 16, 5, g)
    out = d.training_losses(m, x0, t=t, noise=noise, view=token_view(m, keep))
    assert out['loss'].shape == (4,) and out['pred_x0'].shape == (4, 5, 12)
    # reference: full-image prediction (per-token model) and squared error averaged over pixels of kept patches
    xt = d.q_sample(x0, t, noise)
    pred = m(xt, t)[:, :3]
    target = noise if prediction == 'eps' else d.v_from(x0, noise, t)
    mask = pixel_mask(keep, 16, 2, 8)
    ref = (((pred - target) ** 2) * mask).sum((1, 2, 3)) / (mask.sum((1, 2, 3)) * 3)
    torch.testing.assert_close(out['mse'], ref, rtol=1e-10, atol=1e-12)
    # pred_x0 tokens are the kept patches of the full-image x0 estimate
    px0 = d.to_x0_eps(pred, xt, t)[0]
    ref_tok = m.patchify(px0).gather(1, keep[..., None].expand(-1, -1, 12))
    torch.testing.assert_close(out['pred_x0'], ref_tok, rtol=1e-8, atol=1e-10)

def test_masked_loss_ignores_masked_pixels():
    "Changing clean pixels and noise under masked patches changes neither the masked loss nor its gradient."
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    m = TokenLinear()
    d = Diffusion(prediction='eps', loss_weighting='min_snr')
    x0 = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    t, noise = d.sample_t(3, generator=g), torch.randn(x0.shape, generator=g)
    keep = random_keep(3, 16, 4, g)
    vis = pixel_mask(keep, 16, 2, 8).bool()
    x0b = torch.where(vis, x0, torch.rand(x0.shape, generator=g) * 2 - 1)
    noiseb = torch.where(vis, noise, torch.randn(x0.shape, generator=g))
    assert not torch.equal(x0, x0b)
    def loss_and_grad(x, n):
        m.zero_grad()
        loss = d.training_losses(m, x, t=t, noise=n, view=token_view(m, keep))['loss']
        loss.mean().backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]
    la, ga = loss_and_grad(x0, noise)
    lb, gb = loss_and_grad(x0b, noiseb)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-7)
    for a, b in zip(ga, gb): torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # ...while the unmasked loss does change
    lu = d.training_losses(m, x0, t=t, noise=noise)['loss']
    lub = d.training_losses(m, x0b, t=t, noise=noiseb)['loss']
    assert not torch.allclose(lu, lub)

def test_learned_sigma_uses_first_channels_only():
    g = torch.Generator().manual_seed(6)
    torch.manual_seed(0)
    m2 = TokenLinear(learn_sigma=True)
    m1 = TokenLinear(learn_sigma=False)
    with torch.no_grad():   # m1 = the first-C-channel half of m2's head (features ordered (p_row, p_col, C_out))
        w = m2.lin.weight.view(2, 2, 6, 12)[:, :, :3].reshape(12, 12)
        b = m2.lin.bias.view(2, 2, 6)[:, :, :3].reshape(12)
        m1.lin.weight.copy_(w); m1.lin.bias.copy_(b)
    d = Diffusion()
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    t, noise = d.sample_t(2, generator=g), torch.randn(x0.shape, generator=g)
    keep = random_keep(2, 16, 6, g)
    for k in [None, keep]:
        a = d.training_losses(m2, x0, t=t, noise=noise, view=None if k is None else token_view(m2, k))['loss']
        b = d.training_losses(m1, x0, t=t, noise=noise, view=None if k is None else token_view(m1, k))['loss']
        torch.testing.assert_close(a, b)

def test_a_network_that_returns_every_token_must_say_so():
    "MaskDiT-like output (all N tokens for a keep_idx call) without `returns_all_tokens` is an error, not a guess."
    class PatchOut(TokenLinear):
        def forward(self, x, t, y=None, keep_idx=None): return self.patchify(super().forward(x, t, y))
    g = torch.Generator().manual_seed(8)
    d, keep = Diffusion(), random_keep(2, 16, 4, g)
    x0 = torch.rand(2, 3, 8, 8, generator=g)
    with pytest.raises(ConfigError, match='returns_all_tokens = True'):
        d.training_losses(PatchOut(), x0, generator=g, view=token_view(PatchOut(), keep))
    PatchOut.returns_all_tokens = True
    out = d.training_losses(PatchOut(), x0, generator=g, view=token_view(PatchOut(), keep))
    assert out['pred_x0'].shape == (2, 4, 12)

def test_bad_model_output_channels():
    class Bad(nn.Module):
        def forward(self, x, t, y=None): return torch.zeros(x.shape[0], 5, *x.shape[2:])
    with pytest.raises(ConfigError, match='channels'):
        Diffusion().training_losses(Bad(), torch.zeros(2, 3, 4, 4))

def test_training_losses_deterministic_with_generator():
    torch.manual_seed(0)
    m = TokenLinear()
    d = Diffusion()
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    a = d.training_losses(m, x0, generator=torch.Generator().manual_seed(7))
    b = d.training_losses(m, x0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a['t'], b['t']) and torch.equal(a['noise'], b['noise']) and torch.equal(a['loss'], b['loss'])


# ---------------------------------------------------------------- sampling t and label dropping
def test_sample_t_uniform_and_seeded():
    d = Diffusion(timesteps=50)
    t = d.sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 49
    counts = torch.bincount(t, minlength=50).double()
    assert (counts / 400 - 1).abs().max() < 0.25
    assert torch.equal(d.sample_t(8, generator=torch.Generator().manual_seed(3)),
                       d.sample_t(8, generator=torch.Generator().manual_seed(3)))

def test_drop_labels():
    y = torch.arange(10).repeat(1000)
    out = drop_labels(y, 0.1, 10, generator=torch.Generator().manual_seed(0))
    dropped = out == 10
    assert abs(dropped.float().mean().item() - 0.1) < 0.015
    assert torch.equal(out[~dropped], y[~dropped])
    assert torch.equal(out, Diffusion.drop_labels(y, 0.1, 10, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(drop_labels(y, 0.0, 10), y)
    assert (drop_labels(y, 1.0, 10) == 10).all()
    with pytest.raises(ConfigError, match='probability'): drop_labels(y, 1.5, 10)
