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
        f.write(b'partial')                            # (sadm_lab saves through a Python file object)
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
    err = capsys.readouterr().err
    assert 'ckpt-0000008.pt is unusable' in err and 'using ckpt-0000004.pt (step 4) instead' in err, err
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


# 8. export never deletes what it did not write ------------------------------------------------------------------------

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A finished smoke run (8 steps, checkpoints at 4 and 8) to copy."
    run = tmp_path_factory.mktemp('trained') / 'r'
    Trainer(_cfg('train.steps=8'), run, progress=False).fit()
    return run


def _copy_run(trained, dest):
    import shutil
    shutil.copytree(trained, dest)
    return dest


def _tree(path):
    "Every file under `path` with its bytes: what must survive a refused export."
    return {p.relative_to(path): p.read_bytes() for p in sorted(Path(path).rglob('*')) if p.is_file()}


def test_export_force_refuses_what_it_did_not_write_and_replaces_an_earlier_export(trained, tmp_path):
    lab = tmp_path / 'lab'
    run, other = _copy_run(trained, lab / 'r'), _copy_run(trained, lab / 'other')
    (lab / 'notes.txt').write_text('my notes')
    before = _tree(lab)
    foreign = tmp_path / 'foreign'; foreign.mkdir(); (foreign / 'thesis.tex').write_text('x')
    cases = {'another run folder': (other, 'is a sadm_lab run folder'), 'the source itself': (run, 'is the run being exported'),
             "the source's parent": (lab, 'which is being exported'), 'a folder of other files': (foreign, 'not a sadm_lab export')}
    for what, (dest, why) in cases.items():
        r = cli('export', run, '--to', 'diffusers', dest, '--force')
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and why in err[0] and 'refusing to replace' in err[0], (what, r.stderr)
    assert _tree(lab) == before and (foreign / 'thesis.tex').is_file()
    out = tmp_path / 'exp'
    assert cli('export', run, '--to', 'diffusers', out).returncode == 0
    (out / 'notes.txt').write_text('added by hand')                    # an export with foreign content: kept
    r = cli('export', run, '--to', 'diffusers', out, '--force')
    assert r.returncode == 2 and 'notes.txt' in r.stderr and (out / 'notes.txt').is_file()
    (out / 'notes.txt').unlink()
    r = cli('export', run, '--to', 'diffusers', out, '--force', '--weights', 'model')   # an earlier export: replaced
    assert r.returncode == 0, r.stderr
    assert json.loads((out / 'sadm_lab.json').read_text())['weights'] == 'model'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['exp', 'foreign', 'lab']      # no temp folder left


def test_safetensors_export_force_replaces_only_an_earlier_export(trained, tmp_path):
    from safetensors.torch import save_file
    f = tmp_path / 'w.safetensors'
    save_file({'x': torch.ones(2)}, str(f))                            # somebody else's weights
    r = cli('export', trained, '--to', 'safetensors', f, '--force')
    assert r.returncode == 2 and 'not a sadm_lab export' in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert set(__import__('safetensors.torch', fromlist=['load_file']).load_file(str(f))) == {'x'}
    f.unlink(); (tmp_path / 'w.md').write_text('my notes')             # a card without its export: not ours
    r = cli('export', trained, '--to', 'safetensors', f, '--force')
    assert r.returncode == 2 and 'w.md' in r.stderr and (tmp_path / 'w.md').read_text() == 'my notes'
    (tmp_path / 'w.md').unlink()
    assert cli('export', trained, '--to', 'safetensors', f).returncode == 0
    assert cli('export', trained, '--to', 'safetensors', f, '--force').returncode == 0


# 9. a run folder is claimed before anything is written ---------------------------------------------------------------

def test_a_locked_new_folder_is_refused_before_anything_is_written(tmp_path):
    held = RunLock(tmp_path / 'r').acquire()                           # another start holds the new folder
    with pytest.raises(RunLockedError, match=f'pid {os.getpid()}'):
        Trainer(_cfg('train.steps=4'), tmp_path / 'r', progress=False)
    assert sorted(p.name for p in (tmp_path / 'r').iterdir()) == ['lock']    # no config.json written by the loser
    held.release()


def test_a_trainer_whose_folder_changed_since_it_was_built_refuses_to_train(tmp_path):
    a = Trainer(_cfg('train.steps=4'), tmp_path / 'r', progress=False)
    Trainer(_cfg('train.steps=6'), tmp_path / 'r', resume=True, progress=False).fit()   # another writer got there
    with pytest.raises(RunLockedError, match='changed by another process'): a.fit()
    assert safe_torch_load(RunDir(tmp_path / 'r').latest_checkpoint())['step'] == 6
    assert not RunDir(tmp_path / 'r').lock_path.exists()


@pytest.mark.slow
def test_two_racing_starts_leave_one_run_whose_config_and_checkpoints_agree(tmp_path):
    for trial in range(3):
        run = tmp_path / f'r{trial}'
        procs = [subprocess.Popen([sys.executable, '-m', 'sadm_lab.cli', 'train', 'smoke', *FAST, 'train.steps=4',
                                   f'train.lr={lr}', '--run-dir', str(run), '--no-progress'], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, 'OMP_NUM_THREADS': '1'}) for lr in (1e-3, 2e-3)]
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        codes = sorted(rc for rc, _ in results)
        assert codes == [0, 2], results
        loser = next(err for rc, err in results if rc == 2)
        assert len(loser.strip().splitlines()) == 1 and ('being written by' in loser or 'already holds a run' in loser)
        cfg_lr = json.loads((run / 'config.json').read_text())['train']['lr']
        ck = safe_torch_load(RunDir(run).latest_checkpoint())
        assert ck['config']['train']['lr'] == cfg_lr and ck['step'] == 4
        assert cli('train', 'smoke', *FAST, 'train.steps=6', f'train.lr={cfg_lr}', '--run-dir', run, '--resume',
                   '--no-progress').returncode == 0


def test_resume_restarts_a_folder_killed_before_its_config_was_written(tmp_path, capsys):
    run = tmp_path / 'r'; run.mkdir()
    dead = subprocess.Popen([sys.executable, '-c', 'pass']); dead.wait()
    (run / 'lock').write_text(json.dumps({'pid': dead.pid, 'host': socket.gethostname(), 'since': 'earlier'}))
    (run / '.config.json.abc.tmp').write_text('{"half')
    tr = Trainer(_cfg('train.steps=4'), run, resume=True, progress=False)
    assert tr.step == 0 and 'holds no config yet' in capsys.readouterr().err
    tr.fit()
    assert tr.step == 4 and _events(run, 'no_config') and not (run / '.config.json.abc.tmp').exists()


# 10. SIGTERM, SIGINT inherited as ignored, a second signal -----------------------------------------------------------

def _start_long_run(run, *, ignore_sigint=False):
    over = ['train.device=cpu', 'eval.enabled=false', 'train.sample_every=0', 'sample.grid_size=4', 'sample.steps=2',
            'train.log_every=1', 'train.ckpt_every=100000', 'train.lr_schedule=constant']
    def ignore(): signal.signal(signal.SIGINT, signal.SIG_IGN)          # as `cmd &` in a non-interactive shell
    p = subprocess.Popen([sys.executable, '-m', 'sadm_lab.cli', 'train', 'smoke', *over, 'train.steps=100000',
                          '--run-dir', str(run), '--no-progress'], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                         preexec_fn=ignore if ignore_sigint else None)
    t0 = time.time()
    while time.time() - t0 < 120 and not [r for r in RunDir(run).read_metrics() if r.get('kind') == 'train'
                                          and r['step'] >= 3]:
        time.sleep(0.05)
    return p, over


@pytest.mark.slow
@pytest.mark.parametrize('sig,code,ignored', [(signal.SIGTERM, 143, False), (signal.SIGINT, 130, True)],
                         ids=['sigterm', 'sigint-inherited-ignored'])
def test_a_signal_checkpoints_exits_with_its_code_and_resumes_exactly(tmp_path, sig, code, ignored):
    run = tmp_path / 'r'
    p, over = _start_long_run(run, ignore_sigint=ignored)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == code, err[-3000:]
    assert 'checkpoint written' in err and '--resume' in err and 'Traceback' not in err
    k = _weights(run)['step']
    ev = _events(run, 'interrupted')
    assert 3 <= k < 100000 and not RunDir(run).lock_path.exists() and ev and ev[-1]['signal'] == signal.Signals(sig).name
    end = k + 2
    Trainer(get_config('smoke', over + [f'train.steps={end}']), run, resume=True, progress=False).fit()
    Trainer(get_config('smoke', over + [f'train.steps={end}']), tmp_path / 'full', progress=False).fit()
    a, b = _weights(run), _weights(tmp_path / 'full')
    for part in ('model', 'ema'):
        for key in a[part]: assert torch.equal(a[part][key], b[part][key]), (part, key)


@pytest.mark.slow
def test_a_second_signal_exits_at_once_without_a_traceback(tmp_path):
    for gap in (0.05, 0.5):
        run = tmp_path / f'r{gap}'
        p, over = _start_long_run(run)
        p.send_signal(signal.SIGINT); time.sleep(gap); p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
        # 130 from the handler; -2 (a shell reports 130 too) when it lands after Python restored the default
        # handlers on its way out
        assert p.returncode in (130, -signal.SIGINT), (p.returncode, err[-3000:])
        assert 'Traceback' not in err and 'Exception ignored' not in err, err[-3000:]
        assert not RunDir(run).lock_path.exists()
        assert not [q for q in run.rglob('.*.tmp')]
        tr = Trainer(get_config('smoke', over + ['train.steps=40']), run, resume=True, progress=False)
        assert tr.fit().step == 40                                    # whatever was written, the run goes on


# 11. one line for every storage fault, nothing left behind -----------------------------------------------------------

def _one_line(r):
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(err) == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    return err[0]


def test_a_full_disk_at_start_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    from sadm_lab.cli import main
    import sadm_lab.core as C
    def full(self, *a, **kw): raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(C.Path, 'write_text', full)                   # the lock's first write already fails
    rc = main(['train', 'smoke', *FAST, 'train.steps=4', '--run-dir', str(tmp_path / 'r'), '--no-progress'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and 'No space left on device' in err[0] and 'MiB free on' in err[0], err
    assert not (tmp_path / 'r').exists()


def test_a_full_disk_when_writing_the_config_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    from sadm_lab.cli import main
    import sadm_lab.train as T
    real = T.atomic_write_json
    def full(path, obj):
        if Path(path).name == 'config.json': raise T.StorageError(f"cannot write {path}: No space left on device "
                                                                  "(0.0 MiB free on /)")
        return real(path, obj)
    monkeypatch.setattr(T, 'atomic_write_json', full)
    rc = main(['train', 'smoke', *FAST, 'train.steps=4', '--run-dir', str(tmp_path / 'r'), '--no-progress'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and 'config.json' in err[0], err
    assert not (tmp_path / 'r').exists()                              # schedule.json and the lock are gone too


def test_an_atomic_write_that_fails_is_a_storage_error_naming_the_path_and_leaves_no_temp_file(tmp_path):
    from sadm_lab.core import StorageError, atomic_write
    def fail(p):
        Path(p).write_bytes(b'half')
        raise OSError(errno.EROFS, 'Read-only file system')
    with pytest.raises(StorageError, match=r'cannot write .*x\.bin: Read-only file system \(.* MiB free on') as e:
        atomic_write(tmp_path / 'x.bin', fail)
    assert isinstance(e.value, OSError) and list(tmp_path.iterdir()) == []


def _mount_tmpfs(path, size='1m', ro=False):
    "A real small (or read-only) filesystem at `path`; skips where mounting is not allowed (not root, a container)."
    path.mkdir(parents=True, exist_ok=True)
    opts = f'size={size}' + (',ro' if ro else '')
    if os.geteuid() != 0 or subprocess.run(['mount', '-t', 'tmpfs', '-o', opts, 'tmpfs', str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip('cannot mount a tmpfs here (needs root and the right to mount)')
    return path


@pytest.fixture
def small_disk(tmp_path):
    path = _mount_tmpfs(tmp_path / 'disk', size='600k')
    yield path
    subprocess.run(['umount', '-l', str(path)], capture_output=True)


@pytest.mark.slow
def test_a_really_full_disk_at_a_checkpoint_is_one_line_and_leaves_no_temp_file_or_lock(small_disk):
    run = small_disk / 'r'
    # smoke with a 64-wide, 2-block DiT: a checkpoint is ~1 MB, config and metrics fit in 600 kB
    r = cli('train', 'smoke', *FAST, 'train.steps=4', '--run-dir', run, '--no-progress')
    line = _one_line(r)
    assert 'No space left on device' in line and 'ckpt-0000004.pt' in line and 'MiB free on' in line
    names = [p.name for p in run.rglob('*')]
    assert not [n for n in names if n.endswith('.tmp') or n.startswith('ckpt-')] and 'lock' not in names


@pytest.fixture
def read_only_disk(tmp_path):
    path = _mount_tmpfs(tmp_path / 'ro', size='1m', ro=True)
    yield path
    subprocess.run(['umount', '-l', str(path)], capture_output=True)


@pytest.mark.slow
def test_a_read_only_folder_is_one_line_for_train_and_sample(read_only_disk, trained):
    line = _one_line(cli('train', 'smoke', *FAST, 'train.steps=4', '--run-dir', read_only_disk / 'r', '--no-progress'))
    assert 'Read-only file system' in line and str(read_only_disk) in line
    for args in (('sample', trained, '-n', '4', '--steps', '2', '--out', read_only_disk / 's.png'),
                 ('export', trained, '--to', 'diffusers', read_only_disk / 'd')):      # refused before any work
        line = _one_line(cli(*args))
        assert f'cannot write into {read_only_disk}: Read-only file system' in line, line


def test_a_folder_made_read_only_mid_run_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    from sadm_lab.cli import main
    import sadm_lab.core as C
    real = C.atomic_write
    def ro(path, fn):
        if Path(path).name.startswith('ckpt-'): raise C.StorageError(C.write_error(path, OSError(errno.EROFS,
                                                                                                'Read-only file system')))
        return real(path, fn)
    monkeypatch.setattr(C, 'atomic_write', ro)
    rc = main(['train', 'smoke', *FAST, 'train.steps=4', '--run-dir', str(tmp_path / 'r'), '--no-progress'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and 'Read-only file system' in err[0] and 'ckpt-0000004.pt' in err[0], err
    assert not RunDir(tmp_path / 'r').lock_path.exists()
    monkeypatch.undo()
    assert main(['train', 'smoke', *FAST, 'train.steps=4', '--run-dir', str(tmp_path / 'r'), '--resume',
                 '--no-progress']) == 0


# 12. broken import folders: one line -------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def exported(trained, tmp_path_factory):
    from sadm_lab.interop import export_diffusers
    return export_diffusers(trained, tmp_path_factory.mktemp('exp') / 'd')


@pytest.mark.parametrize('damage', ['truncated', 'a list', 'disagrees with its weights'])
def test_import_and_init_from_a_broken_diffusers_folder_is_one_line(exported, tmp_path, damage):
    import shutil
    d = shutil.copytree(exported, tmp_path / 'd')
    cfg_path = d / 'transformer' / 'config.json'
    text = cfg_path.read_text()
    if damage == 'truncated': cfg_path.write_text(text[:len(text) // 2])
    elif damage == 'a list': cfg_path.write_text('[1, 2]')
    else: c = json.loads(text); c['num_layers'] += 5; cfg_path.write_text(json.dumps(c))
    want = {'truncated': 'not valid JSON', 'a list': 'holds a JSON list', 'disagrees with its weights':
            'do not match its config.json'}[damage]
    line = _one_line(cli('import', d))
    assert want in line and 'config.json' in line or 'weights' in line, line
    for src in (d, d / 'transformer'):                                 # fine-tuning from it, after the advice
        over = ['model.depth=7'] if damage == 'disagrees with its weights' else []
        line = _one_line(cli('train', 'smoke', *FAST, 'train.steps=1', *over, f'train.init_from={src}',
                             '--run-dir', tmp_path / f'ft-{src.name}', '--no-progress'))
        assert 'holds no checkpoint' not in line and (want in line or 'does not fit' in line), line


# 13. fallback is uniform ---------------------------------------------------------------------------------------------

class _Evil:
    def __reduce__(self): return (os.system, ('touch /tmp/sadm-lab-evil-ran',))


def _make_latest_malicious(run):
    "Replace the latest checkpoint with a pickle that runs code when unpickled unsafely, checksums updated to match."
    run = RunDir(run)
    latest = run.named_checkpoint()
    import pickle
    with open(latest, 'wb') as f: pickle.dump({'format': 'sadm_lab-ckpt-1', 'step': 8, 'x': _Evil()}, f, protocol=2)
    digest = file_sha256(latest)
    run.checksum_path(latest).write_text(f"{digest}  {latest.name}\n")
    (run.ckpt_dir / 'latest.json').write_text(json.dumps({'file': latest.name, 'step': 8, 'sha256': digest}))
    return latest


@pytest.mark.parametrize('damage', ['malicious', 'truncated'])
def test_resume_sample_export_and_init_from_all_fall_back_to_the_newest_loadable_checkpoint(trained, tmp_path, damage):
    Path('/tmp/sadm-lab-evil-ran').unlink(missing_ok=True)
    run = _copy_run(trained, tmp_path / 'r')
    if damage == 'malicious': _make_latest_malicious(run)
    else:
        latest = RunDir(run).named_checkpoint(); data = latest.read_bytes(); latest.write_bytes(data[:len(data) // 2])
        RunDir(run).checksum_path(latest).unlink()                     # (no checksum to catch it: the load must)
    r = cli('sample', run, '-n', '4', '--steps', '2')
    assert r.returncode == 0 and 'using ckpt-0000004.pt (step 4) instead' in r.stderr, r.stderr
    r = cli('export', run, '--to', 'safetensors', tmp_path / 'w.safetensors')
    assert r.returncode == 0 and 'using ckpt-0000004.pt (step 4) instead' in r.stderr, r.stderr
    from sadm_lab.interop import read_safetensors
    assert read_safetensors(tmp_path / 'w.safetensors')[1]['checkpoint'] == 'ckpt-0000004.pt'
    r = cli('train', 'smoke', *FAST, 'train.steps=1', f'train.init_from={run}', '--run-dir', tmp_path / 'ft',
            '--no-progress')
    assert r.returncode == 0 and 'using ckpt-0000004.pt (step 4) instead' in r.stderr, r.stderr
    tr = Trainer(_cfg('train.steps=10'), run, resume=True, progress=False)
    assert tr.step == 4 and _weights(run)['step'] == 4
    assert not Path('/tmp/sadm-lab-evil-ran').exists()


# 14. "last good" is good ---------------------------------------------------------------------------------------------

def test_divergence_is_caught_against_the_running_level_at_3610_vs_0_99(tmp_path):
    tr = Trainer(_cfg('train.steps=4'), tmp_path / 'r', progress=False)
    for loss in [1.0, 0.99, 0.98, 0.99]:
        tr.step += 1; tr.check_divergence(loss)
    assert not _events(tmp_path / 'r', 'divergence')
    with pytest.warns(DivergenceWarning, match='3610'):
        tr.step += 1; tr.check_divergence(3610.0)
    assert _events(tmp_path / 'r', 'divergence')[-1]['loss'] == 3610.0
    tr2 = Trainer(_cfg('train.steps=4'), tmp_path / 'r2', progress=False)     # a loss that doubles every step
    with pytest.warns(DivergenceWarning):
        for k in range(12): tr2.step += 1; tr2.check_divergence(1.0 * 2 ** k)
    assert _events(tmp_path / 'r2', 'divergence')[0]['diverged_step'] <= 5


def test_a_run_that_diverges_then_goes_non_finite_names_a_checkpoint_from_before_the_divergence(tmp_path, monkeypatch):
    import sadm_lab.train as T
    real = T.objective_step
    def step(model, diffusion, active, mb, **kw):       # healthy to step 13, then a huge loss, then NaN from step 18
        loss, logs, out = real(model, diffusion, active, mb, **kw)
        scale = 1.0 if mb.step < 13 else (1e4 if mb.step < 18 else float('nan'))
        return loss * scale, {**logs, 'loss': logs['loss'] * scale}, out
    monkeypatch.setattr(T, 'objective_step', step)
    cfg = _cfg('train.steps=60', 'train.keep_checkpoints=1', 'train.max_nonfinite_steps=5')
    with pytest.warns(DivergenceWarning), pytest.raises(NonFiniteError) as e:
        Trainer(cfg, tmp_path / 'r', progress=False).fit()
    msg = str(e.value)
    assert 'before the loss diverged at step 13' in msg and 'ckpt-0000012.pt' in msg, msg
    run = RunDir(tmp_path / 'r')
    assert 'ckpt-0000012.pt' in [c.name for c in run.checkpoints()] and 'ckpt-0000012.pt' in run.protected_checkpoints()
    assert run.latest_checkpoint().name == 'ckpt-0000020.pt'         # written after it (finite: NaN steps are skipped)


@pytest.mark.slow
def test_the_lr_20_run_says_no_checkpoint_predates_its_divergence(tmp_path):
    run = tmp_path / 'r'
    r = cli('train', 'smoke', 'train.lr=20', 'train.warmup_steps=200', 'train.steps=200', 'train.ckpt_every=10',
            'eval.enabled=false', '--run-dir', run, '--no-progress')
    assert r.returncode == 2 and 'no checkpoint was written before the loss diverged' in r.stderr, r.stderr[-2000:]
    assert _events(run, 'divergence')


# 15. validated before work -------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', ['malformed', 'wrong shape', 'pickled', 'text'])
def test_bad_reference_stats_fail_before_the_run_folder_is_written(tmp_path, monkeypatch, kind):
    import numpy as np
    import sadm_lab.metrics as M
    monkeypatch.setattr(M, 'inception_weights_path', lambda: Path(__file__))     # (present: not what is tested)
    f = tmp_path / 'stats.npz'
    if kind == 'malformed': f.write_bytes(b'PK\x03\x04 not really a zip')
    elif kind == 'wrong shape': np.savez(f, mu=np.zeros(2048), sigma=np.zeros((10, 10)))
    elif kind == 'pickled': np.savez(f, mu=np.array([object()], dtype=object), sigma=np.zeros((1, 1)))
    else: f.write_text('mu = 0\n')
    cfg = get_config('smoke', FAST + ['eval.enabled=true', 'eval.features=inception', f'eval.reference_stats={f}'])
    with pytest.raises(ConfigError, match='eval.reference_stats') as e:
        Trainer(cfg, tmp_path / 'r', progress=False)
    assert 'allow_pickle' not in str(e.value) and not (tmp_path / 'r').exists()


def test_data_root_for_a_dataset_that_reads_none_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="data.root='/nonexistent' is given, but 'digits' reads no folder"):
        Trainer(_cfg('train.steps=2', 'data.root=/nonexistent'), tmp_path / 'r', progress=False)
    assert not (tmp_path / 'r').exists()


def test_a_start_that_loses_a_race_never_deletes_the_winners_files(tmp_path, monkeypatch):
    "B creates the folder, A claims and writes it before B's lock, B is refused: A's run stays whole."
    real, calls = RunLock.acquire, []
    def acquire(self):
        calls.append(1)
        if len(calls) == 1:                                          # B, between its mkdir and its lock: A starts
            Trainer(_cfg('train.steps=4', 'train.lr=0.002'), tmp_path / 'r', progress=False)
        return real(self)
    monkeypatch.setattr(RunLock, 'acquire', acquire)
    with pytest.raises(SadmError, match='different config'):           # (resume=None: it would resume if it could)
        Trainer(_cfg('train.steps=4'), tmp_path / 'r', progress=False)          # B
    monkeypatch.undo()
    assert json.loads((tmp_path / 'r' / 'config.json').read_text())['train']['lr'] == 0.002
    assert (tmp_path / 'r' / 'schedule.json').is_file()
    assert Trainer(_cfg('train.steps=4', 'train.lr=0.002'), tmp_path / 'r', resume=True, progress=False).fit().step == 4



# ------------------------------------------------------------------------------------------ found in review, mended
def test_a_loss_that_climbs_slowly_is_caught_and_a_recovered_run_releases_the_kept_checkpoint(tmp_path):
    tr = Trainer(_cfg('train.steps=4'), tmp_path / 'r', progress=False)
    with pytest.warns(DivergenceWarning):
        for k in range(400): tr.step += 1; tr.check_divergence(1.02 ** k)     # +2% a step: x10 after ~120 steps
    assert _events(tmp_path / 'r', 'divergence')
    tr2 = Trainer(_cfg('train.steps=8'), tmp_path / 'r2', progress=False).fit()    # checkpoints at 4 and 8
    with pytest.warns(DivergenceWarning):
        for loss in [1.0] * 5 + [50.0]: tr2.step += 1; tr2.check_divergence(loss)  # one spike, then calm
    assert tr2._protected is not None and tr2.run.protected_checkpoints()
    for _ in range(200): tr2.step += 1; tr2.check_divergence(1.0)
    assert tr2._protected is None and not tr2.run.protected_checkpoints() and _events(tmp_path / 'r2', 'recovered')
    assert 'before the loss diverged' not in tr2.last_checkpoint_note()


def test_fit_releases_the_lock_when_it_fails_right_after_taking_it(tmp_path, monkeypatch):
    tr = Trainer(_cfg('train.steps=2'), tmp_path / 'r', progress=False)
    def boom(*a, **k): raise OSError(errno.EACCES, 'Permission denied', 'x.tmp')
    monkeypatch.setattr(Trainer, 'clean_temp_files', boom)
    with pytest.raises(OSError): tr.fit()
    assert not RunDir(tmp_path / 'r').lock_path.exists()
    monkeypatch.undo()
    assert tr.fit().step == 2


def test_sigterm_while_a_trainer_is_built_releases_the_folder(tmp_path, monkeypatch):
    import sadm_lab.train as T
    real = T.build_data
    def preempted(cfg, *a, **k):
        handler = signal.getsignal(signal.SIGTERM)                       # (never kill the test process itself)
        assert callable(handler) and handler not in (signal.SIG_DFL, signal.SIG_IGN), handler
        os.kill(os.getpid(), signal.SIGTERM)                             # e.g. while a big dataset loads
        time.sleep(1)
        return real(cfg, *a, **k)
    monkeypatch.setattr(T, 'build_data', preempted)
    with pytest.raises(KeyboardInterrupt) as e: Trainer(_cfg('train.steps=2'), tmp_path / 'r', progress=False)
    assert getattr(e.value, 'signum', None) == signal.SIGTERM and not (tmp_path / 'r').exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_two_starts_that_found_one_stale_lock_cannot_both_take_it(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass']); dead.wait()
    lock = RunDir(tmp_path).lock_path
    lock.write_text(json.dumps({'pid': dead.pid, 'host': socket.gethostname(), 'since': 'earlier'}))
    a, b = RunLock(tmp_path), RunLock(tmp_path)
    stale = b.owner()                                                    # b read the stale lock ...
    a.acquire()                                                          # ... a took it over first
    b._take_over(stale)                                                  # b must not remove a's lock
    assert a.owner()['token'] == a.token
    with pytest.raises(RunLockedError): b.acquire()
    a.release()


def test_a_stray_file_among_the_shipped_feature_networks_is_ignored_with_a_warning(tmp_path, monkeypatch):
    import sadm_lab.metrics as M
    import shutil
    stray = tmp_path / 'fashion-mnist-1x28x28-cnn-v1.safetensors'
    shutil.copy(M.shipped_feature_net_path('fashion-mnist', (1, 16, 16)), stray)
    monkeypatch.setattr(M, 'shipped_feature_net_path', lambda *a: stray)
    with pytest.warns(UserWarning, match='not a registered shipped feature network'):
        assert M.load_shipped_feature_net('fashion-mnist', torch.zeros(4, 1, 28, 28), torch.zeros(4).long(), 10,
                                          {}) is None


def test_a_saved_run_with_an_ignored_data_root_still_loads_with_a_warning(tmp_path, monkeypatch):
    import sadm_lab.train as T
    monkeypatch.setattr(T, 'reads_root', lambda name: True)              # a run made before the check existed
    Trainer(_cfg('train.steps=2', 'data.root=/nonexistent'), tmp_path / 'r', progress=False).fit()
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="reads no folder"):
        model, *_ = load_run(tmp_path / 'r')
    with pytest.warns(UserWarning, match="reads no folder"):
        assert Trainer(_cfg('train.steps=4', 'data.root=/nonexistent'), tmp_path / 'r', resume=True,
                       progress=False).fit().step == 4
