"""The consistent SADM variants in the trainer and the toy, and the stationarity check that tells them from the literal
term: each variant trains with finite logs, resumes exactly, refuses what it cannot do; the check fails the literal
term at the ideal denoiser and passes the variants (and DSM), and has the power to fail a slightly wrong denoiser."""
import pytest
import torch

from sadm_lab.config import get_config
from sadm_lab.core import CheckpointError, ConfigError, seeded
from sadm_lab.diffusion import Diffusion
from sadm_lab.stationarity import (Gaussian, GaussianMixture, discriminator_at_ideal, objective_check,
                                   stationarity_check)
from sadm_lab.structure_variants import RepresentationStructure, SampleStructureGame, build_sadm_objective
from sadm_lab.toy import TOY_SADM, ToyDenoiser, train_toy
from sadm_lab.train import RunDir, Trainer

FAST = ['train.device=cpu', 'eval.enabled=false', 'train.sample_every=0', 'sample.grid_size=4', 'sample.steps=2',
        'train.log_every=2', 'train.ckpt_every=4', 'train.steps=8', 'train.batch_size=16']
SADM = ['sadm.enabled=true', 'sadm.warmup_steps=2', 'sadm.heldout_size=16', 'sadm.d_lr=1e-3', 'sadm.weight=0.5']
VARIANTS = {'linear': ('g_struct', 'd_obj'), 'samples': ('g_mmd', 'd_mmd'), 'representation': ('g_repr', 'p_repr')}


def _cfg(variant, *over):
    return get_config('smoke', FAST + SADM + [f'sadm.variant={variant}', 'sadm.outside_encoder=random',
                                              'sadm.sampler_steps=3'] + list(over))


def _train_logs(path):
    return [r for r in RunDir(path).read_metrics() if r['kind'] == 'train']


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_each_variant_trains_moves_the_denoiser_and_resumes_exactly(tmp_path, variant):
    full = Trainer(_cfg(variant), tmp_path / 'full', progress=False).fit()
    logs = _train_logs(tmp_path / 'full')
    for k in VARIANTS[variant]: assert all(torch.isfinite(torch.tensor(r[k])) for r in logs), k
    plain = Trainer(get_config('smoke', FAST), tmp_path / 'plain', progress=False).fit()
    assert any(not torch.equal(v, plain.unwrapped.state_dict()[k]) for k, v in full.unwrapped.state_dict().items())
    Trainer(_cfg(variant, 'train.steps=4'), tmp_path / 'part', progress=False).fit()
    res = Trainer(_cfg(variant), tmp_path / 'part', resume=True, progress=False)
    assert res.step == 4
    res.fit()
    for k, v in full.unwrapped.state_dict().items(): assert torch.equal(v, res.unwrapped.state_dict()[k]), k
    for k, v in full.objectives['sadm'].state_dict().items():
        if k != 'optimizer': assert all(torch.equal(a, b) for a, b in zip(v.values(), res.objectives['sadm']
                                                                        .state_dict()[k].values())), k
    la, lb = _train_logs(tmp_path / 'full'), _train_logs(tmp_path / 'part')
    assert [[r[k] for k in VARIANTS[variant]] for r in la] == [[r[k] for k in VARIANTS[variant]] for r in lb]


def test_a_checkpoint_of_another_variant_is_refused_clearly(tmp_path):
    Trainer(_cfg('samples', 'train.steps=4'), tmp_path / 'r', progress=False).fit()
    with pytest.raises(ConfigError, match="sadm.variant: saved 'samples', now 'representation'"):
        Trainer(_cfg('representation', 'train.steps=6'), tmp_path / 'r', resume=True, progress=False)
    other = Trainer(_cfg('representation', 'train.steps=6'), tmp_path / 'other', progress=False)
    with pytest.raises(CheckpointError, match='has no state for the representation term'):
        other.load_checkpoint(RunDir(tmp_path / 'r').latest_checkpoint())


def test_variant_settings_are_checked():
    with pytest.raises(ConfigError, match='sadm.grad_steps=4 cannot exceed sadm.sampler_steps=3'):
        _cfg('samples', 'sadm.grad_steps=4')
    with pytest.raises(ConfigError, match="sadm.variant='ladder' is not one of"):
        _cfg('ladder')
    with pytest.raises(ConfigError, match="sadm.outside_encoder='vgg' is not one of"):
        _cfg('representation', 'sadm.outside_encoder=vgg')


def test_representation_term_with_the_outside_classifier_and_bf16(tmp_path, monkeypatch):
    monkeypatch.setenv('SADM_LAB_CACHE', str(tmp_path / 'cache'))
    tr = Trainer(_cfg('representation', 'sadm.outside_encoder=classifier', 'data.max_images=256',
                      'train.precision=bf16', 'train.steps=4'), tmp_path / 'r', progress=False)
    obj = tr.objectives['sadm']
    assert isinstance(obj, RepresentationStructure) and obj.layer == 1          # the middle of 2 blocks
    assert obj.outside.extractor.meta['seed'] == 1 and obj.outside.extractor.meta['width'] == 48   # not FID's net
    tr.fit()
    assert all(torch.isfinite(torch.tensor(r['g_repr'])) for r in _train_logs(tmp_path / 'r'))


def test_samples_game_with_bf16_and_gradient_accumulation(tmp_path):
    tr = Trainer(_cfg('samples', 'train.precision=bf16', 'train.grad_accum=2', 'sadm.grad_steps=2'), tmp_path / 'r',
                 progress=False).fit()
    assert isinstance(tr.objectives['sadm'], SampleStructureGame)
    assert all(torch.isfinite(torch.tensor(r['g_mmd'])) for r in _train_logs(tmp_path / 'r'))


def test_the_toy_trains_the_variants_that_apply_to_it():
    for variant in ('linear', 'samples'):
        run = train_toy(steps=20, batch_size=64, lam=0.5, sadm={'variant': variant, 'sampler_steps': 2}, log_every=10)
        assert len(run['history']) == 2 and run['game'].name == 'sadm'
    with pytest.raises(ConfigError, match='needs a transformer denoiser'):
        train_toy(steps=2, lam=0.5, sadm={'variant': 'representation'})


DIF = Diffusion(schedule='cosine', timesteps=1000, prediction='eps')


def _objective(variant, shape=(2,)):
    with seeded(0): net = ToyDenoiser()
    return build_sadm_objective({**TOY_SADM, 'variant': variant}, net=net, diffusion=DIF, sample_shape=shape)


def test_stationarity_check_fails_the_literal_term_and_passes_the_consistent_ones():
    mix = GaussianMixture.toy()
    lit = objective_check(_objective('literal'), mix, DIF, batches=150)
    assert not lit.stationary and lit.max_abs_z > 10, lit.summary()
    for variant in ('linear', 'samples'):
        r = objective_check(_objective(variant), mix, DIF, batches=150)
        assert r.stationary, (variant, r.summary())
    gau = Gaussian.random(64, seed=0)                    # in 64 dimensions, through the image encoders
    assert not objective_check(_objective('literal', (1, 8, 8)), gau, DIF, shape=(1, 8, 8), batches=60).stationary
    assert objective_check(_objective('linear', (1, 8, 8)), gau, DIF, shape=(1, 8, 8), batches=60).stationary


def test_stationarity_check_has_power_and_its_discriminator_probe_saturates_only_for_the_literal_term():
    mix = GaussianMixture.toy()
    dsm = lambda x0, xh, t: (xh - x0).square().sum(-1).mean()
    assert stationarity_check(dsm, mix, DIF, batches=100).stationary
    assert not stationarity_check(dsm, mix, DIF, batches=100, denoiser=lambda x_t, t, e: e * 1.05).stationary
    lit = discriminator_at_ideal(_objective('literal'), mix, DIF, steps=60)
    lin = discriminator_at_ideal(_objective('linear'), mix, DIF, steps=60)
    assert sum(lit[-10:]) / 10 > 10 * lit[0] and sum(lin[-10:]) / 10 < 1.5 * lin[0]
    game = _objective('literal')
    before = [p.clone() for p in game.encoder.parameters()]
    discriminator_at_ideal(game, mix, DIF, steps=3)
    assert all(torch.equal(a, b) for a, b in zip(before, game.encoder.parameters()))   # the probe works on a copy


def test_stationarity_inputs_are_checked():
    mix = GaussianMixture.toy()
    with pytest.raises(ConfigError, match='t_range'):
        stationarity_check(lambda *a: 0, mix, DIF, t_range=(0.5, 0.2))
    with pytest.raises(ConfigError, match='does not hold 2 numbers'):
        stationarity_check(lambda *a: 0, mix, DIF, shape=(1, 8, 8))
    with pytest.raises(ConfigError, match='no closed-form posterior'):
        GaussianMixture.toy('rings')


def test_the_representation_hook_stays_with_its_own_network():
    import copy
    from sadm_lab.models import build_model
    net = build_model('DiT-T/2', input_size=8, in_channels=1)
    obj = build_sadm_objective({'variant': 'representation', 'outside_encoder': 'random'}, net=net, diffusion=DIF,
                               sample_shape=(1, 8, 8))
    twin = copy.deepcopy(net)                  # e.g. an EMA copy made later: its forward passes are not the term's
    twin(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    assert obj.tap.tokens is None
    net(torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3]))
    assert obj.tap.tokens.shape[:2] == (3, net.num_patches)
