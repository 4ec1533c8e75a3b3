"""Property-based tests (hypothesis): config overrides, mask parameters and image/patch shapes either give something
that works or a `ConfigError` that names the culprit, never another exception."""
import math
from types import SimpleNamespace

import pytest
import torch

hypothesis = pytest.importorskip('hypothesis')
from hypothesis import given, settings, strategies as st   # noqa: E402

from sadm_lab.config import RunConfig, get_config, validate   # noqa: E402
from sadm_lab.core import ConfigError   # noqa: E402
from sadm_lab.masking import Masker   # noqa: E402

FAST = settings(max_examples=50, deadline=None, derandomize=True)   # the same examples every run: CI stays stable

KEYS = ['train.steps', 'train.lr', 'train.batch_size', 'train.grad_accum', 'train.ema_decay', 'train.warmup_steps',
        'train.max_nonfinite_steps', 'mask.ratio', 'mask.strategy', 'mask.block_size', 'model.patch_size',
        'data.resolution', 'sample.steps', 'sample.sampler', 'diffusion.timesteps', 'eval.num_samples']
VALUES = st.one_of(st.integers(-10, 2000).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.sampled_from(['none', 'true', 'false', 'patch', 'block', 'crop', 'ddim', 'abc', '', '1e-3',
                                    '0.5', '[1]', 'nan', '-inf']),
                   st.text(max_size=6))


@FAST
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3))
def test_overrides_give_a_valid_config_or_a_config_error_naming_a_key(pairs):
    over = [f'{k}={v}' for k, v in pairs]
    try: cfg = get_config('smoke', over)
    except ConfigError as e:
        assert any(k in str(e) for k, _ in pairs), (over, str(e))
        return
    assert isinstance(cfg, RunConfig) and validate(cfg) is cfg


GRID = st.tuples(st.integers(1, 12), st.integers(1, 12))
RATIO = st.one_of(st.none(), st.floats(-0.5, 1.5), st.sampled_from([0.0, 0.5, 0.75, 0.999, float('nan')]))


@FAST
@given(st.sampled_from(['patch', 'block', 'crop']), GRID, RATIO, st.integers(0, 6), st.one_of(st.none(),
       st.integers(0, 13)), st.integers(0, 3))
def test_masks_keep_exactly_num_visible_tokens_or_fail_clearly(strategy, grid, ratio, block, crop, batch):
    try: m = Masker(strategy, grid, ratio=ratio, block_size=block, crop_size=crop)
    except ConfigError as e:
        assert str(e), e
        return
    n = grid[0] * grid[1]
    assert m.num_tokens == n and 1 <= m.num_visible <= n and m.num_masked + m.num_visible == n
    if ratio is not None and strategy == 'patch': assert m.num_masked == math.floor(ratio * n + 1e-9)
    if strategy == 'block' and m.num_masked: assert m.num_masked % (block * block) == 0
    if strategy == 'crop' and m.num_masked: assert m.num_visible == m.crop_size ** 2
    mask, keep = m.sample(batch, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (batch, n) and keep.shape == (batch, m.num_visible)
    assert (mask.sum(1) == m.num_masked).all()
    assert (~mask).gather(1, keep).all() if batch else True


@FAST
@given(st.sampled_from(['DiT-T/2', 'UViT-T/2', 'MaskDiT-T/2']), st.integers(2, 20), st.integers(1, 6),
       st.sampled_from([1, 3]), st.booleans())
def test_image_and_patch_sizes_give_a_working_model_or_a_config_error(preset, res, patch, channels, learn_sigma):
    from sadm_lab.train import build_network
    over = [f'model.preset={preset}', f'model.patch_size={patch}', 'model.depth=1', 'model.hidden_size=32',
            'model.num_heads=2', f'model.learn_sigma={learn_sigma}'.lower()]
    try:
        cfg = get_config('smoke', over)
        data = SimpleNamespace(images=torch.zeros(2, channels, res, res), num_classes=10)
        model = build_network(cfg, data)
    except ConfigError as e:
        assert 'patch' in str(e) or 'model.' in str(e), str(e)
        return
    out = model(torch.randn(2, channels, res, res), torch.tensor([1, 5]), torch.tensor([0, 3]))
    assert out.shape == (2, channels * (2 if learn_sigma else 1), res, res)
    assert torch.isfinite(out).all()


def test_found_by_hypothesis_in_ci_a_zero_grad_accum_is_a_config_error():
    "train.grad_accum=0 used to crash the batch-divisibility rule with ZeroDivisionError after its range check."
    with pytest.raises(ConfigError, match=r'train.grad_accum=0 must be > 0'): get_config('smoke', ['train.grad_accum=0'])
