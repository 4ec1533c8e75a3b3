"Trainer: exact resume, run-folder safety, checkpoint compatibility, bf16, and 2 processes through accelerate."
from pathlib import Path

import pytest
import torch

from sadm_lab.config import get_config
from sadm_lab.core import CheckpointError, ConfigError, SadmError
from sadm_lab.train import Trainer, RunDir, load_run

FAST = ['train.device=cpu', 'eval.enabled=false', 'train.sample_every=0', 'sample.grid_size=4', 'sample.steps=2',
        'train.log_every=2', 'train.ckpt_every=4']


def _cfg(*over):
    return get_config('smoke', FAST + list(over))


def _snapshot(tr):
    return {'model': {k: v.clone() for k, v in tr.unwrapped.state_dict().items()},
            'ema': {k: v.clone() for k, v in tr.ema.state_dict().items()},
            'opt': tr.opt.state_dict()}


def test_resume_is_exact(tmp_path):
    full = Trainer(_cfg('train.steps=10'), tmp_path / 'full', progress=False).fit()
    part = Trainer(_cfg('train.steps=6'), tmp_path / 'part', progress=False).fit()
    assert part.step == 6
    resumed = Trainer(_cfg('train.steps=10'), tmp_path / 'part', resume=True, progress=False)
    assert resumed.step == 6
    resumed.fit()
    a, b = _snapshot(full), _snapshot(resumed)
    for k in a['model']: assert torch.equal(a['model'][k], b['model'][k]), k
    for k in a['ema']: assert torch.equal(a['ema'][k], b['ema'][k]), k
    for (ka, sa), (kb, sb) in zip(a['opt']['state'].items(), b['opt']['state'].items()):
        for n in sa: assert torch.equal(torch.as_tensor(sa[n]), torch.as_tensor(sb[n])), (ka, n)
    # the metrics log holds each training step once, in order, and the same losses as the uninterrupted run
    la = [r for r in RunDir(tmp_path / 'full').read_metrics() if r['kind'] == 'train']
    lb = [r for r in RunDir(tmp_path / 'part').read_metrics() if r['kind'] == 'train']
    assert [r['step'] for r in lb] == [r['step'] for r in la] == [2, 4, 6, 8, 10]
    assert [r['loss'] for r in lb] == [r['loss'] for r in la]


def test_training_changes_weights_and_lowers_loss(tmp_path):
    tr = Trainer(_cfg('train.steps=40', 'train.log_every=5', 'train.lr=2e-3'), tmp_path / 'r', progress=False)
    w0 = {k: v.clone() for k, v in tr.unwrapped.state_dict().items()}
    tr.fit()
    changed = [k for k, v in tr.unwrapped.state_dict().items() if not torch.equal(v, w0[k])]
    assert len(changed) > len(w0) // 2
    losses = [r['loss'] for r in RunDir(tmp_path / 'r').read_metrics() if r['kind'] == 'train']
    assert losses[-1] < losses[0]
    files = sorted(p.name for p in (tmp_path / 'r').rglob('*') if p.is_file())
    assert 'config.json' in files and 'metrics.jsonl' in files and 'latest.json' in files
    assert not [f for f in files if f.endswith('.tmp')]
    assert len(RunDir(tmp_path / 'r').checkpoints()) == 2          # keep_checkpoints


def _listing(d):
    return {p: p.stat().st_mtime_ns for p in Path(d).rglob('*')}


def test_resume_with_another_config_is_refused_and_touches_nothing(tmp_path):
    Trainer(_cfg('train.steps=4'), tmp_path / 'r', progress=False).fit()
    before = _listing(tmp_path / 'r')
    with pytest.raises(ConfigError, match=r"train.lr: saved 0.001, now 0.5"):
        Trainer(_cfg('train.steps=8', 'train.lr=0.5'), tmp_path / 'r', resume=True, progress=False)
    with pytest.raises(SadmError, match='already holds a run'):
        Trainer(_cfg('train.steps=8'), tmp_path / 'r', resume=False, progress=False)
    assert _listing(tmp_path / 'r') == before


def test_refuses_foreign_folder_and_missing_run(tmp_path):
    (tmp_path / 'x').mkdir(); (tmp_path / 'x' / 'notes.txt').write_text('mine')
    with pytest.raises(SadmError, match='not a sadm_lab run folder'):
        Trainer(_cfg(), tmp_path / 'x', progress=False)
    with pytest.raises(SadmError, match='holds no run'):
        Trainer(_cfg(), tmp_path / 'y', resume=True, progress=False)
    assert (tmp_path / 'x' / 'notes.txt').read_text() == 'mine'


def test_checkpoint_from_another_model_is_a_clear_error(tmp_path):
    Trainer(_cfg('train.steps=2'), tmp_path / 'a', progress=False).fit()
    ck = RunDir(tmp_path / 'a').latest_checkpoint()
    Trainer(_cfg('train.steps=2', 'model.hidden_size=96'), tmp_path / 'b', progress=False).fit()
    with pytest.raises(CheckpointError, match='model.hidden_size: checkpoint 64, run 96'):
        load_run(tmp_path / 'b', checkpoint=ck)
    (tmp_path / 'junk.pt').write_bytes(b'\x00garbage')
    with pytest.raises(CheckpointError, match='cannot load checkpoint'):
        load_run(tmp_path / 'a', checkpoint=tmp_path / 'junk.pt')
    model, diffusion, cfg, data = load_run(tmp_path / 'a')
    assert cfg.model.hidden_size == 64 and model.num_classes == 10


@pytest.mark.numerics                   # (bf16: CI runs it again where bf16 is emulated)
def test_bf16_autocast_trains_on_cpu(tmp_path):
    tr = Trainer(_cfg('train.steps=4', 'train.precision=bf16'), tmp_path / 'r', progress=False).fit()
    losses = [r['loss'] for r in RunDir(tmp_path / 'r').read_metrics() if r['kind'] == 'train']
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in tr.unwrapped.parameters())   # master weights stay fp32


def test_request_stop_checkpoints_and_resumes(tmp_path):
    from sadm_lab.train import Callback
    class StopAt(Callback):
        def on_step_end(self, trainer, logs):
            if trainer.step == 3: trainer.request_stop()
    tr = Trainer(_cfg('train.steps=8'), tmp_path / 'r', callbacks=[StopAt()], progress=False).fit()
    assert tr.step == 3 and RunDir(tmp_path / 'r').latest_checkpoint().name == 'ckpt-0000003.pt'
    assert Trainer(_cfg('train.steps=8'), tmp_path / 'r', resume=True, progress=False).fit().step == 8


WORKER = Path(__file__).parent / 'ddp_worker.py'


@pytest.mark.slow
def test_two_processes_through_accelerate_hold_identical_weights(tmp_path, launch_two_processes):
    w0, w1 = (torch.load(o, weights_only=True) for o in launch_two_processes(WORKER, tmp_path))
    assert w0['world_size'] == w1['world_size'] == 2
    assert w0['step'] == w1['step'] == 6
    for k in w0['model']: assert torch.equal(w0['model'][k], w1['model'][k]), k
    assert any(not torch.equal(w0['model'][k], w0['init'][k]) for k in w0['model'])
    for k in w0['ema']: assert torch.equal(w0['ema'][k], w1['ema'][k]), k          # EMA: the same on every rank,
    assert any(not torch.equal(w0['ema'][k], w0['model'][k]) for k in w0['ema'])  # and an average, not a copy
    start = [r for r in RunDir(tmp_path / 'run').read_metrics() if r.get('event') == 'start']
    assert start and start[0]['processes'] == 2


def test_a_stop_asked_on_the_main_process_stops_every_rank(tmp_path, launch_two_processes):
    "A callback's stop (main process only) is agreed by both ranks: no rank is left waiting in a collective."
    r0, r1 = (torch.load(o, weights_only=True) for o in launch_two_processes(Path(__file__).parent / 'ddp_stop_worker.py',
                                                                             tmp_path))
    assert r0 == r1 == {'begin': {'step': 0, 'checkpoint': 'ckpt-0000000.pt'},
                        'step': {'step': 3, 'checkpoint': 'ckpt-0000003.pt'}}


def test_bad_data_leaves_no_run_folder(tmp_path):
    from sadm_lab.core import DataError
    empty = tmp_path / 'empty'; empty.mkdir()
    with pytest.raises(DataError, match='no image files .* found in folder'):
        Trainer(_cfg('data.name=folder', f'data.root={empty}'), tmp_path / 'r', progress=False)
    assert not (tmp_path / 'r').exists()


def test_trains_even_with_gradients_switched_off_globally(tmp_path):
    with torch.no_grad():       # e.g. a notebook that called torch.set_grad_enabled(False) earlier
        tr = Trainer(_cfg('train.steps=2'), tmp_path / 'r', progress=False)
        w0 = {k: v.clone() for k, v in tr.unwrapped.state_dict().items()}
        tr.fit()
    assert any(not torch.equal(v, w0[k]) for k, v in tr.unwrapped.state_dict().items())


def test_uvit_trains_and_loads(tmp_path):
    tr = Trainer(_cfg('model.preset=UViT-T/2', 'model.hidden_size=64', 'model.depth=3', 'model.num_heads=2',
                      'train.steps=3'), tmp_path / 'u', progress=False).fit()
    assert tr.step == 3
    model, *_ = load_run(tmp_path / 'u')
    assert type(model).__name__ == 'UViT' and model.num_classes == 10


def test_load_run_refuses_a_checkpoint_with_another_diffusion_setup(tmp_path):
    Trainer(_cfg('train.steps=2'), tmp_path / 'a', progress=False).fit()
    Trainer(_cfg('train.steps=2', 'diffusion.prediction=v'), tmp_path / 'b', progress=False).fit()
    with pytest.raises(CheckpointError, match="diffusion.prediction: checkpoint 'eps', run 'v'"):
        load_run(tmp_path / 'b', checkpoint=RunDir(tmp_path / 'a').latest_checkpoint())


def test_eval_settings_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match='eval.num_samples=900 is too large'):
        Trainer(_cfg('eval.enabled=true', 'eval.num_samples=900'), tmp_path / 'r', progress=False)
    assert not (tmp_path / 'r').exists()


def test_model_settings_that_do_not_fit_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match='model.preset'):
        get_config('smoke', ['model.preset=DiT-Q/2'])
    with pytest.raises(ConfigError, match='model'):
        Trainer(_cfg('model.num_heads=3'), tmp_path / 'r', progress=False)    # 64 wide, 3 heads
    assert not (tmp_path / 'r').exists()


def test_gradient_accumulation_uses_the_whole_batch(tmp_path, monkeypatch):
    seen = []
    import sadm_lab.train as T
    orig = T.BatchStream.indices
    def spy(self, step, micro=0):
        idx = orig(self, step, micro); seen.append((step, micro, len(idx))); return idx
    monkeypatch.setattr(T.BatchStream, 'indices', spy)
    tr = Trainer(_cfg('train.steps=2', 'train.grad_accum=4'), tmp_path / 'r', progress=False).fit()
    assert [s for s in seen if s[0] == 1] == [(1, m, 8) for m in range(4)]       # 4 micro-batches of 32 / 4
    assert tr.step == 2


@pytest.mark.parametrize('mask', [['mask.strategy=patch', 'mask.ratio=0.75'],
                                  ['mask.strategy=block', 'mask.ratio=0.5', 'mask.block_size=2'],
                                  ['mask.strategy=crop', 'mask.crop_size=2']])
def test_masked_training_drops_tokens_before_the_transformer(tmp_path, monkeypatch, mask):
    import sadm_lab.diffusion as D
    seen = []
    orig = D.Diffusion.training_losses
    def spy(self, model, x0, **kw):
        seen.append(None if kw.get('view') is None else tuple(kw['view'].keep_idx.shape)); return orig(self, model, x0, **kw)
    monkeypatch.setattr(D.Diffusion, 'training_losses', spy)
    Trainer(_cfg('train.steps=2', *mask), tmp_path / 'r', progress=False).fit()   # 8x8 digits, patch 2: 16 tokens
    visible = {'patch': 4, 'block': 8, 'crop': 4}[mask[0].split('=')[1]]
    assert seen == [(32, visible)] * 2
    losses = [r['loss'] for r in RunDir(tmp_path / 'r').read_metrics() if r['kind'] == 'train']
    assert all(torch.isfinite(torch.tensor(losses)))


def test_bad_mask_settings_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match='block'):
        Trainer(_cfg('mask.strategy=block', 'mask.ratio=0.5', 'mask.block_size=3'), tmp_path / 'r', progress=False)
    with pytest.raises(ConfigError, match='crop_size'):
        get_config('smoke', ['mask.strategy=crop'])
    assert not (tmp_path / 'r').exists()


TWO_STAGE = ['mask.strategy=patch', 'mask.ratio=0.5', 'mask.pretrain_steps=4', 'mask.finetune_lr=5e-4',
             'mask.finetune_warmup_steps=2']


@pytest.mark.parametrize('stop_at', [4, 6])
def test_two_stage_schedule_resumes_exactly_across_the_switch(tmp_path, stop_at):
    full = Trainer(_cfg('train.steps=8', *TWO_STAGE), tmp_path / 'full', progress=False).fit()
    Trainer(_cfg(f'train.steps={stop_at}', *TWO_STAGE), tmp_path / 'part', progress=False).fit()
    part = Trainer(_cfg('train.steps=8', *TWO_STAGE), tmp_path / 'part', resume=True, progress=False).fit()
    a, b = _snapshot(full), _snapshot(part)
    for k in a['model']: assert torch.equal(a['model'][k], b['model'][k]), k
    for k in a['ema']: assert torch.equal(a['ema'][k], b['ema'][k]), k
    recs = RunDir(tmp_path / 'part').read_metrics()
    assert [r['step'] for r in recs if r.get('event') == 'stage'] == [4]          # the switch, logged once
    train = [r for r in recs if r['kind'] == 'train']
    assert [r['mask_ratio'] for r in train] == [0.5, 0.5, 0.0, 0.0]            # logged at steps 2, 4, 6, 8
    assert [r['lr'] for r in train][2:] == [5e-4 * 2 / 2, 5e-4]                 # fine-tuning warm-up from the switch


def test_mask_ratio_anneals_to_zero_at_the_switch(tmp_path):
    tr = Trainer(_cfg('train.steps=2', 'mask.strategy=patch', 'mask.ratio=0.8', 'mask.pretrain_steps=10',
                      'mask.anneal=linear'), tmp_path / 'r', progress=False)
    masked, pre = tr.objectives['masked_dsm'], tr.schedule[0]
    assert [round(masked.ratio_at(s, pre), 6) for s in (0, 5, 10)] == [0.8, 0.4, 0.0]
    assert tr.schedule.at(9).objectives == ('masked_dsm',) and tr.schedule.at(10).objectives == ('dsm',)


def test_init_from_another_run_and_a_plain_state_dict(tmp_path):
    src = Trainer(_cfg('train.steps=3'), tmp_path / 'src', progress=False).fit()
    tr = Trainer(_cfg('train.steps=1', f'train.init_from={tmp_path / "src"}'), tmp_path / 'dst', progress=False)
    for k, v in src.unwrapped.state_dict().items(): assert torch.equal(tr.unwrapped.state_dict()[k], v), k
    torch.save(src.unwrapped.state_dict(), tmp_path / 'plain.pt')                 # e.g. an official DiT release file
    tr2 = Trainer(_cfg('train.steps=1', f'train.init_from={tmp_path / "plain.pt"}'), tmp_path / 'dst2', progress=False)
    assert all(torch.equal(tr2.unwrapped.state_dict()[k], v) for k, v in src.unwrapped.state_dict().items())
    with pytest.raises(CheckpointError, match='shape mismatches'):
        Trainer(_cfg('train.steps=1', 'model.hidden_size=96', f'train.init_from={tmp_path / "src"}'), tmp_path / 'bad',
                progress=False)
    assert not (tmp_path / 'bad').exists()


def test_small_data_runs_are_judged_against_the_whole_training_split(tmp_path):
    from sadm_lab.data import load_data
    full = load_data('digits')
    tr = Trainer(_cfg('train.steps=2', 'data.max_images=40', 'eval.enabled=true', 'eval.num_samples=100'),
                 tmp_path / 'r', progress=False)     # 100 > 40 // 2: allowed because the reference is the full split
    assert len(tr.data) == 40 and torch.equal(tr.eval_data.images, full.images)
    rec = tr.fit().evaluate()
    assert rec['n_fake'] == 100 and rec['n_ref'] >= 100 and rec['n_ref'] + 100 <= len(full)
    assert rec['fid'] > 0 and 'nn_ratio' in rec                 # memorisation is checked against the 40 trained on
    with pytest.raises(ConfigError, match='too large for 1618 real images'):
        Trainer(_cfg('data.max_images=40', 'eval.enabled=true', 'eval.num_samples=900'), tmp_path / 'r2', progress=False)


def test_transfer_from_another_dataset_loads_every_weight(tmp_path):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for i in range(24):                                   # a tiny 8x8 grey 'source' dataset in an image folder
        Image.fromarray((torch.rand(8, 8, generator=g) * 255).byte().numpy(), mode='L').save(tmp_path / f'{i}.png')
    src = Trainer(_cfg('train.steps=2', 'data.name=folder', f'data.root={tmp_path}', 'data.conditional=false',
                       'data.channels=1', 'data.resolution=8', 'mask.strategy=patch', 'mask.ratio=0.75'), tmp_path / 'src', progress=False).fit()
    dst = Trainer(_cfg('train.steps=2', 'data.max_images=30', 'data.conditional=false', f'train.init_from={src.run.path}'),
                  tmp_path / 'dst', progress=False)
    for k, v in src.unwrapped.state_dict().items(): assert torch.equal(dst.unwrapped.state_dict()[k], v), k
    assert dst.data.name == 'digits' and len(dst.data) == 30
    with pytest.raises(CheckpointError, match='missing keys'):   # conditional digits: a label table the source lacks
        Trainer(_cfg('train.steps=1', f'train.init_from={src.run.path}'), tmp_path / 'bad', progress=False)


def test_resume_with_fewer_steps_than_done_is_refused(tmp_path):
    Trainer(_cfg('train.steps=4'), tmp_path / 'r', progress=False).fit()
    with pytest.raises(ConfigError, match='beyond train.steps=2'):
        Trainer(_cfg('train.steps=2'), tmp_path / 'r', resume=True, progress=False)


def test_building_and_training_leave_the_callers_rng_and_flags_alone(tmp_path):
    torch.manual_seed(123)
    state, flags = torch.random.get_rng_state(), (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    tr = Trainer(_cfg('train.steps=2', 'sadm.enabled=true', 'train.tf32=true'), tmp_path / 'r', progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)              # no reseeding behind the caller's back
    tr.fit()
    assert torch.equal(torch.random.get_rng_state(), state)
    Trainer(_cfg('train.steps=4', 'sadm.enabled=true', 'train.tf32=true'), tmp_path / 'r', resume=True, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)              # nor on resume
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
    # the initial weights still depend on train.seed only
    a = Trainer(_cfg('train.steps=1'), tmp_path / 'a', progress=False)
    torch.manual_seed(999)
    b = Trainer(_cfg('train.steps=1'), tmp_path / 'b', progress=False)
    for k, v in a.unwrapped.state_dict().items(): assert torch.equal(v, b.unwrapped.state_dict()[k]), k


def test_a_hand_written_schedule_trains_resumes_and_reports(tmp_path):
    "SADM for a window of steps, then plain again: an order the config alone cannot express."
    from sadm_lab.demo import write_report, stage_table
    from sadm_lab.objectives import Schedule, Stage
    cfg = _cfg('train.steps=8', 'sadm.enabled=true', 'sadm.warmup_steps=0', 'sadm.heldout_size=0')
    window = Schedule([Stage('plain', 0, ('dsm',), lr=1e-3, warmup_steps=2), Stage('SADM', 2, ('dsm', 'sadm')),
                       Stage('plain again', 6, ('dsm',))], 8)
    full = Trainer(cfg, tmp_path / 'full', schedule=window, progress=False).fit()
    Trainer(_cfg('train.steps=4', 'sadm.enabled=true', 'sadm.warmup_steps=0', 'sadm.heldout_size=0'), tmp_path / 'part',
            schedule=Schedule(window.stages, 4), progress=False).fit()
    part = Trainer(cfg, tmp_path / 'part', resume=True, progress=False)       # the folder's schedule.json is used
    assert part.schedule == window
    part.fit()
    for k, v in full.unwrapped.state_dict().items(): assert torch.equal(v, part.unwrapped.state_dict()[k]), k
    logs = [r for r in RunDir(tmp_path / 'full').read_metrics() if r['kind'] == 'train']
    assert ['g_struct' in r for r in logs] == [False, True, True, False]      # logged at 2, 4, 6, 8
    assert [r['lambda'] for r in logs if 'lambda' in r] == [0.01, 0.01]
    events = [r for r in RunDir(tmp_path / 'full').read_metrics() if r.get('event') == 'stage']
    assert [(e['step'], e['stage'], e['objectives']) for e in events] == [(2, 'SADM', ['dsm', 'sadm']),
                                                                          (6, 'plain again', ['dsm'])]
    assert [r['stage'] for r in stage_table(RunDir(tmp_path / 'full').read_metrics(), RunDir(tmp_path / 'full').schedule())] \
        == ['plain', 'SADM', 'plain again']
    assert '- **plain again**, steps 7–8: dsm.' in write_report(tmp_path / 'full').read_text()
    with pytest.raises(ConfigError, match='another schedule'):
        Trainer(cfg, tmp_path / 'part', resume=True, schedule=Schedule(window.stages[:2], 8), progress=False)
    # a schedule written for another length ends at train.steps, so a resume (which reads it back so) is the same run
    short = Trainer(cfg, tmp_path / 'short', schedule=Schedule(window.stages, 5), progress=False)
    assert short.schedule.total_steps == 8 and short.schedule == window
    with pytest.raises(ConfigError, match='sadm.enabled'):                   # a stage needs what the config enables
        Trainer(_cfg('train.steps=8'), tmp_path / 'x', schedule=window, progress=False)
    assert not (tmp_path / 'x').exists()
