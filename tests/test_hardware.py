"""What the machine can do: `precision='auto'` from a mocked probe (both branches), the warning for emulated bf16, the
start event's record, and `sadm-lab env`."""
import json, os, subprocess, sys, warnings
from pathlib import Path

import pytest
import torch

import sadm_lab.hardware as H
from sadm_lab.config import get_config
from sadm_lab.train import RunDir, Trainer, sampling_precision

ROOT = Path(__file__).resolve().parents[1]
FAST = ['train.device=cpu', 'eval.enabled=false', 'train.sample_every=0', 'sample.grid_size=4', 'sample.steps=2',
        'train.log_every=2', 'train.steps=2']
NATIVE = {'fp32': 40.0, 'bf16': 160.0}       # AVX-512 BF16 / AMX: bf16 matmuls faster than fp32
EMULATED = {'fp32': 67.0, 'bf16': 0.3}       # AVX2 only: measured 230x slower (2048^2) on a 2-core EPYC


@pytest.fixture
def probe(monkeypatch):
    "Set what the matmul probe measures and the CPU's kind (by default the kind such rates come from)."
    monkeypatch.setattr(H, '_WARNED', set())
    def set_rates(rates, kind=None):
        monkeypatch.setattr(H, 'matmul_rates', lambda device='cpu', **k: dict(rates))
        kind = kind or ('AVX-512 BF16' if rates['bf16'] > rates['fp32'] else 'AVX2')
        monkeypatch.setattr(H, 'cpu_kind', lambda flags=None: kind)
    return set_rates


@pytest.mark.parametrize('rates,want', [(NATIVE, 'bf16'), (EMULATED, 'fp32')], ids=['native', 'emulated'])
def test_auto_picks_bf16_only_where_it_is_native_and_the_trainer_records_why(tmp_path, probe, rates, want):
    probe(rates)
    with warnings.catch_warnings():
        warnings.simplefilter('error', H.PrecisionWarning)             # auto never warns
        tr = Trainer(get_config('smoke', FAST + ['train.precision=auto', 'sample.precision=auto']), tmp_path / 'r',
                     progress=False)
    assert tr.precision == tr.sample_precision == want
    ac = tr.autocast()
    assert (ac is not None and ac.fast_dtype == torch.bfloat16) if want == 'bf16' else ac is None
    tr.fit()
    start = next(r for r in RunDir(tmp_path / 'r').read_metrics() if r.get('event') == 'start')
    assert start['precision']['train'] == want and 'measured' in start['precision']['why']
    assert start['hardware']['cpu_kind'] and start['hardware']['torch_cpu_capability']


def test_explicit_bf16_on_emulating_hardware_runs_and_warns_once_with_the_slowdown(tmp_path, probe):
    probe(EMULATED)
    with pytest.warns(H.PrecisionWarning, match=r"ran 223x slower than fp32.*train.precision=auto"):
        tr = Trainer(get_config('smoke', FAST + ['train.precision=bf16']), tmp_path / 'r', progress=False)
    assert tr.precision == 'bf16' and 'emulated' in tr.precision_note['why']
    with warnings.catch_warnings():
        warnings.simplefilter('error', H.PrecisionWarning)             # once per process
        Trainer(get_config('smoke', FAST + ['train.precision=bf16']), tmp_path / 'r2', progress=False)


def test_auto_decides_by_the_flags_too_so_a_borderline_probe_cannot_flip_it(probe):
    "AVX-512 without BF16 (e.g. Cascade Lake) runs bf16 at about half speed: the probe alone would flip."
    for ratio in (0.32, 0.53, 0.9):
        probe({'fp32': 100.0, 'bf16': 100.0 * ratio}, kind='AVX-512')
        assert H.resolve_precision('auto', 'cpu')[0] == 'fp32'
    probe({'fp32': 100.0, 'bf16': 3.0}, kind='AVX-512 BF16')              # the instructions, dispatch forced down
    assert H.resolve_precision('auto', 'cpu')[0] == 'fp32'


def test_a_resumed_auto_run_keeps_the_precision_it_started_with(tmp_path, probe):
    probe(NATIVE)
    Trainer(get_config('smoke', FAST + ['train.precision=auto']), tmp_path / 'r', progress=False).fit()
    probe(EMULATED)                                                       # the run moves to an AVX2 machine
    with pytest.warns(H.PrecisionWarning):
        tr = Trainer(get_config('smoke', FAST[:-1] + ['train.steps=4', 'train.precision=auto']), tmp_path / 'r',
                     resume=True, progress=False)
    assert tr.precision == 'bf16' and any(e == 'precision' for e, _ in tr.notes)
    tr.fit()
    resume = next(r for r in RunDir(tmp_path / 'r').read_metrics() if r.get('event') == 'resume')
    assert resume['precision']['train'] == 'bf16'


def test_sampling_precision_resolves_auto(probe):
    probe(NATIVE)
    assert sampling_precision('auto', 'cpu').fast_dtype == torch.bfloat16
    probe(EMULATED)
    assert isinstance(sampling_precision('auto', 'cpu'), type(sampling_precision('fp32', 'cpu')))   # nullcontext


def test_the_papers_presets_say_auto_not_bf16():
    from sadm_lab.config import PRESETS
    for name in ('fashion16-dit', 'cifar10-dit', 'celeba64-dit'):
        cfg = get_config(name)
        assert cfg.train.precision == 'auto' and cfg.sample.precision in ('auto', 'fp32'), name
    assert not [n for n, ov in PRESETS.items() if 'bf16' in (ov.get('train.precision'), ov.get('sample.precision'))]


def test_the_probe_measures_something_real():
    r = H.matmul_rates('cpu')
    assert r['fp32'] > 0.1 and r['bf16'] > 0.01
    ok, why = H.native_bf16('cpu')
    assert ok == (H.cpu_kind() in ('AMX', 'AVX-512 BF16') and r['bf16'] >= 0.5 * r['fp32']) and 'measured' in why


def test_cpu_kind_from_flags():
    assert H.cpu_kind({'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16'}) == 'AMX'
    assert H.cpu_kind({'avx2', 'avx512f', 'avx512_bf16'}) == 'AVX-512 BF16'
    assert H.cpu_kind({'avx2', 'avx512f'}) == 'AVX-512'
    assert H.cpu_kind({'avx2'}) == 'AVX2'


def test_sadm_lab_env_reports_versions_cpu_and_measured_rates():
    r = subprocess.run([sys.executable, '-m', 'sadm_lab.cli', 'env', '--json'], capture_output=True, text=True,
                       cwd=ROOT, timeout=120, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    for k in ('sadm_lab', 'torch', 'accelerate', 'diffusers', 'cpu', 'cpu_kind', 'torch_cpu_capability',
              'torch_threads', 'matmul_gflops', 'auto_precision'):
        assert k in rep, k
    assert rep['matmul_gflops']['fp32'] > 0 and rep['auto_precision'] in ('bf16', 'fp32')
    r = subprocess.run([sys.executable, '-m', 'sadm_lab.cli', 'env', '--no-measure'], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0 and '- cpu_kind: ' in r.stdout and 'matmul_gflops' not in r.stdout


def test_the_cli_says_which_precision_it_trains_in(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'sadm_lab.cli', 'train', 'smoke', *FAST, 'train.precision=auto',
                        '--run-dir', str(tmp_path / 'r'), '--no-progress'], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith('precision:'))
    assert 'auto:' in line and ('train bf16' in line or 'train fp32' in line)
