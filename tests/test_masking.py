"Tests for sadm_lab.masking: exact counts against closed-form (exact-fraction) references, geometry, RNG, coverage, model/loss."
import math
from fractions import Fraction

import pytest
import torch

from sadm_lab.core import ConfigError
from sadm_lab.masking import (STRATEGIES, token_view, Masker, make_mask, visible_count, mask_to_keep_idx, keep_idx_to_mask,
                              token_grid, mask_ratio_schedule, mask_to_image, overlay_mask)

GRIDS = [(4, 4), (8, 8), (16, 16), (8, 12), (6, 4)]
RATIOS = ['0', '0.1', '0.25', '0.29', '0.5', '0.75', '0.9', '0.95']


# ---------------------------------------------------------------- independent references (exact decimal arithmetic)
def ref_masked(strategy, grid, ratio, block_size=4, crop_size=None):
    "Masked-token count from the documented rules, with the ratio as an exact decimal fraction."
    h, w = grid
    n, r = h * w, Fraction(ratio)
    if r == 0: return 0
    if strategy == 'patch': return math.floor(r * n)
    if strategy == 'block': return block_size ** 2 * math.floor(r * n / block_size ** 2)
    c = crop_size if crop_size is not None else max(1, min(h, w, round(math.sqrt(float((1 - r) * n)))))
    return n - c * c

def chi2(counts, expected):
    return float(((counts - expected) ** 2 / expected).sum())


# ---------------------------------------------------------------- counts
@pytest.mark.parametrize('grid', GRIDS)
@pytest.mark.parametrize('strategy', STRATEGIES)
def test_exact_counts_over_seeds(strategy, grid):
    for ratio in RATIOS:
        for b in ([1, 2, 4] if strategy == 'block' else [4]):
            if strategy == 'block' and (grid[0] % b or grid[1] % b): continue
            mk = Masker(strategy, grid, ratio=float(ratio), block_size=b)
            want = ref_masked(strategy, grid, ratio, block_size=b)
            assert (mk.num_masked, mk.num_visible) == (want, grid[0] * grid[1] - want), (strategy, grid, ratio, b)
            assert visible_count(strategy, grid, ratio=float(ratio), block_size=b) == mk.num_visible
            for seed in range(10):
                m = mk(7, generator=torch.Generator().manual_seed(seed))
                assert m.dtype == torch.bool and m.shape == (7, grid[0] * grid[1])
                assert m.sum(1).tolist() == [want] * 7            # every image in the batch masks exactly `want`


def test_official_settings():
    # MaskDM's released headline setting (4x4 blocks at 90%, 64x64 images, patch 4) and its crop configs (c = 15/11/5)
    assert visible_count('block', 16, ratio=0.9, block_size=4) == 256 - 14 * 16
    assert [visible_count('crop', 16, ratio=r) for r in (0.1, 0.5, 0.9)] == [225, 121, 25]
    assert visible_count('crop', 16, ratio=0.5, crop_size=11) == 121
    assert visible_count('patch', 16, ratio=0.9) == 26
    assert token_grid(64, 4) == (16, 16)
    assert Masker('block', 16, ratio=0.9, block_size=4).ratio == 224 / 256


def test_ratio_zero_masks_nothing():
    for s in STRATEGIES:
        for kw in ({}, {'crop_size': 3}):
            mk = Masker(s, (6, 8), ratio=0.0, block_size=2, **kw)
            m, keep = mk.sample(3, generator=torch.Generator().manual_seed(0))
            assert not m.any()
            assert torch.equal(keep, torch.arange(48).expand(3, -1))
    # ratio None is 0, except that a crop with a crop_size needs no ratio
    assert Masker('patch', 4).num_masked == 0
    assert Masker('crop', 4, crop_size=2).num_visible == 4


# ---------------------------------------------------------------- geometry
@pytest.mark.parametrize('b', [1, 2, 4, 8])
def test_block_masks_are_unions_of_aligned_blocks(b):
    h, w = 16, 8
    if w % b: w = b
    m = make_mask('block', 20, (h, w), ratio=0.6, block_size=b, generator=torch.Generator().manual_seed(b))
    cells = m.view(20, h // b, b, w // b, b)
    # inside each aligned block every token has the same value
    assert torch.equal(cells.all(dim=(2, 4)), cells.any(dim=(2, 4)))
    assert (cells.all(dim=(2, 4)).flatten(1).sum(1) == math.floor(0.6 * h * w / b ** 2)).all()


@pytest.mark.parametrize('grid,c', [((8, 8), 3), ((6, 10), 4), ((5, 5), 5), ((7, 3), 1)])
def test_crop_visible_region_is_a_contiguous_square(grid, c):
    h, w = grid
    m = make_mask('crop', 30, grid, crop_size=c, generator=torch.Generator().manual_seed(1)).view(30, h, w)
    for v in ~m:
        rows, cols = v.nonzero().T
        r0, c0 = int(rows.min()), int(cols.min())
        ref = torch.zeros(h, w, dtype=torch.bool)
        ref[r0:r0 + c, c0:c0 + c] = True
        assert torch.equal(v, ref)


# ---------------------------------------------------------------- RNG
@pytest.mark.parametrize('strategy', STRATEGIES)
def test_determinism_and_seed_dependence(strategy):
    kw = dict(ratio=0.5, block_size=2)
    a = make_mask(strategy, 8, (8, 8), generator=torch.Generator().manual_seed(3), **kw)
    b = make_mask(strategy, 8, (8, 8), generator=torch.Generator().manual_seed(3), **kw)
    c = make_mask(strategy, 8, (8, 8), generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # rows of one batch differ from one another; the global RNG is neither used nor advanced
    assert len({tuple(r.tolist()) for r in a}) > 1
    state = torch.get_rng_state()
    make_mask(strategy, 8, (8, 8), generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize('strategy,kw', [('patch', dict(ratio=0.5)), ('block', dict(ratio=0.5, block_size=2)),
                                         ('patch', dict(ratio=0.9)), ('block', dict(ratio=0.3, block_size=2))])
def test_uniform_coverage(strategy, kw):
    # each unit (token for patch, b x b block for block) is masked with probability q = num_masked/N; the binomial-
    # normalised chi-square over units is ~ chi2(K-1) (a little less: the per-row total is fixed)
    D, grid = 4000, (6, 8)
    mk = Masker(strategy, grid, **kw)
    b = kw.get('block_size', 1)
    m = mk(D, generator=torch.Generator().manual_seed(0)).view(D, 6 // b, b, 8 // b, b)[:, :, 0, :, 0]
    counts, q = m.flatten(1).sum(0).double(), mk.num_masked / mk.num_tokens
    stat = float(((counts - D * q) ** 2).sum() / (D * q * (1 - q)))
    dof = counts.numel() - 1
    assert stat < dof + 5 * math.sqrt(2 * dof)
    # and the same test rejects a sampler biased towards the first row of units
    biased = counts.clone(); biased[:8 // b] *= 1.1
    assert float(((biased - D * q) ** 2).sum() / (D * q * (1 - q))) > dof + 5 * math.sqrt(2 * dof)


def test_crop_corner_is_uniform_and_coverage_test_has_power():
    D, (h, w), c = 4000, (6, 8), 3
    m = make_mask('crop', D, (h, w), crop_size=c, generator=torch.Generator().manual_seed(0)).view(D, h, w)
    vis = ~m
    # top-left corner of the window: uniform over the (h-c+1)(w-c+1) positions
    first = vis.flatten(1).float().argmax(1)
    corners = torch.bincount((first // w) * (w - c + 1) + first % w, minlength=(h - c + 1) * (w - c + 1)).double()
    npos = (h - c + 1) * (w - c + 1)
    assert chi2(corners, D / npos) < npos - 1 + 5 * math.sqrt(2 * (npos - 1))
    # crop visibility is NOT uniform over tokens (central tokens are seen more): the chi-square test above detects it
    counts = vis.flatten(1).sum(0).double()
    assert chi2(counts, D * c * c / (h * w)) > 10 * (h * w)


# ---------------------------------------------------------------- mask <-> keep_idx
@pytest.mark.parametrize('strategy', STRATEGIES)
def test_mask_keep_idx_round_trip(strategy):
    mk = Masker(strategy, (8, 12), ratio=0.7, block_size=2)
    m, keep = mk.sample(16, generator=torch.Generator().manual_seed(5))
    assert keep.dtype == torch.long and keep.shape == (16, mk.num_visible)
    assert (keep[:, 1:] > keep[:, :-1]).all()                     # strictly ascending per row
    assert torch.equal(keep, mask_to_keep_idx(m))
    assert torch.equal(keep_idx_to_mask(keep, 96), m)
    # reference: the visible indices listed one row at a time
    for row, k in zip(m, keep): assert k.tolist() == [i for i in range(96) if not row[i]]
    assert torch.equal(mk.keep_idx(16, generator=torch.Generator().manual_seed(5)), keep)


def test_conversion_errors():
    with pytest.raises(ConfigError, match='same number'): mask_to_keep_idx(torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ConfigError, match='every token'): mask_to_keep_idx(torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ConfigError, match='bool'): mask_to_keep_idx(torch.zeros(2, 3))
    with pytest.raises(ConfigError, match='outside'): keep_idx_to_mask(torch.tensor([[0, 4]]), 4)
    with pytest.raises(ConfigError, match='repeats'): keep_idx_to_mask(torch.tensor([[2, 2]]), 4)


@pytest.mark.parametrize('kw,msg', [
    (dict(strategy='random'), 'unknown mask strategy'),
    (dict(ratio=1.0), r'\[0, 1\)'), (dict(ratio=-0.5), r'\[0, 1\)'), (dict(ratio='half'), 'number'),
    (dict(strategy='block', ratio=0.5, block_size=3), 'does not divide'),
    (dict(strategy='block', ratio=0.5, block_size=0), 'positive int'),
    (dict(strategy='crop', ratio=0.5, crop_size=9), 'larger than'),
    (dict(strategy='crop', crop_size=9, ratio=0.0), 'larger than'),          # options are checked at ratio 0 too
    (dict(grid=(8, 0)), 'grid'),
    (dict(ratio=1 - 1e-12), 'no visible token'),
])
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg): Masker(**{'grid': 8, **kw})


def test_ratio_schedule():
    for i in range(0, 11):
        s = i / 10
        assert mask_ratio_schedule(i, start=0.9, end=0.1, steps=10) == pytest.approx(0.9 - 0.8 * s, abs=1e-12)
        assert mask_ratio_schedule(i, start=0.9, end=0.1, steps=10, kind='cosine') == \
            pytest.approx(0.1 + 0.8 * (1 + math.cos(math.pi * s)) / 2, abs=1e-12)
    assert mask_ratio_schedule(50, start=0.9, end=0.0, steps=10) == 0.0
    assert mask_ratio_schedule(-3, start=0.9, end=0.0, steps=10) == 0.9
    assert mask_ratio_schedule(0, start=0.9, end=0.3, steps=0) == 0.3
    with pytest.raises(ConfigError): mask_ratio_schedule(0, start=0.5, end=0.5, steps=3, kind='step')
    with pytest.raises(ConfigError): mask_ratio_schedule(0, start=1.5, end=0.5, steps=3)


# ---------------------------------------------------------------- pictures
def test_mask_to_image_and_overlay():
    g = torch.Generator().manual_seed(0)
    m = make_mask('patch', 3, (2, 3), ratio=0.5, generator=g)
    pix = mask_to_image(m, (8, 12), 4)
    assert pix.shape == (3, 1, 8, 12) and pix.dtype == torch.bool
    for b in range(3):                                         # reference: pixel (y, x) belongs to token (y//4)*3 + x//4
        for y in range(8):
            for x in range(12): assert bool(pix[b, 0, y, x]) == bool(m[b, (y // 4) * 3 + x // 4])
    imgs = torch.rand(3, 1, 8, 12, generator=g) * 2 - 1
    out = overlay_mask(imgs, m, 4, color=(1.0, -1.0, -1.0), alpha=0.5)
    assert out.shape == (3, 3, 8, 12) and out.min() >= -1 and out.max() <= 1
    grey = imgs.expand(-1, 3, -1, -1)
    tinted = 0.5 * grey + 0.5 * torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1)
    assert torch.allclose(out, torch.where(pix, tinted, grey))
    from sadm_lab.viz import make_grid
    assert make_grid(out, nrow=3, scale=1).shape == (8 + 2, 3 * 13 + 1, 3)
    with pytest.raises(ConfigError): overlay_mask(torch.zeros(1, 4, 8, 12), m[:1], 4)


# ---------------------------------------------------------------- with a model and the diffusion loss
@pytest.fixture(scope='module')
def tiny():
    from sadm_lab.models import DiT_models
    from sadm_lab.diffusion import Diffusion
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DiT_models['DiT-T/2'](input_size=8, in_channels=2, num_classes=0, hidden_size=64, depth=2, num_heads=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # adaLN-Zero starts with a zero output; perturb every weight so the output depends on x
        for p in model.parameters(): p.add_(0.05 * torch.randn(p.shape, generator=g))
    x0 = torch.rand(4, 2, 8, 8, generator=g) * 2 - 1
    kw = dict(t=torch.tensor([3, 250, 600, 999]), noise=torch.randn(x0.shape, generator=g))
    return model, Diffusion(), x0, kw


def loss_and_grad(model, diff, x, kw, keep_idx=None):
    with torch.enable_grad():
        model.zero_grad()
        view = None if keep_idx is None else token_view(model, keep_idx)
        loss = diff.training_losses(model, x, view=view, **kw)['loss']
        loss.mean().backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize('strategy', STRATEGIES)
def test_ratio_zero_gives_the_unmasked_loss(tiny, strategy):
    model, diff, x0, kw = tiny
    keep = Masker(strategy, token_grid(8, 2), ratio=0.0, crop_size=2).keep_idx(4)
    l0, g0 = loss_and_grad(model, diff, x0, kw, keep)
    l1, g1 = loss_and_grad(model, diff, x0, kw)
    assert torch.equal(l0, l1) and torch.equal(g0, g1)


@pytest.mark.parametrize('strategy,kw_mask', [('patch', dict(ratio=0.75)), ('block', dict(ratio=0.5, block_size=2)),
                                              ('crop', dict(crop_size=2))])
def test_masked_pixels_do_not_matter(tiny, strategy, kw_mask):
    model, diff, x0, kw = tiny
    mk = Masker(strategy, token_grid(8, 2), **kw_mask)
    m, keep = mk.sample(4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(diff.q_sample(x0, kw['t'], kw['noise']), kw['t'], keep_idx=keep)
    assert out.shape == (4, mk.num_visible, 2 * 2 * model.out_channels)
    pix = mask_to_image(m, 8, 2)
    l0, g0 = loss_and_grad(model, diff, x0, kw, keep)
    junk = torch.rand(x0.shape, generator=torch.Generator().manual_seed(9)) * 2 - 1
    l1, g1 = loss_and_grad(model, diff, torch.where(pix, junk, x0), kw, keep)     # only masked pixels changed
    assert torch.allclose(l1, l0, rtol=1e-6, atol=1e-7) and torch.allclose(g1, g0, rtol=1e-5, atol=1e-7)
    # positive control: changing visible pixels changes the masked loss and its gradient
    l2, g2 = loss_and_grad(model, diff, torch.where(pix, x0, junk), kw, keep)
    assert (l2 - l0).abs().max() > 1e-3 and (g2 - g0).abs().max() > 1e-4
    # the masked loss is the visible-patch MSE: recompute it from the model output by hand (eps-prediction)
    tgt = model.patchify(kw['noise']).gather(1, keep[..., None].expand(-1, -1, 2 * 2 * 2))
    pred = out.unflatten(-1, (4, -1))[..., :2].flatten(-2)          # learned sigma: first C channels of each pixel
    assert torch.allclose(l0, (pred - tgt).pow(2).flatten(1).mean(1), rtol=1e-5, atol=1e-7)
