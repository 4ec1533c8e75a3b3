"""`train.log_with`: experiment trackers through accelerate. TensorBoard's files are read back and must hold exactly
what the run folder's metrics.jsonl records (also across a resume), the sample grids and the config; a missing
tracker package fails before training; a tracker failure during training does not stop it."""
import importlib.util
import io
import json
import math
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sadm_lab.config import get_config
from sadm_lab.core import ConfigError
from sadm_lab.train import Callback, RunDir, Trainer, TrackerWarning, make_accelerator

pytest.importorskip('tensorboard')
from tensorboard.backend.event_processing import event_accumulator as ea          # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402

FAST = ['sample.grid_size=4', 'sample.steps=2', 'eval.num_samples=20', 'train.log_every=2', 'train.sample_every=0',
        'train.eval_every=0']


def _cfg(*overrides, log_with='tensorboard'):
    return get_config('smoke', [*FAST, f'train.log_with={log_with}', *overrides])


def _tb_dir(run: Path) -> Path: return run / 'tracker' / 'tensorboard'


def _load(path: Path) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(str(path), size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE})   # 0: keep all
    return acc.Reload()


def _is_number(v): return isinstance(v, (int, float)) and not isinstance(v, bool)


def _expected_scalars(run: Path) -> dict:
    "tag -> [(step, value)] for every number of every train and eval record in metrics.jsonl, in order."
    out = {}
    for r in RunDir(run).read_metrics():
        if r['kind'] not in ('train', 'eval'): continue
        for k, v in r.items():
            if k not in ('kind', 'step', 'time') and _is_number(v):
                out.setdefault(f"{r['kind']}/{k}", []).append((r['step'], v))
    return out


def _same_f32(a, b) -> bool:
    a, b = np.float32(a), np.float32(b)
    return bool(a == b or (math.isnan(a) and math.isnan(b)))


def _assert_tensorboard_matches_metrics(run: Path) -> ea.EventAccumulator:
    expected = _expected_scalars(run)
    kinds = {t.split('/')[0] for t in expected}
    assert 'train' in kinds and len(expected) > 5
    acc = _load(_tb_dir(run))
    assert sorted(acc.Tags()['scalars']) == sorted(expected)          # no tag more, none missing
    for tag, want in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want], tag          # every step once, in order (no duplicates)
        bad = [(s, g, w) for (s, g), (_, w) in zip(got, want) if not _same_f32(g, w)]
        assert not bad, (tag, bad)
    return acc


def _sample_steps(run: Path) -> list[int]:
    return sorted(int(p.stem.split('-')[1]) for p in (run / 'samples').glob('step-*.png'))


def _tb_grid(images: torch.Tensor) -> np.ndarray:
    "What TensorBoard's add_images stores for NCHW images in [0, 1]: up to 8 per row, grey as RGB, uint8 (H, W)."
    x = (images.numpy() * 255).clip(0, 255).astype(np.uint8)[:, 0]
    n, h, w = x.shape
    cols = min(8, n); rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w), np.uint8)
    for i in range(n): grid[i // cols * h:(i // cols + 1) * h, i % cols * w:(i % cols + 1) * w] = x[i]
    return grid


def _decode(img_event) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(img_event.encoded_image_string)).convert('RGB'))


def _next_second(run: Path):
    """Wait until the second after the newest event file's: TensorBoard orders a folder's event files by name, whose
    time is in whole seconds, so a session resumed within the same second could be read before the one it follows."""
    newest = max(int(f.name.split('.')[3]) for f in _tb_dir(run).glob('events.out.tfevents.*'))
    while time.time() < newest + 1: time.sleep(0.05)


def _flat_config(run: Path) -> dict:
    out = {}
    for sec, val in json.loads((run / 'config.json').read_text()).items():
        for k, v in (val.items() if isinstance(val, dict) else [(None, val)]):
            out[sec if k is None else f'{sec}.{k}'] = v
    return out


def test_tensorboard_holds_the_run_folders_records_samples_and_config(tmp_path):
    run = tmp_path / 'run'
    tr = Trainer(_cfg('train.steps=6', 'train.eval_every=4', 'train.sample_every=4', 'eval.enabled=true'), run,
                 progress=False).fit()
    recs = RunDir(run).read_metrics()
    assert [r['step'] for r in recs if r['kind'] == 'eval'] == [4, 6]
    acc = _assert_tensorboard_matches_metrics(run)
    assert {'eval/fid', 'eval/fid_floor', 'eval/nn_ratio', 'eval/copy_fraction', 'eval/seconds', 'train/loss',
            'train/lr', 'train/grad_norm'} <= set(acc.Tags()['scalars'])
    assert len(list(_tb_dir(run).glob('events.out.tfevents.*'))) == 1

    # the sample grids: one image per grid the run folder saved, at its step, of the grid's images mapped to [0, 1]
    assert acc.Tags()['images'] == ['samples']
    imgs = acc.Images('samples')
    assert [e.step for e in imgs] == _sample_steps(run) == [4, 6]
    final = tr.sample_images(4)                                  # fixed seed: the images of the last grid
    want = _tb_grid(((final + 1) / 2).clamp(0, 1))
    got = _decode(imgs[-1])
    assert (imgs[-1].height, imgs[-1].width) == want.shape == got.shape[:2]
    assert np.abs(got[..., 0].astype(int) - want.astype(int)).max() <= 1
    assert got.std() > 0                                         # not a blank image

    # the config as hyper-parameters (accelerate writes them into a timestamped sub-folder)
    from tensorboard.plugins.hparams import plugin_data_pb2
    hdirs = [d for d in _tb_dir(run).iterdir() if d.is_dir() and any(d.glob('events.out.tfevents.*'))]
    assert len(hdirs) == 1
    content = _load(hdirs[0]).PluginTagToContent('hparams')['_hparams_/session_start_info']
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    cfg = _flat_config(run)
    assert cfg['train.log_with'] == 'tensorboard' and set(hp) == set(cfg)
    for k, v in cfg.items():
        if v is None: assert hp[k].string_value == 'none', k
        elif isinstance(v, str): assert hp[k].string_value == v, k
        elif _is_number(v) or isinstance(v, bool): assert _same_f32(hp[k].number_value, float(v)), k
        else: assert hp[k].string_value == json.dumps(v), k
    assert any(_tb_dir(run).glob('*/hparams.yml'))


def test_a_resumed_run_continues_tensorboard_as_metrics_jsonl(tmp_path):
    run = tmp_path / 'run'
    Trainer(_cfg('train.steps=4', 'train.ckpt_every=2', 'eval.enabled=true'), run, progress=False).fit()
    _assert_tensorboard_matches_metrics(run)
    _next_second(run)
    tr = Trainer(_cfg('train.steps=8', 'train.ckpt_every=2', 'eval.enabled=true'), run, resume=True, progress=False)
    assert tr.step == 4
    tr.fit()
    recs = RunDir(run).read_metrics()
    assert [r['step'] for r in recs if r['kind'] == 'eval'] == [4, 8]          # the first session's end eval stays
    acc = _assert_tensorboard_matches_metrics(run)
    assert [e.step for e in acc.Scalars('eval/fid')] == [4, 8]
    assert [e.step for e in acc.Images('samples')] == _sample_steps(run) == [4, 8]
    assert len(list(_tb_dir(run).glob('events.out.tfevents.*'))) == 2          # one file per session, same folder


def test_steps_logged_after_the_checkpoint_are_replaced_on_resume(tmp_path):
    "A crash after the checkpoint at step 4 leaves step 6 in TensorBoard; the resume purges it and logs it again."
    class Crash(Callback):
        def on_step_end(self, trainer, logs):
            if trainer.step == 6: raise RuntimeError('crash')
    run = tmp_path / 'run'
    cfg = _cfg('train.steps=8', 'train.ckpt_every=4', 'eval.enabled=false')
    with pytest.raises(RuntimeError, match='crash'): Trainer(cfg, run, callbacks=[Crash()], progress=False).fit()
    assert RunDir(run).latest_checkpoint().name == 'ckpt-0000004.pt'
    assert [r['step'] for r in RunDir(run).read_metrics() if r['kind'] == 'train'] == [2, 4, 6]
    _next_second(run)
    Trainer(cfg, run, resume=True, progress=False).fit()
    assert [r['step'] for r in RunDir(run).read_metrics() if r['kind'] == 'train'] == [2, 4, 6, 8]
    files = sorted(_tb_dir(run).glob('events.out.tfevents.*'))
    written = [e.step for f in files for e in EventFileLoader(str(f)).Load() if any(v.tag == 'train/loss'
                                                                                   for v in e.summary.value)]
    assert written == [2, 4, 6, 6, 8]                                          # step 6 was written by both sessions
    acc = _assert_tensorboard_matches_metrics(run)                              # ... and is read back once
    assert [e.step for e in acc.Scalars('train/loss')] == [2, 4, 6, 8]


@pytest.mark.parametrize('name', ['tensorboard', 'wandb', 'mlflow'])
def test_a_missing_tracker_package_fails_before_training(tmp_path, monkeypatch, name):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda n, *a, **k: None if n == name else real(n, *a, **k))
    with pytest.raises(ConfigError, match=rf"train.log_with='{name}' needs the {name} package: pip install {name}$"):
        Trainer(_cfg(log_with=name), tmp_path / 'r', progress=False)
    assert not (tmp_path / 'r').exists()


def test_wandb_really_absent_gives_the_same_error(tmp_path):
    if importlib.util.find_spec('wandb') is not None: pytest.skip('wandb is installed here')
    with pytest.raises(ConfigError, match='pip install wandb'):
        Trainer(_cfg(log_with='wandb'), tmp_path / 'r', progress=False)


def test_an_accelerator_without_the_tracker_is_refused(tmp_path):
    plain = make_accelerator(_cfg(log_with='none').train)
    refused = r"train.log_with='tensorboard', but the accelerator was built without it .*make_accelerator\(cfg"
    with pytest.raises(ConfigError, match=refused):
        Trainer(_cfg(), tmp_path / 'r', accelerator=plain, progress=False)
    acc = make_accelerator(_cfg().train, project_dir=tmp_path / 'r')           # the way to build one
    Trainer(_cfg('train.steps=2', 'eval.enabled=false'), tmp_path / 'r', accelerator=acc, progress=False).fit()
    _assert_tensorboard_matches_metrics(tmp_path / 'r')


def test_log_with_none_writes_no_tracker_folder(tmp_path):
    tr = Trainer(_cfg('train.steps=2', 'eval.enabled=false', log_with='none'), tmp_path / 'r', progress=False).fit()
    assert (tmp_path / 'r' / 'metrics.jsonl').is_file() and not tr.acc.trackers
    assert sorted(p.name for p in (tmp_path / 'r').iterdir()) == ['checkpoints', 'config.json', 'metrics.jsonl',
                                                                   'samples', 'schedule.json']


def test_a_tracker_failure_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    from accelerate.tracking import TensorBoardTracker
    def broken(self, values, step=None, **kwargs): raise OSError('disk full')
    monkeypatch.setattr(TensorBoardTracker, 'log', broken)
    with pytest.warns(TrackerWarning) as caught:
        tr = Trainer(_cfg('train.steps=6', 'eval.enabled=false'), tmp_path / 'r', progress=False).fit()
    mine = [w for w in caught if issubclass(w.category, TrackerWarning)]
    assert len(mine) == 1 and 'disk full' in str(mine[0].message) and 'training goes on' in str(mine[0].message)
    assert tr.step == 6
    assert [r['step'] for r in RunDir(tmp_path / 'r').read_metrics() if r['kind'] == 'train'] == [2, 4, 6]
    assert [e.step for e in _load(_tb_dir(tmp_path / 'r')).Images('samples')] == [6]   # the rest still logs


WORKER = '''
import sys, torch
from pathlib import Path
from sadm_lab.config import get_config
from sadm_lab.train import Trainer
out = Path(sys.argv[1])
cfg = get_config('smoke', ['train.steps=4', 'train.log_every=2', 'eval.enabled=false', 'sample.grid_size=4',
                           'sample.steps=2', 'train.log_with=tensorboard'])
tr = Trainer(cfg, out / 'run', progress=False).fit()
total = tr.acc.reduce(torch.ones((), device=tr.device), reduction='sum').item()   # the process group still works
torch.save({'total': total, 'trackers': len(tr.acc.trackers), 'main': tr.is_main},
           out / f'rank{tr.acc.process_index}.pt')
'''


@pytest.mark.slow
def test_two_processes_log_once_from_the_main_process(tmp_path, launch_two_processes):
    script = tmp_path / 'worker.py'
    script.write_text(textwrap.dedent(WORKER))
    r0, r1 = (torch.load(o, weights_only=True) for o in launch_two_processes(script, tmp_path))
    assert r0 == {'total': 2.0, 'trackers': 0, 'main': True} and r1 == {'total': 2.0, 'trackers': 0, 'main': False}
    run = tmp_path / 'run'
    assert len(list(_tb_dir(run).glob('events.out.tfevents.*'))) == 1            # one writer: the main process
    _assert_tensorboard_matches_metrics(run)
