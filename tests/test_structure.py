"SADM in the trainer: λ = 0 is plain training bit for bit, the minimax updates, resume, fine-tuning, logs, 2 processes."
from pathlib import Path

import pytest
import torch

from sadm_lab.config import get_config
from sadm_lab.core import CheckpointError, ConfigError
from sadm_lab.diffusion import Diffusion
from sadm_lab.objectives import MicroBatch, build_objectives, build_schedule
from sadm_lab.structure import StructureGame
from sadm_lab.train import Trainer, RunDir

FAST = ['train.device=cpu', 'eval.enabled=false', 'train.sample_every=0', 'sample.grid_size=4', 'sample.steps=2',
        'train.log_every=2', 'train.ckpt_every=4', 'train.steps=8']
SADM = ['sadm.enabled=true', 'sadm.variant=literal', 'sadm.warmup_steps=2', 'sadm.heldout_size=16', 'sadm.d_lr=1e-3']


def _cfg(*over):
    return get_config('smoke', FAST + list(over))


def _weights(tr):
    return {k: v.clone() for k, v in tr.unwrapped.state_dict().items()}


def _train_logs(path):
    return [r for r in RunDir(path).read_metrics() if r['kind'] == 'train']


def test_lambda_zero_is_plain_training_bit_for_bit(tmp_path):
    plain = Trainer(_cfg(), tmp_path / 'plain', progress=False)
    w_init = _weights(plain)
    plain.fit()
    zero = Trainer(_cfg(*SADM, 'sadm.weight=0'), tmp_path / 'zero', progress=False)
    assert all(torch.equal(w_init[k], v) for k, v in _weights(zero).items())    # same initial denoiser
    enc0 = {k: v.clone() for k, v in zero.objectives['sadm'].encoder.state_dict().items()}
    zero.fit()
    for k, v in _weights(plain).items(): assert torch.equal(v, zero.unwrapped.state_dict()[k]), k
    for k, v in plain.ema.state_dict().items(): assert torch.equal(v, zero.ema.state_dict()[k]), k
    assert [r['loss'] for r in _train_logs(tmp_path / 'plain')] == [r['loss'] for r in _train_logs(tmp_path / 'zero')]
    # ...while the discriminator did train and the structure terms were logged
    assert any(not torch.equal(v, zero.objectives['sadm'].encoder.state_dict()[k]) for k, v in enc0.items())
    last = _train_logs(tmp_path / 'zero')[-1]
    assert last['lambda'] == 0 and last['g_struct'] > 0 and last['d_obj'] > 0
    assert last['heldout_struct'] > 0 and last['heldout_struct_pixels'] > 0


def test_lambda_positive_moves_the_denoiser_and_the_encoder_learns(tmp_path):
    plain = Trainer(_cfg(*SADM, 'sadm.weight=0'), tmp_path / 'a', progress=False).fit()
    sadm = Trainer(_cfg(*SADM, 'sadm.weight=1', 'sadm.warmup_steps=4'), tmp_path / 'b', progress=False).fit()
    assert any(not torch.equal(v, sadm.unwrapped.state_dict()[k]) for k, v in _weights(plain).items())
    logs = _train_logs(tmp_path / 'b')
    assert [r['lambda'] for r in logs] == [0.5, 1.0, 1.0, 1.0]      # λ of the last step logged at 2, 4, 6, 8: ramp over 4
    # the fixed random encoder ablation: d_steps=0 never changes the encoder
    fixed = Trainer(_cfg(*SADM, 'sadm.d_steps=0'), tmp_path / 'c', progress=False)
    e0 = {k: v.clone() for k, v in fixed.objectives['sadm'].encoder.state_dict().items()}
    fixed.fit()
    assert all(torch.equal(v, fixed.objectives['sadm'].encoder.state_dict()[k]) for k, v in e0.items())
    assert 'd_obj' not in _train_logs(tmp_path / 'c')[-1]


def test_the_toy_and_the_trainer_play_the_same_game(monkeypatch):
    """Same inputs, same updates: every call of the toy's `StructureGame.loss` is replayed, in order, on the game the
    trainer builds (`build_objectives`) from the same `sadm.*` settings; both end every call with the same encoder,
    optimiser state, generator term and logs."""
    from sadm_lab import toy
    calls, orig = [], StructureGame.loss
    def record(self, mb, out):
        term = orig(self, mb, out)
        calls.append(dict(x0=mb.x0.clone(), step=mb.step, x0_hat=out['pred_x0'].detach().clone(), t=out['t'].clone(),
                          loss=None if term.loss is None else term.loss.detach().clone(),
                          logs={k: float(v) for k, v in term.logs.items()},
                          encoder={k: v.clone() for k, v in self.encoder.state_dict().items()}))
        return term
    monkeypatch.setattr(StructureGame, 'loss', record)
    sadm = {'variant': 'literal', 'warmup_steps': 3, 'd_steps': 2, 'r1_gamma': 0.1, 'start_step': 2, 'time_cond': True}
    toy.train_toy('gaussians', steps=6, batch_size=32, lam=0.5, sadm=sadm, log_every=6)
    assert [c['step'] for c in calls] == [2, 3, 4, 5]
    monkeypatch.setattr(StructureGame, 'loss', orig)
    settings = {**toy.TOY_SADM, **sadm, 'weight': 0.5, 'enabled': True}
    cfg = get_config('smoke', ['train.steps=6', *(f'sadm.{k}={v}' for k, v in settings.items())])
    schedule = build_schedule(cfg)
    game = build_objectives(cfg, schedule, net=None, diffusion=Diffusion(schedule='cosine', timesteps=1000),
                            sample_shape=(2,))['sadm']
    for c in calls:
        mb = MicroBatch(c['x0'], None, None, c['step'], schedule.at(c['step']))
        term = game.loss(mb, {'pred_x0': c['x0_hat'].requires_grad_(), 't': c['t']})
        assert torch.equal(term.loss.detach(), c['loss']) and {k: float(v) for k, v in term.logs.items()} == c['logs']
        for k, v in game.encoder.state_dict().items(): assert torch.equal(v, c['encoder'][k]), (c['step'], k)


def test_discriminator_widens_the_gap_it_is_trained_on(tmp_path):
    # a frozen denoiser (train.lr=0): only the encoder learns, and it drives up the distance it maximises
    Trainer(_cfg(*SADM, 'sadm.weight=0', 'train.steps=30', 'sadm.d_lr=3e-3', 'train.log_every=1', 'train.lr=0'),
            tmp_path / 'r', progress=False).fit()
    d = [r['d_obj'] for r in _train_logs(tmp_path / 'r')]
    assert sum(d[-5:]) / 5 > 10 * d[0], d


def test_sadm_resume_is_exact(tmp_path):
    full = Trainer(_cfg(*SADM), tmp_path / 'full', progress=False).fit()
    Trainer(_cfg(*SADM, 'train.steps=4'), tmp_path / 'part', progress=False).fit()
    res = Trainer(_cfg(*SADM), tmp_path / 'part', resume=True, progress=False)
    assert res.step == 4
    res.fit()
    for k, v in full.unwrapped.state_dict().items(): assert torch.equal(v, res.unwrapped.state_dict()[k]), k
    for k, v in full.objectives['sadm'].encoder.state_dict().items():
        assert torch.equal(v, res.objectives['sadm'].encoder.state_dict()[k]), k
    la, lb = _train_logs(tmp_path / 'full'), _train_logs(tmp_path / 'part')
    assert [(r['loss'], r['g_struct'], r['d_obj']) for r in la] == [(r['loss'], r['g_struct'], r['d_obj']) for r in lb]


def test_sadm_finetunes_from_a_plain_run_and_checks_what_it_loads(tmp_path):
    base = Trainer(_cfg(), tmp_path / 'base', progress=False).fit()
    ft = Trainer(_cfg(*SADM, f'train.init_from={tmp_path / "base"}'), tmp_path / 'ft', progress=False)
    for k, v in base.unwrapped.state_dict().items(): assert torch.equal(v, ft.unwrapped.state_dict()[k]), k
    ft.fit()
    assert _train_logs(tmp_path / 'ft')[-1]['g_struct'] > 0
    # a plain state dict file, as the official DiT releases are
    torch.save(base.unwrapped.state_dict(), tmp_path / 'dit.pt')
    ft2 = Trainer(_cfg(*SADM, f'train.init_from={tmp_path / "dit.pt"}'), tmp_path / 'ft2', progress=False)
    for k, v in base.unwrapped.state_dict().items(): assert torch.equal(v, ft2.unwrapped.state_dict()[k]), k
    # a checkpoint without discriminator state cannot be resumed as an SADM run
    ck = torch.load(RunDir(tmp_path / 'ft').latest_checkpoint(), weights_only=True)
    ck['objectives'] = {}
    torch.save(ck, tmp_path / 'bad.pt')
    with pytest.raises(CheckpointError, match='no structure discriminator state'):
        ft.load_checkpoint(tmp_path / 'bad.pt')


def test_sadm_starts_after_masked_pretraining(tmp_path):
    over = ['mask.strategy=patch', 'mask.ratio=0.5', 'mask.pretrain_steps=4', 'sadm.start_step=4']
    tr = Trainer(_cfg(*SADM, *over), tmp_path / 'r', progress=False).fit()
    logs = _train_logs(tmp_path / 'r')
    assert ['g_struct' in r for r in logs] == [False, False, True, True]
    assert [r['mask_ratio'] for r in logs] == [0.5, 0.5, 0.0, 0.0]
    assert tr.step == 8


def test_sadm_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match='at least 2 images per micro-batch'):
        Trainer(_cfg(*SADM, 'train.batch_size=2', 'train.grad_accum=2'), tmp_path / 'a', progress=False)
    assert not (tmp_path / 'a').exists()
    with pytest.raises(ConfigError, match='start it after masked pre-training'):
        _cfg(*SADM, 'mask.strategy=patch', 'mask.ratio=0.5')
    with pytest.raises(ConfigError, match="sadm.omega='snr2'"):
        _cfg(*SADM, 'sadm.omega=snr2')


@pytest.mark.parametrize('over', [['sadm.affinity=softmax', 'sadm.tau=0.5', 'sadm.omega=dsm', 'sadm.time_cond=true',
                                   'diffusion.prediction=v'],
                                  ['sadm.affinity=gaussian', 'sadm.p=2', 'sadm.omega=snr', 'sadm.spectral_norm=true',
                                   'sadm.r1_gamma=1', 'sadm.d_steps=2', 'sadm.d_every=2', 'train.grad_accum=2',
                                   'diffusion.prediction=x0', 'sadm.t_max=1.0']])
def test_sadm_options_train_with_finite_logs(tmp_path, over):
    Trainer(_cfg(*SADM, *over), tmp_path / 'r', progress=False).fit()
    last = _train_logs(tmp_path / 'r')[-1]
    for k in ('loss', 'g_struct', 'heldout_struct', 'heldout_struct_pixels'): assert torch.isfinite(torch.tensor(last[k])), k
    if 'sadm.r1_gamma=1' in over: assert last['r1'] > 0


@pytest.mark.numerics                   # (bf16: CI runs it again where bf16 is emulated)
def test_bf16_autocast_with_sadm(tmp_path):
    Trainer(_cfg(*SADM, 'train.precision=bf16'), tmp_path / 'r', progress=False).fit()
    assert torch.isfinite(torch.tensor(_train_logs(tmp_path / 'r')[-1]['g_struct']))


WORKER = Path(__file__).parent / 'ddp_structure_worker.py'


@pytest.mark.slow
def test_global_batch_structure_on_two_processes_matches_one_process(tmp_path, launch_two_processes):
    r0, r1 = (torch.load(o, weights_only=True) for o in launch_two_processes(WORKER, tmp_path))
    ref = r0['ref']
    assert r0['world'] == r1['world'] == 2 and r0['n'] == r1['n'] == 8        # every process sees the global batch
    for r in (r0, r1):
        torch.testing.assert_close(r['g_value'], ref['g_value'], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r['d_obj'], ref['d_obj'], rtol=1e-5, atol=1e-7)
        for k in ref['g_grad']:     # DDP's averaged gradient == the one-process gradient of D over the whole batch
            torch.testing.assert_close(r['g_grad'][k], ref['g_grad'][k], rtol=1e-4, atol=1e-7)
        for k in ref['enc_after']:  # one discriminator step, the same as on one process
            torch.testing.assert_close(r['enc_after'][k], ref['enc_after'][k], rtol=1e-4, atol=1e-7)
    for k in r0['model']: assert torch.equal(r0['model'][k], r1['model'][k]), k          # the trainer kept both in sync
    for k in r0['encoder']: assert torch.equal(r0['encoder'][k], r1['encoder'][k]), k
    logs = _train_logs(tmp_path / 'run')
    assert logs[-1]['g_struct'] > 0 and 'heldout_struct' in logs[-1]


def test_sadm_warns_where_large_t_is_unsafe(tmp_path):
    with pytest.warns(UserWarning, match='sigma/alpha'):
        Trainer(_cfg(*SADM, 'sadm.t_max=1.0'), tmp_path / 'a', progress=False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)      # the safe settings: no warning
        Trainer(_cfg(*SADM, 'sadm.t_max=1.0', 'sadm.omega=snr'), tmp_path / 'b', progress=False)
