"The sadm-lab command end to end: exit codes, error lines, override placement, train -> sample -> eval."
import json, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, '-m', 'sadm_lab.cli', *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=600)


def test_bad_input_is_one_error_line_with_status_2():
    for args, msg in [(('train', 'smoke', 'train.stepz=3', '--dry-run'), 'Did you mean train.steps'),
                      (('train', 'nope', '--dry-run'), 'known presets'),
                      (('train', 'smoke', 'train.steps=abc', '--dry-run'), 'train.steps expects int'),
                      (('train', 'smoke', 'model.preset=DiT-Q/2', '--dry-run'), 'model.preset'),
                      (('sample', '/nonexistent/run'), 'not a sadm_lab run folder')]:
        r = cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert msg in r.stderr and 'Traceback' not in r.stderr, (args, r.stderr)


def test_overrides_may_follow_options_and_preset_is_optional():
    r = cli('train', 'smoke', '--dry-run', 'train.steps=7', '--run-dir', 'x', 'train.lr=0.01')
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert (cfg['train']['steps'], cfg['train']['lr'], cfg['name']) == (7, 0.01, 'smoke')
    r = cli('train', 'train.steps=5', '--dry-run')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)['name'] == 'digits-dit' and json.loads(r.stdout)['train']['steps'] == 5


def test_train_resume_sample_eval(tmp_path):
    run = tmp_path / 'run'
    common = ['train.device=cpu', 'sample.steps=4', 'sample.grid_size=10', 'eval.num_samples=50', '--no-progress']
    r = cli('train', 'smoke', 'train.steps=4', '--run-dir', run, *common)
    assert r.returncode == 0, r.stderr
    r = cli('train', 'smoke', 'train.steps=6', '--run-dir', run, *common)          # exists: refused without --resume
    assert r.returncode == 2 and 'already holds a run' in r.stderr
    r = cli('train', 'smoke', '--run-dir', run, '--resume', 'train.steps=6', *common)
    assert r.returncode == 0 and 'resumed at step 4' in r.stdout, r.stdout + r.stderr
    r = cli('sample', run, '-n', 20, '--steps', 4, '--labels', '3,4', '--out', tmp_path / 's.png', '--device', 'cpu')
    assert r.returncode == 0 and (tmp_path / 's.png').is_file(), r.stderr
    r = cli('sample', run, '--labels', '12', '--device', 'cpu')
    assert r.returncode == 2 and 'out of range' in r.stderr
    r = cli('eval', run, '-n', 40, '--steps', 4, '--json', '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res['n_fake'] == 40 and res['fid'] > 0 and res['floor'] > 0


def test_eval_of_a_small_data_run_uses_the_whole_split_as_training_did(tmp_path):
    run = tmp_path / 'small'
    r = cli('train', 'smoke', 'train.steps=2', 'data.max_images=40', 'eval.enabled=false', '--run-dir', run, '--no-progress')
    assert r.returncode == 0, r.stderr
    r = cli('eval', run, '-n', 60, '--steps', 2, '--json', '--device', 'cpu')      # 60 > 40 // 2: needs the full split
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res['n_fake'] == 60 and res['n_ref'] >= 1618 - 2 * 60


TINY_DEMO = ['train.steps=6', 'train.eval_every=2', 'train.sample_every=2', 'train.ckpt_every=2', 'eval.num_samples=50',
             'sample.grid_size=4', 'sample.steps=4', 'model.depth=1', 'train.batch_size=32', 'train.log_every=1',
             'sadm.start_step=4', 'sadm.warmup_steps=1', 'sadm.heldout_size=8']


def test_demo_trains_its_stages_and_reports_them(tmp_path):
    r = cli('demo', '--no-progress', '--run-dir', tmp_path / 'd', *TINY_DEMO, 'mask.pretrain_steps=2')
    assert r.returncode == 0, r.stderr
    assert ('pre-training (steps 1-2: masked_dsm), then fine-tuning (steps 3-4: dsm), then SADM (steps 5-6: dsm + sadm)'
            in r.stdout), r.stdout
    assert 'step 2: pre-training done; fine-tuning from here (dsm)' in r.stdout
    cfg = json.loads((tmp_path / 'd' / 'config.json').read_text())
    assert cfg['mask']['strategy'] == 'patch' and cfg['mask']['pretrain_steps'] == 2 and cfg['sadm']['enabled']
    text = (tmp_path / 'd' / 'report.md').read_text()
    assert '## The 3 stages' in text
    assert '| pre-training | 1–2 | 0.75 | – |' in text and '| fine-tuning | 3–4 | 0 | – |' in text and '| SADM | 5–6 | 0 | 0.01 |' in text, text
    assert ('![pre-training](samples/step-0000002.png) ![fine-tuning](samples/step-0000004.png) '
            '![SADM](samples/step-0000006.png)') in text
    assert 'the structure objective `linear` (`sadm.variant`)' in text              # the default variant
    r = cli('demo', '--no-progress', '--unmasked', '--run-dir', tmp_path / 'u', *TINY_DEMO, 'sadm.variant=literal')
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / 'u' / 'config.json').read_text())
    assert cfg['mask']['strategy'] == 'none' and cfg['sadm']['enabled'] and cfg['sadm']['start_step'] == 4
    text = (tmp_path / 'u' / 'report.md').read_text()
    assert '| training | 1–4 |' in text and '`sadm` is the structure game' in text
    r = cli('demo', '--no-progress', '--unmasked', '--no-sadm', '--run-dir', tmp_path / 'p', *TINY_DEMO)
    assert r.returncode == 0, r.stderr
    assert not json.loads((tmp_path / 'p' / 'config.json').read_text())['sadm']['enabled']
    assert 'stages' not in (tmp_path / 'p' / 'report.md').read_text()
