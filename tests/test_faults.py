"""Faults long runs meet: non-finite steps, divergence, the run-folder lock, missing/corrupt checkpoints, a full disk,
Ctrl-C, and input that used to be silently replaced."""
import errno, json, os, signal, socket, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from sadm_lab.config import get_config
from sadm_lab.core import CheckpointError, ConfigError, SadmError, file_sha256, safe_torch_load
from sadm_lab.train import (Callback, DivergenceWarning, NonFiniteError, RunDir, RunLock, RunLockedError, Trainer,
                            load_run)

ROOT = Path(__file__).resolve().parents[1]
FAST = ['train.device=cpu', 'eval.enabled=false', 'train.sample_every=0', 'sample.grid_size=4', 'sample.steps=2',
        'train.log_every=2', 'train.ckpt_every=4']


def _cfg(*over):
    return get_config('smoke', FAST + list(over))


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, '-m', 'sadm_lab.cli', *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, 'OMP_NUM_THREADS': '1'})


def _events(run_dir, name=None):
    return [r for r in RunDir(run_dir).read_metrics() if r['kind'] == 'event' and (name is None or r['event'] == name)]


def _finite(sd):
    return all(torch.isfinite(v).all() for v in sd.values() if torch.is_tensor(v) and v.is_floating_point())


def _poison(monkeypatch, steps):
    "Make the loss NaN at the optimiser steps in `steps` (a set, or a predicate)."
    import sadm_lab.train as T
    real = T.objective_step
    bad = steps if callable(steps) else steps.__contains__
    def step(model, diffusion, active, mb, **kw):
        loss, logs, out = real(model, diffusion, active, mb, **kw)
        return (loss * float('nan') if bad(mb.step) else loss), logs, out
    monkeypatch.setattr(T, 'objective_step', step)


# 1. non-finite loss or gradients -------------------------------------------------------------------------------------

def test_a_nonfinite_step_is_skipped_without_touching_weights_ema_or_optimizer(tmp_path, monkeypatch):
    _poison(monkeypatch, {3})
    seen = {}
    class Snap(Callback):
        def on_step_end(self, tr, logs):
            seen[tr.step] = ({k: v.clone() for k, v in tr.unwrapped.state_dict().items()},
                             {k: v.clone() for k, v in tr.ema.state_dict().items()},
                             {k: {n: t.clone() for n, t in s.items() if torch.is_tensor(t)}
                              for k, s in tr.opt.state_dict()['state'].items()})
    tr = Trainer(_cfg('train.steps=6'), tmp_path / 'r', callbacks=[Snap()], progress=False).fit()
    assert tr.step == 6 and tr.nonfinite_total == 1 and tr.nonfinite_run == 0
    for a, b in zip(seen[3], seen[4]):             # step index 3 (the 4th step) changed nothing ...
        for k in a: assert all(torch.equal(x, y) for x, y in zip(a[k].values(), b[k].values())) \
            if isinstance(a[k], dict) else torch.equal(a[k], b[k]), k
    assert not torch.equal(seen[5][0]['final_layer.linear.weight'], seen[4][0]['final_layer.linear.weight'])  # ... 4 did
    ev = _events(tmp_path / 'r', 'nonfinite')
    assert [e['skipped_step'] for e in ev] == [3] and ev[0]['consecutive'] == 1
    recs = {r['step']: r for r in RunDir(tmp_path / 'r').read_metrics() if r['kind'] == 'train'}
    assert recs[4]['nonfinite_skipped'] == 1 and recs[2]['nonfinite_skipped'] == recs[6]['nonfinite_skipped'] == 0
    assert recs[4]['loss'] == recs[4]['loss']        # the skipped step's NaN is left out of the mean


def test_consecutive_nonfinite_steps_stop_training_with_a_clear_error(tmp_path, monkeypatch):
    _poison(monkeypatch, lambda s: s >= 5)
    with pytest.raises(NonFiniteError, match=r'training stopped at step 7: 3 steps in a row.*ckpt-0000004\.pt'):
        Trainer(_cfg('train.steps=20', 'train.max_nonfinite_steps=3'), tmp_path / 'r', progress=False).fit()
    run = RunDir(tmp_path / 'r')
    assert [c.name for c in run.checkpoints()] == ['ckpt-0000004.pt']   # the step-8 checkpoint was never reached
    assert _events(tmp_path / 'r', 'nonfinite_stop') and not run.lock_path.exists()


def test_checkpoints_are_never_written_with_nonfinite_weights(tmp_path):
    tr = Trainer(_cfg('train.steps=4'), tmp_path / 'r', progress=False).fit()
    with torch.no_grad(): next(tr.unwrapped.parameters()).fill_(float('nan'))
    tr.step = 5
    with pytest.raises(NonFiniteError, match='not writing the checkpoint of step 5.*ckpt-0000004'):
        tr.save_checkpoint()
    assert [c.name for c in RunDir(tmp_path / 'r').checkpoints()] == ['ckpt-0000004.pt']


@pytest.mark.slow
def test_the_lr_20_run_stops_with_exit_2_and_keeps_finite_checkpoints(tmp_path):
    run = tmp_path / 'r'
    r = cli('train', 'smoke', 'train.lr=20', 'train.warmup_steps=200', 'train.steps=200', 'train.ckpt_every=10',
            'eval.enabled=false', '--run-dir', run, '--no-progress')
    assert r.returncode == 2, r.stderr[-2000:]
    assert 'training stopped at step' in r.stderr and 'non-finite' in r.stderr and 'Traceback' not in r.stderr
    cks = RunDir(run).checkpoints()
    assert cks and all(_finite(safe_torch_load(c)['model']) for c in cks)
    assert cli('sample', run, '-n', '4', '--steps', '2').returncode == 0


def test_divergence_warns_and_logs_an_event(tmp_path):
    with pytest.warns(DivergenceWarning, match='running level'):
        Trainer(_cfg('train.lr=5', 'train.warmup_steps=200', 'train.steps=20', 'train.log_every=5'), tmp_path / 'r',
                progress=False).fit()
    assert _events(tmp_path / 'r', 'divergence')


def test_the_discriminator_skips_a_nonfinite_update():
    from sadm_lab.structure import guarded_step
    lin = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    w = lin.weight.clone()
    assert not guarded_step(lin, opt, lin(torch.ones(2, 3)).sum() * float('nan'))
    assert torch.equal(lin.weight, w) and not opt.state and lin.weight.grad is None
    assert guarded_step(lin, opt, lin(torch.ones(2, 3)).sum(), grad_clip=1.0)
    assert not torch.equal(lin.weight, w)


# 2. the run-folder lock ----------------------------------------------------------------------------------------------

def test_a_second_writer_fails_naming_the_first_and_the_lock_is_released(tmp_path):
    errors = []
    class Second(Callback):
        def on_step_end(self, tr, logs):
            if tr.step == 2:
                lock = json.loads(tr.run.lock_path.read_text())
                assert lock['pid'] == os.getpid() and lock['host'] == socket.gethostname() and lock['since']
                with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on {socket.gethostname()} since") as e:
                    Trainer(_cfg('train.steps=6'), tr.run.path, resume=True, progress=False)
                errors.append(e.value)
    Trainer(_cfg('train.steps=4'), tmp_path / 'r', callbacks=[Second()], progress=False).fit()
    assert errors and not RunDir(tmp_path / 'r').lock_path.exists()
    class Boom(Callback):
        def on_step_end(self, tr, logs): raise RuntimeError('boom')
    with pytest.raises(RuntimeError):
        Trainer(_cfg('train.steps=6'), tmp_path / 'r', resume=True, callbacks=[Boom()], progress=False).fit()
    assert not RunDir(tmp_path / 'r').lock_path.exists()          # released on an exception too


def test_the_cli_refuses_a_locked_folder_and_takes_over_a_stale_lock(tmp_path):
    run = tmp_path / 'r'
    assert cli('train', 'smoke', *FAST, 'train.steps=2', '--run-dir', run, '--no-progress').returncode == 0
    lock = RunDir(run).lock_path
    lock.write_text(json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), 'since': 'earlier'}))  # alive
    r = cli('train', 'smoke', *FAST, 'train.steps=4', '--run-dir', run, '--resume', '--no-progress')
    assert r.returncode == 2 and f'pid {os.getpid()} on {socket.gethostname()} since earlier' in r.stderr, r.stderr
    dead = subprocess.Popen([sys.executable, '-c', 'pass']); dead.wait()
    lock.write_text(json.dumps({'pid': dead.pid, 'host': socket.gethostname(), 'since': 'earlier'}))
    r = cli('train', 'smoke', *FAST, 'train.steps=4', '--run-dir', run, '--resume', '--no-progress')
    assert r.returncode == 0, r.stderr
    assert [ln for ln in r.stderr.splitlines() if 'stale lock' in ln] and not lock.exists()


def test_the_dashboard_surfaces_a_locked_folder(tmp_path):
    pytest.importorskip('ipywidgets'); pytest.importorskip('plotly')
    from sadm_lab.widgets import TrainingDashboard
    tr = Trainer(_cfg('train.steps=4'), tmp_path / 'r', progress=False)
    held = RunLock(tmp_path / 'r').acquire()           # another writer took the folder since
    dash = TrainingDashboard(refresh_s=0.0)
    dash.train(tr)
    with pytest.raises(RunLockedError): dash.wait(60)
    assert 'RunLockedError' in dash.status.value
    held.release()
    with pytest.raises(RunLockedError):                # a new trainer is refused at once, in the caller's thread
        RunLock(tmp_path / 'r').acquire(); dash.train(_cfg('train.steps=4'), tmp_path / 'r', resume=True)


# 3. killed before the first checkpoint -------------------------------------------------------------------------------

def test_a_folder_without_checkpoint_resumes_from_step_0(tmp_path, capsys):
    Trainer(_cfg('train.steps=4'), tmp_path / 'r', progress=False)      # config.json written, never trained
    with pytest.raises(SadmError, match='no checkpoint yet.*--resume'):
        Trainer(_cfg('train.steps=4'), tmp_path / 'r', resume=False, progress=False)
    capsys.readouterr()
    tr = Trainer(_cfg('train.steps=4'), tmp_path / 'r', resume=True, progress=False)
    assert tr.step == 0 and 'no checkpoint yet' in capsys.readouterr().err
    tr.fit()
    assert tr.step == 4 and _events(tmp_path / 'r', 'no_checkpoint')


# 4. corrupt or missing latest checkpoint -----------------------------------------------------------------------------

@pytest.mark.parametrize('damage', ['random', 'truncated', 'missing', 'flipped'])
def test_a_bad_latest_checkpoint_falls_back_to_the_newest_valid_one(tmp_path, capsys, damage):
    Trainer(_cfg('train.steps=8'), tmp_path / 'r', progress=False).fit()
    run = RunDir(tmp_path / 'r')
    latest = run.ckpt_dir / 'ckpt-0000008.pt'
    assert json.loads((run.ckpt_dir / 'latest.json').read_text())['sha256'] == file_sha256(latest)
    assert run.checksum_path(latest).read_text().split()[0] == file_sha256(latest)
    data = latest.read_bytes()
    if damage == 'random': latest.write_bytes(os.urandom(len(data)))
    elif damage == 'truncated': latest.write_bytes(data[:len(data) // 2])
    elif damage == 'missing': latest.unlink()
    else: latest.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    capsys.readouterr()
    tr = Trainer(_cfg('train.steps=8'), tmp_path / 'r', resume=True, progress=False)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert tr.step == 4 and len(err) == 1, err
    assert 'ckpt-0000008.pt' in err[0] and 'resuming from ckpt-0000004.pt' in err[0]
    assert 'weights_only=False' not in err[0]
    assert [c.name for c in run.checkpoints()] == ['ckpt-0000004.pt']
    tr.fit()
    assert _events(tmp_path / 'r', 'checkpoint_fallback') and run.latest_checkpoint().name == 'ckpt-0000008.pt'


def test_no_usable_checkpoint_is_an_error(tmp_path):
    Trainer(_cfg('train.steps=4'), tmp_path / 'r', progress=False).fit()
    (tmp_path / 'r' / 'checkpoints' / 'ckpt-0000004.pt').write_bytes(b'junk')
    with pytest.raises(CheckpointError, match='no usable checkpoint.*sha256'):
        Trainer(_cfg('train.steps=4'), tmp_path / 'r', resume=True, progress=False)


def test_load_errors_never_advise_weights_only_false(tmp_path):
    import datetime
    (tmp_path / 'rand.pt').write_bytes(os.urandom(4096))
    (tmp_path / 'pickle.pt').write_bytes(b'\x80\x02garbage' * 10)
    torch.save({'when': datetime.date(2020, 1, 1)}, tmp_path / 'obj.pt')      # needs weights_only=False to load
    for name in ('rand.pt', 'pickle.pt', 'obj.pt'):
        with pytest.raises(CheckpointError) as e: safe_torch_load(tmp_path / name)
        msg = str(e.value)
        assert name in msg and 'weights_only' not in msg and e.value.__cause__ is None, msg


# 5. disk full, unwritable folder, stale temp files -------------------------------------------------------------------

def test_a_full_disk_at_a_checkpoint_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from sadm_lab.cli import main
    def full(obj, f, *a, **kw):
        Path(f).write_bytes(b'partial')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full)
    rc = main(['train', 'smoke', *FAST, 'train.steps=4', '--run-dir', str(tmp_path / 'r'), '--no-progress'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert 'No space left on device' in err[0] and 'ckpt-0000004.pt' in err[0] and 'MiB free on' in err[0]
    files = [p.name for p in (tmp_path / 'r').rglob('*')]
    assert not [f for f in files if f.endswith('.tmp') or f.startswith('ckpt-')] and 'lock' not in files


def test_an_unwritable_checkpoint_folder_is_a_clear_error(tmp_path):
    Trainer(_cfg('train.steps=2'), tmp_path / 'r', progress=False)
    (tmp_path / 'r' / 'checkpoints').write_text('in the way')     # a file where the folder goes: fails even as root
    with pytest.raises(CheckpointError, match=r'cannot write .*ckpt-0000002\.pt.*free on'):
        Trainer(_cfg('train.steps=2'), tmp_path / 'r', resume=True, progress=False).fit()


@pytest.mark.skipif(not hasattr(os, 'geteuid') or os.geteuid() == 0, reason='root writes into read-only folders')
def test_a_read_only_checkpoint_folder_is_a_clear_error(tmp_path):
    tr = Trainer(_cfg('train.steps=4'), tmp_path / 'r2', progress=False).fit()
    tr.run.ckpt_dir.chmod(0o555)
    try:
        tr2 = Trainer(_cfg('train.steps=8'), tmp_path / 'r2', resume=True, progress=False)
        with pytest.raises(CheckpointError, match=r'cannot write .*ckpt-0000008\.pt.*free on'): tr2.fit()
    finally: tr.run.ckpt_dir.chmod(0o755)


def test_stale_temp_files_are_removed_when_training_starts(tmp_path):
    Trainer(_cfg('train.steps=4'), tmp_path / 'r', progress=False).fit()
    run = RunDir(tmp_path / 'r')
    stale = [run.ckpt_dir / '.ckpt-0000008.pt.abc123.tmp', run.path / '.config.json.xyz.tmp']
    for p in stale: p.write_bytes(b'half')
    Trainer(_cfg('train.steps=6'), tmp_path / 'r', resume=True, progress=False).fit()
    assert not any(p.exists() for p in stale)


# 6. Ctrl-C -----------------------------------------------------------------------------------------------------------

def _weights(run_dir):
    return safe_torch_load(RunDir(run_dir).latest_checkpoint())


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_exits_130_and_resumes_exactly(tmp_path):
    over = ['train.device=cpu', 'eval.enabled=false', 'train.sample_every=0', 'sample.grid_size=4', 'sample.steps=2',
            'train.log_every=1', 'train.ckpt_every=100000', 'train.lr_schedule=constant']
    run = tmp_path / 'r'
    p = subprocess.Popen([sys.executable, '-m', 'sadm_lab.cli', 'train', 'smoke', *over, 'train.steps=100000',
                          '--run-dir', str(run), '--no-progress'], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    t0 = time.time()
    while time.time() - t0 < 120 and not [r for r in RunDir(run).read_metrics() if r.get('kind') == 'train'
                                          and r['step'] >= 3]:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    assert 'interrupted at step' in err and '--resume' in err and 'Traceback' not in err
    ck = _weights(run)
    k = ck['step']
    assert 3 <= k < 100000 and not RunDir(run).lock_path.exists() and _events(run, 'interrupted')
    end = k + 3
    Trainer(get_config('smoke', over + [f'train.steps={end}']), run, resume=True, progress=False).fit()
    Trainer(get_config('smoke', over + [f'train.steps={end}']), tmp_path / 'full', progress=False).fit()
    a, b = _weights(run), _weights(tmp_path / 'full')
    assert a['step'] == b['step'] == end
    for part in ('model', 'ema'):
        for key in a[part]: assert torch.equal(a[part][key], b[part][key]), (part, key)


# 7. silent substitutions are errors ----------------------------------------------------------------------------------

def test_sample_steps_0_is_an_error():
    for args in (('sample', '/nonexistent', '--steps', '0'), ('sample', '/nonexistent', '-n', '0'),
                 ('eval', '/nonexistent', '--steps', '0')):
        r = cli(*args)
        assert r.returncode == 2 and 'must be > 0' in r.stderr, (args, r.stderr)


def test_mask_ratio_without_strategy_is_a_config_error():
    with pytest.raises(ConfigError, match='mask.ratio=0.5 needs mask.strategy'):
        get_config('smoke', ['mask.ratio=0.5'])


def test_missing_inception_network_fails_before_training(tmp_path, monkeypatch):
    import sadm_lab.metrics as M
    monkeypatch.setattr(M, 'inception_weights_path', lambda: tmp_path / 'nowhere' / 'default_1.pt')
    with pytest.raises(ConfigError, match="eval.features='inception'"):
        Trainer(get_config('smoke', ['eval.enabled=true', 'eval.features=inception']), tmp_path / 'r', progress=False)
    assert not (tmp_path / 'r').exists()
    def missing(): raise M.MissingDependencyError('the standard Inception FID network is not installed')
    monkeypatch.setattr(M, 'inception_weights_path', missing)
    with pytest.raises(SadmError, match='not installed'):
        Trainer(get_config('smoke', ['eval.enabled=true', 'eval.features=inception']), tmp_path / 'r', progress=False)


def test_load_run_still_reads_a_run_after_faults(tmp_path):
    Trainer(_cfg('train.steps=4'), tmp_path / 'r', progress=False).fit()
    model, *_ = load_run(tmp_path / 'r')
    assert _finite(model.state_dict())


# ------------------------------------------------------------------------------------------ found in review, mended
def test_a_half_written_lock_is_live_and_a_reused_pid_with_a_foreign_token_is_stale(tmp_path):
    lock = RunLock(tmp_path)
    lock.path.write_text('')                                          # being written by another starter right now
    with pytest.raises(RunLockedError): lock.acquire()
    os.utime(lock.path, (time.time() - 60, time.time() - 60))         # ... or left unreadable long ago: stale
    lock.acquire().release()
    lock.path.write_text(json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), 'since': 'before a restart',
                                     'token': 'not-held-here'}))      # our pid, but not our lock (a new container)
    held = RunLock(tmp_path).acquire()
    assert held.owner()['token'] == held.token
    with pytest.raises(RunLockedError, match='delete the lock file'): RunLock(tmp_path).acquire()
    held.release()
    assert not any(p.name.endswith('.tmp') for p in tmp_path.iterdir())   # the lock's temp file is gone too


def test_load_run_skips_a_corrupt_latest_checkpoint_and_temp_folders_do_not_stop_a_start(tmp_path, capsys):
    Trainer(_cfg('train.steps=8'), tmp_path / 'r', progress=False).fit()
    run = RunDir(tmp_path / 'r')
    latest = run.named_checkpoint()
    data = bytearray(latest.read_bytes()); data[len(data) // 2] ^= 0xFF; latest.write_bytes(bytes(data))
    model, *_ = load_run(tmp_path / 'r')
    assert 'skipping ckpt-0000008.pt' in capsys.readouterr().err
    older = safe_torch_load(run.ckpt_dir / 'ckpt-0000004.pt')
    ema = {k[len('model.'):]: v for k, v in older['ema'].items() if k.startswith('model.')}
    assert ema and all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())     # the step-4 EMA weights
    with pytest.raises(CheckpointError, match='sha256 does not match'): load_run(tmp_path / 'r', checkpoint=latest)
    (tmp_path / 'r' / '.export.123.tmp').mkdir()                      # e.g. an interrupted export into the run
    tr = Trainer(_cfg('train.steps=9'), tmp_path / 'r', resume=True, progress=False).fit()
    assert tr.step == 9


def test_fused_adamw_can_be_switched_on_resume(tmp_path):
    Trainer(_cfg('train.steps=4'), tmp_path / 'r', progress=False).fit()
    tr = Trainer(_cfg('train.steps=6', 'train.fused_adamw=true'), tmp_path / 'r', resume=True, progress=False)
    assert all(g['fused'] for g in tr.opt.param_groups)
    assert tr.fit().step == 6
