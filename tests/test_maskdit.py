"MaskDiT: shapes, adaLN-Zero, the all-token output with keep_idx, and its loss: masked DSM plus the MAE objective."
import pytest
import torch

from sadm_lab.core import ConfigError
from sadm_lab.diffusion import Diffusion
from sadm_lab.masking import token_view
from sadm_lab.models import MaskDiT, MaskDiT_models, MODELS, build_model, family_of
from sadm_lab.objectives import DSM, MAETerm, MicroBatch, Objective, Stage, mae_loss, objective_step
from sadm_lab.models.layers import flops_per_forward

torch.set_num_threads(min(2, torch.get_num_threads()))

N = 16   # 8x8 images, patch 2


def tiny(**kw):
    return MaskDiT(**{**dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4,
                             num_classes=10, learn_sigma=True, decoder_depth=2, decoder_hidden_size=16,
                             decoder_num_heads=2), **kw})

@torch.no_grad()
def randomize_(model, seed=0, std=0.1):
    "Every trainable tensor ~ N(0, std^2) (the zero-initialised adaLN and heads included), so outputs are non-trivial."
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad: p.copy_(torch.randn(p.shape, generator=g) * std)
    return model

def keep_of(B, n_keep, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, N, generator=g).argsort(1)[:, :n_keep].sort(1).values

def batch(seed=0, B=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, 3, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (B,), generator=g),
            torch.randint(0, 1000, (B,), generator=g), torch.randn(B, 3, 8, 8, generator=g))


def test_shapes_attributes_and_zero_output_at_init():
    torch.manual_seed(0)
    m = tiny()
    x, y, t, _ = batch()
    assert (m.in_channels, m.out_channels, m.input_size, m.patch_size, m.num_patches, m.num_classes, m.learn_sigma,
            m.null_class) == (3, 6, 8, 2, N, 10, True, 10)
    out = m(x, t, y)
    assert out.shape == (3, 6, 8, 8) and out.abs().max() == 0           # adaLN-Zero / zeroed head
    tok = m(x, t, y, keep_idx=keep_of(3, 5))
    assert tok.shape == (3, N, 2 * 2 * 6) and tok.abs().max() == 0      # ALL tokens, not the 5 kept ones
    mu = tiny(num_classes=0, learn_sigma=False, in_channels=1)
    assert mu.null_class is None and not any(k.startswith('y_embedder') for k in mu.state_dict())
    assert mu(torch.randn(2, 1, 8, 8), t[:2]).shape == (2, 1, 8, 8)
    assert mu(torch.randn(2, 1, 8, 8), t[:2], keep_idx=keep_of(2, 4)).shape == (2, N, 4)


def test_keeping_every_token_is_the_unmasked_forward():
    m = randomize_(tiny()).eval()
    x, y, t, _ = batch()
    with torch.no_grad():
        full = m(x, t, y, keep_idx=torch.arange(N).expand(3, -1))
        img = m(x, t, y)
    torch.testing.assert_close(full, m.patchify(img), rtol=1e-5, atol=1e-6)


def test_masked_tokens_come_from_the_mask_token_not_the_hidden_pixels():
    m = randomize_(tiny()).eval()
    x, y, t, _ = batch()
    keep = keep_of(3, 6)
    vis = torch.zeros(3, N, dtype=torch.bool).scatter(1, keep, True)
    x2 = m.unpatchify(torch.where(vis[..., None], m.patchify(x), torch.randn(3, N, 12)))
    with torch.no_grad():
        a, b = m(x, t, y, keep_idx=keep), m(x2, t, y, keep_idx=keep)
        assert torch.equal(a, b)
        with torch.no_grad(): m.mask_token.add_(1.0)
        c = m(x, t, y, keep_idx=keep)
    assert not torch.allclose(a, c)          # the mask token feeds every output (decoder attention)


def test_registry_presets_and_cost():
    assert family_of('MaskDiT-T/2') == 'maskdit' and MODELS['maskdit'].cls is MaskDiT
    m = build_model('MaskDiT-T/2', input_size=8, in_channels=1, num_classes=10, depth=1, decoder_depth=1)
    assert type(m) is MaskDiT and (m.hidden_size, m.depth, m.decoder_hidden_size, m.decoder_depth) == (192, 1, 128, 1)
    with pytest.raises(ConfigError, match='unknown MaskDiT option'):
        build_model('MaskDiT-T/2', decoder_width=3)
    with torch.device('meta'):
        xl = MaskDiT_models['MaskDiT-XL/2']()
    assert (xl.hidden_size, xl.depth, xl.num_heads, xl.decoder_hidden_size, xl.decoder_depth, xl.decoder_num_heads) == \
        (1152, 28, 16, 512, 8, 16)
    # the encoder's cost follows the visible tokens, the decoder's does not
    full, half = flops_per_forward(xl), flops_per_forward(xl, num_tokens=128)
    dec = xl.decoder_depth * (4 * 256 * 512 ** 2 + 2 * 256 * 512 * 2048 + 2 * 256 ** 2 * 512)
    assert dec < full - half and half < 0.6 * full


def test_strict_state_dict_round_trip():
    a = randomize_(tiny(), seed=1)
    b = tiny()
    b.load_state_dict(a.state_dict(), strict=True)
    x, y, t, _ = batch()
    keep = keep_of(3, 4)
    with torch.no_grad():
        assert torch.equal(a(x, t, y, keep_idx=keep), b(x, t, y, keep_idx=keep))
        assert torch.equal(a(x, t, y), b(x, t, y))
    assert {'mask_token', 'decoder_pos_embed', 'decoder_layer.linear.weight', 'decoder_blocks.1.adaLN_modulation.1.weight'} \
        <= set(a.state_dict())


def _masked_dsm_by_hand(m, d, x0, t, y, noise, keep):
    "float64 reference of the masked DSM loss: eps-MSE over the visible patches, first C channels of the output."
    ab = d.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()
    out = m(xt.float(), t, y, keep_idx=keep).double()                    # (B, N, p*p*2C)
    out = out.unflatten(-1, (4, 6))[..., :3].flatten(-2)                  # first C channels per pixel
    rows = torch.arange(len(keep))[:, None]
    pred, target = out[rows, keep], m.patchify(noise.double())[rows, keep]
    return (pred - target).pow(2).mean((1, 2)), xt


def _mae_by_hand(m, xt, pred_all, keep):
    "float64 reference: masked tokens vs the noisy input's masked patches normalised per patch (unbiased var, +1e-6)."
    B = len(keep)
    drop = torch.stack([torch.tensor([i for i in range(N) if i not in k]) for k in keep.tolist()])
    rows = torch.arange(B)[:, None]
    tgt = m.patchify(xt.double())[rows, drop]
    tgt = (tgt - tgt.mean(-1, keepdim=True)) / (tgt.var(-1, keepdim=True) + 1e-6).sqrt()
    pred = pred_all.double().unflatten(-1, (4, 6))[..., :3].flatten(-2)[rows, drop]
    return (pred - tgt).pow(2).mean((1, 2))


def masked(m, d, x0, keep, **kw):
    "Masked DSM of `training_losses` through the view of `keep`, with MaskDiT's MAE per sample from the same pass."
    v = token_view(m, keep)
    out = d.training_losses(m, x0, view=v, **kw)
    out['mae'] = mae_loss(v.hidden(out['output'], 3), v.dropped(out['x_t']))
    return out


class FixedView(Objective):
    "Hides the same tokens in every micro-batch (a stand-in for MaskedDSM's random draw)."
    name, masks = 'fixed', True
    def __init__(self, view): self.fixed = view
    def view(self, mb): return self.fixed


STAGE = Stage('masked', 0, ('fixed', 'dsm', 'mae'), end=1, lr=1.0)


@pytest.mark.parametrize('mae_weight', [0.0, 0.1])
def test_loss_is_masked_dsm_plus_weighted_mae(mae_weight):
    m = randomize_(tiny()).eval()
    d = Diffusion(schedule='linear')
    x0, y, t, noise = batch()
    keep = keep_of(3, 6)
    with torch.no_grad():
        out = masked(m, d, x0, keep, y=y, t=t, noise=noise)
        dsm, xt = _masked_dsm_by_hand(m, d, x0, t, y, noise, keep)
        mae = _mae_by_hand(m, xt, m(xt.float(), t, y, keep_idx=keep), keep)
    torch.testing.assert_close(out['mse'].double(), dsm, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out['mae'].double(), mae, rtol=1e-5, atol=1e-7)
    assert out['pred_x0'].shape == (3, 6, 12)                             # per visible token, as for DiT
    # the objectives of a masked MaskDiT stage: DSM on the visible tokens + weight x MAE, from one forward pass
    objs = [FixedView(token_view(m, keep)), DSM()] + ([MAETerm(m, mae_weight)] if mae_weight else [])
    with torch.no_grad():
        loss, logs, o = objective_step(m, d, objs, MicroBatch(x0, y, torch.Generator().manual_seed(0), 0, STAGE))
        mae = _mae_by_hand(m, o['x_t'], m(o['x_t'], o['t'], y, keep_idx=keep), keep).mean()
    if mae_weight == 0:
        assert 'mae' not in logs and torch.equal(loss, o['loss'].float().mean())   # exactly the DSM-only loss
    else:
        torch.testing.assert_close(logs['mae'].double(), mae, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(loss, logs['loss'] + mae_weight * logs['mae'])
    # every token kept: the ordinary unmasked call, so no MAE term
    assert token_view(m, torch.arange(N).expand(3, -1)) is None


def test_changing_what_is_under_the_mask_moves_only_the_mae_term():
    m = randomize_(tiny()).eval()
    d = Diffusion(schedule='cosine')
    x0, y, t, noise = batch()
    keep = keep_of(3, 6)
    vis = torch.zeros(3, N, dtype=torch.bool).scatter(1, keep, True)[..., None]
    kw = dict(y=y, t=t)
    with torch.no_grad():
        ref = masked(m, d, x0, keep, noise=noise, **kw)
        # new clean pixels under the mask: DSM identical (the encoder never sees them), MAE target = noisy input changes
        x_new = m.unpatchify(torch.where(vis, m.patchify(x0), torch.rand(3, N, 12) * 2 - 1))
        new = masked(m, d, x_new, keep, noise=noise, **kw)
        assert torch.equal(new['mse'], ref['mse'])
        assert (new['mae'] - ref['mae']).abs().min() > 1e-4
        dsm, xt = _masked_dsm_by_hand(m, d, x_new, t, y, noise, keep)
        torch.testing.assert_close(new['mae'].double(), _mae_by_hand(m, xt, m(xt.float(), t, y, keep_idx=keep), keep),
                                   rtol=1e-5, atol=1e-7)
        # the target is the NOISY input: new noise under the mask moves the MAE term too, but not the DSM term
        n_new = m.unpatchify(torch.where(vis, m.patchify(noise), torch.randn(3, N, 12)))
        nn_ = masked(m, d, x0, keep, noise=n_new, **kw)
        assert torch.equal(nn_['mse'], ref['mse']) and (nn_['mae'] - ref['mae']).abs().min() > 1e-4
        # per-patch normalisation: shifting each masked patch of x0 by a constant leaves everything unchanged
        shift = torch.randn(3, N, 1)
        x_shift = m.unpatchify(torch.where(vis, m.patchify(x0), m.patchify(x0) + shift))
        sh = masked(m, d, x_shift, keep, noise=noise, **kw)
        assert torch.equal(sh['mse'], ref['mse'])
        torch.testing.assert_close(sh['mae'], ref['mae'], rtol=1e-4, atol=1e-5)
        # and pixels of VISIBLE patches do move the DSM term
        x_vis = m.unpatchify(torch.where(vis, m.patchify(x0) + 0.5, m.patchify(x0)))
        assert not torch.allclose(masked(m, d, x_vis, keep, noise=noise, **kw)['mse'], ref['mse'])


def test_gradients_reach_the_mask_token():
    m = randomize_(tiny())
    d = Diffusion()
    x0, y, t, noise = batch()
    out = masked(m, d, x0, keep_of(3, 6), y=y, t=t, noise=noise)
    out['mae'].mean().backward()
    assert m.mask_token.grad is not None and m.mask_token.grad.abs().sum() > 0
    assert m.blocks[0].attn.qkv.weight.grad.abs().sum() > 0              # through the decoder into the encoder
    assert m.decoder_pos_embed.grad is None and m.pos_embed.grad is None  # fixed sin-cos positions stay frozen


def test_the_mae_term_needs_a_network_that_returns_every_token():
    from sadm_lab.models import DiT
    dit = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=4, num_classes=10)
    assert DiT.returns_all_tokens is False and MaskDiT.returns_all_tokens is True     # explicit, not a shape test
    with pytest.raises(ConfigError, match='returns every token'): MAETerm(dit, 0.1)
    with pytest.raises(ConfigError, match='must be >= 0'): MAETerm(tiny(), -1.0)
    with pytest.raises(ConfigError, match='returns_all_tokens'):
        x0, y, t, noise = batch()
        v = token_view(dit, keep_of(3, 6))
        v.hidden(dit(x0, t, y, keep_idx=keep_of(3, 6)), 3)


def test_a_few_adamw_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    m = tiny(learn_sigma=False)
    d = Diffusion()
    x0, y, t, noise = batch(B=8)
    keep = keep_of(8, 8)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        out = masked(m, d, x0, keep, y=y, t=t, noise=noise)
        loss = (out['loss'] + 0.1 * out['mae']).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)) and losses[-1] < 0.8 * losses[0], losses


def test_trainer_smoke_with_maskdit(tmp_path):
    from sadm_lab.config import get_config
    from sadm_lab.train import Trainer, RunDir
    cfg = get_config('smoke', ['train.device=cpu', 'eval.enabled=false', 'train.sample_every=0', 'sample.grid_size=4',
                               'sample.steps=2', 'train.steps=2', 'train.log_every=1', 'train.ckpt_every=2',
                               'model.preset=MaskDiT-T/2', 'mask.strategy=patch', 'mask.ratio=0.5', 'mask.mae_weight=0.1'])
    tr = Trainer(cfg, tmp_path / 'r', progress=False).fit()
    assert tr.step == 2 and type(tr.unwrapped) is MaskDiT
    recs = [r for r in RunDir(tmp_path / 'r').read_metrics() if r['kind'] == 'train']
    assert len(recs) == 2 and all(torch.isfinite(torch.tensor([r['loss'] for r in recs])))
    assert all(r['mae'] > 0 and r['mask_ratio'] == 0.5 for r in recs)        # the MAE term is logged on its own
