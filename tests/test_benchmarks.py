"The benchmark scripts' bookkeeping, end to end on seconds-long budgets (their results are not checked here)."
import importlib.util, json, sys
from pathlib import Path

import pytest
import torch
from sadm_lab.train import training_clock

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    "Import a benchmark script as a module, as `python benchmarks/<name>.py` would see it (benchmarks/ on sys.path)."
    if str(ROOT / 'benchmarks') not in sys.path: sys.path.insert(0, str(ROOT / 'benchmarks'))
    spec = importlib.util.spec_from_file_location(name, ROOT / 'benchmarks' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def _source_folder(root: Path):
    "A labelled 10-class folder of random 8x8 grey images, standing in for Fashion-MNIST (not installed everywhere)."
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c in range(10):
        (root / f'c{c}').mkdir(parents=True)
        for i in range(4):
            Image.fromarray((torch.rand(8, 8, generator=g) * 255).byte().numpy(), mode='L').save(root / f'c{c}' / f'{i}.png')
    return root


def test_transfer_setting_spends_the_same_budget_in_every_arm(tmp_path, capsys):
    eqc = _load('maskdm_equal_compute')
    src, out, S = _source_folder(tmp_path / 'src'), tmp_path / 'out', 16
    eqc.main(['--setting', 'transfer', '--base', 'smoke', '--steps', str(S), '--seeds', '3', '--evals', '2',
              '--eval-samples', '40', '--target-images', '60', '--source', 'folder', '--source-root', str(src),
              '--finetune-warmup', '2', '--out', str(out), 'model.depth=1'])
    s = json.loads((out / 'summary.json').read_text())
    P, F, c = s['pretrain_steps'], s['finetune_steps'], s['cost_ratio_flops']
    assert F == S // 2 and P == round(S / 2 / c) and abs(P * c + F - S) <= c   # P masked + F unmasked cost S
    assert set(s['arms']) == {'scratch', 'maskdm', 'transfer', 'transfer-unmasked'}
    a = s['arms']
    assert a['scratch']['updates'] == S and a['transfer-unmasked']['updates'] == S
    assert a['maskdm']['updates'] == a['transfer']['updates'] == P + F
    for arm, d in a.items():                          # every curve ends at the budget, in FLOPs
        (curve,) = d['curves']
        assert curve[-1][0] == pytest.approx(S, abs=c), (arm, curve)
        assert all(x1 < x2 and t1 < t2 for (x1, t1, _), (x2, t2, _) in zip(curve, curve[1:])), (arm, curve)
    cfg = lambda run: json.loads((Path(run) / 'config.json').read_text())
    for arm, masked in (('transfer', True), ('transfer-unmasked', False)):
        ft = cfg(a[arm]['runs'][0])
        pre = cfg(ft['train']['init_from'])           # the fine-tuning run starts from the source pre-training run
        assert pre['data']['name'] == 'folder' and pre['data']['resolution'] == 8 and ft['data']['name'] == 'digits'
        assert (pre['mask']['strategy'] != 'none') == masked and ft['mask']['strategy'] == 'none'
        assert ft['data']['max_images'] == 60 and pre['train']['seed'] == ft['train']['seed'] == 3
    assert cfg(a['maskdm']['runs'][0])['mask']['pretrain_steps'] == P
    assert (out / 'fid_vs_flops.png').is_file() and (out / 'fid_vs_time.png').is_file()
    assert '| from scratch |' in (out / 'summary.md').read_text()


def test_small_batch_control_matches_the_tokens_of_a_masked_step(tmp_path):
    eqc = _load('maskdm_equal_compute')
    out, S = tmp_path / 'out', 16
    args = ['--base', 'smoke', '--steps', str(S), '--seeds', '0', '--evals', '2', '--eval-samples', '40',
            '--arms', 'scratch', 'small-batch', '--finetune-warmup', '2', '--out', str(out), 'model.depth=1']
    eqc.main(args)
    s = json.loads((out / 'summary.json').read_text())
    P, F, c, b = s['pretrain_steps'], s['finetune_steps'], s['cost_ratio_flops'], s['small_batch']
    assert b == round(32 * c) and set(s['arms']) == {'scratch', 'small-batch'}    # smoke's batch is 32
    d = s['arms']['small-batch']
    ft = json.loads((Path(d['runs'][0]) / 'config.json').read_text())
    pre = json.loads((Path(ft['train']['init_from']) / 'config.json').read_text())
    assert pre['train']['batch_size'] == b and pre['train']['steps'] == P and pre['mask']['strategy'] == 'none'
    assert ft['train']['batch_size'] == 32 and ft['train']['steps'] == F and d['updates'] == P + F
    (curve,) = d['curves']                             # evaluated in both stages; ends at the budget in FLOPs
    assert len(curve) >= 3 and curve[-1][0] == pytest.approx(P * b / 32 + F)
    assert abs(P * b / 32 + F - S) <= 1
    # a re-run into the same folder reuses the finished runs (nothing retrained) and reports the same numbers
    logs = {q: q.read_bytes() for q in out.glob('*/metrics.jsonl')}
    eqc.main(args)
    assert {q: q.read_bytes() for q in out.glob('*/metrics.jsonl')} == logs
    s2 = json.loads((out / 'summary.json').read_text())
    assert s2['arms']['small-batch']['final_fids'] == d['final_fids'] and s2['small_batch'] == b
    with pytest.raises(SystemExit):                   # other settings into the same folder are refused
        eqc.main(args[:-1] + ['model.depth=2'])


def test_training_time_adds_up_sessions_and_leaves_out_evaluations():
    from sadm_lab.train import training_time
    recs = [{'kind': 'event', 'event': 'start', 'step': 0, 'time': 100.0},
            {'kind': 'train', 'step': 10, 'time': 110.0},
            {'kind': 'eval', 'step': 10, 'seconds': 3.0, 'time': 114.0},
            {'kind': 'train', 'step': 20, 'time': 120.0},                 # interrupted here; resumed later
            {'kind': 'event', 'event': 'resume', 'step': 20, 'time': 500.0},
            {'kind': 'train', 'step': 30, 'time': 507.0},
            {'kind': 'eval', 'step': 30, 'seconds': 2.0, 'time': 510.0},
            {'kind': 'event', 'event': 'end', 'step': 30, 'time': 511.0}]
    evals = [s for r, s in training_clock(recs) if r['kind'] == 'eval']
    assert evals == [11.0, 20.0 - 3.0 + 10.0 - 2.0] and training_time(recs) == 20.0 - 3.0 + 11.0 - 2.0


def test_step_timing_synchronises_and_interleaves(monkeypatch):
    common = _load('_common')
    calls = []
    monkeypatch.setattr(common, 'sync', lambda device: calls.append('sync'))
    arms = {n: (lambda n=n: calls.append(n)) for n in ('a', 'b', 'c')}
    times = common.interleaved_times(arms, reps=3, steps=2, warmup=1, device='cpu')
    assert {n: len(v) for n, v in times.items()} == {'a': 1 * 3, 'b': 3, 'c': 3}
    order = [c for c in calls[3:] if c != 'sync']                    # after one warm-up step each
    assert order == ['a', 'a', 'b', 'b', 'c', 'c', 'b', 'b', 'c', 'c', 'a', 'a', 'c', 'c', 'a', 'a', 'b', 'b']
    blocks = calls[3:]
    assert all(blocks[i] == 'sync' for i in range(0, len(blocks), 4)) and all(blocks[i] == 'sync' for i in range(3, len(blocks), 4))
    assert common.paired_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == 3.0


def test_no_benchmark_imports_another_benchmark():
    import ast
    scripts = {p.stem for p in (ROOT / 'benchmarks').glob('*.py')}
    for p in (ROOT / 'benchmarks').glob('*.py'):
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            bad = [n for n in names if n.split('.')[0] in scripts - {'_common'}]
            assert not bad, f"{p.name} imports the benchmark script(s) {bad}: share code through _common.py"


def test_unknown_arm_is_refused(tmp_path):
    eqc = _load('maskdm_equal_compute')
    with pytest.raises(SystemExit):
        eqc.main(['--arms', 'transfer', '--out', str(tmp_path)])       # 'transfer' is not an arm of setting 'same'


def test_sadm_finetune_arms_start_from_the_base_and_plain_time_matches_the_clock(tmp_path, capsys):
    sft = _load('sadm_finetune')
    out, S = tmp_path / 'out', 6
    argv = ['model.depth=1', 'sadm.heldout_size=8', '--base', 'smoke', '--base-steps', '4', '--seeds', '0', '1',
            '--evals', '1', '--eval-samples', '40', '--warmup', '1', '--out', str(out),
            '--arms', 'plain', 'sadm', 'plain-time', 'random-encoder', '--steps', str(S)]
    sft.main(argv)
    s = json.loads((out / 'summary.json').read_text())
    plan = json.loads((out / 'plan.json').read_text())
    assert s['steps_time'] == round(S * plan['timing'][0]) and s['arms']['plain-time']['steps'] == s['steps_time']
    assert s['arms']['plain']['steps'] == s['arms']['sadm']['steps'] == S
    for arm, d in s['arms'].items():
        assert len(d['final_fids']) == 2 and d['seeds'] == [0, 1]
        for run in d['runs']:
            cfg = json.loads((Path(run) / 'config.json').read_text())
            assert cfg['train']['init_from'] == str(out / 'base') and cfg['train']['init_weights'] == 'ema'
            assert cfg['sadm']['enabled'] == (arm in ('sadm', 'random-encoder'))
            assert cfg['sadm']['d_steps'] == (0 if arm == 'random-encoder' else 1)
    assert s['arms']['sadm']['heldout_struct_pixels_mean'] > 0 and s['arms']['plain']['heldout_struct_pixels_mean'] is None
    assert (out / 'summary-fid.png').is_file() and '| sadm |' in (out / 'summary.md').read_text()
    sft.main(argv)                                   # a re-run reuses every finished run
    assert json.loads((out / 'summary.json').read_text())['arms']['sadm']['final_fids'] == s['arms']['sadm']['final_fids']
    with pytest.raises(SystemExit):                  # other settings into the same folder are refused
        sft.main([*argv[:-1], '9'])


def test_sadm_toy_and_step_time_scripts_report_every_setting(tmp_path, capsys):
    toy = _load('sadm_toy')
    toy.main(['--steps', '60', '--start', '30', '--warmup', '5', '--batch', '64', '--seeds', '0', '1', '--samples', '200',
              '--sample-steps', '5', '--lambdas', '0.1', '1', '--random-encoder', '--samplers', '2:1',
              '--t-maxes', '0.3', '--equal-time', 'samples λ=1', '--also-ddim', '2', '--out', str(tmp_path / 'toy')])
    s = json.loads((tmp_path / 'toy' / 'summary.json').read_text())
    assert list(s['summary']) == ['plain', 'sadm λ=0.1', 'sadm λ=1', 'linear λ=0.1', 'linear λ=1', 'samples λ=0.1',
                                  'samples λ=1', 'random encoder λ=0.1', 'samples K=2 k=1 λ=0.1',
                                  'linear t_max=0.3 λ=0.1', 'plain, time of samples λ=1']
    assert len(s['runs']) == 22 and (tmp_path / 'toy' / 'toy.png').is_file() and s['time_ratios']['samples λ=1'] > 0
    assert all('swd_ddim2' in r for r in s['runs']) and 'ddim2: SWD' in (tmp_path / 'toy' / 'summary.md').read_text()
    with pytest.raises(SystemExit):                  # an --equal-time name that is not a setting
        toy.main(['--steps', '4', '--start', '2', '--equal-time', 'nope', '--out', str(tmp_path / 'toy2')])
    st = _load('sadm_step_time')
    res = st.main(['--preset', 'smoke', '--reps', '2', '--steps', '1', '--warmup', '1', '--variants', 'all',
                   '--json', str(tmp_path / 'st.json')])
    assert set(res['arms']) == {'plain', *st.VARIANTS} and res['arms']['plain']['ratio_to_plain'] == 1.0
    assert res['arms']['samples K=4 k=1']['extra_ms_per_sampler_step'] is not None
    assert all(r['ms_per_step_median'] > 0 for r in res['arms'].values())
    assert json.loads((tmp_path / 'st.json').read_text())['arms'].keys() == res['arms'].keys()


def test_third_ruler_fid_measures_each_run_with_another_feature_network(tmp_path, monkeypatch):
    from sadm_lab.config import get_config
    from sadm_lab.train import Trainer
    monkeypatch.setenv('SADM_LAB_CACHE', str(tmp_path / 'cache'))
    for seed in (0, 1):
        Trainer(get_config('smoke', ['train.steps=2', 'data.max_images=200', 'eval.num_samples=20', 'sample.steps=2',
                                     f'train.seed={seed}']), tmp_path / f'arm-s{seed}', progress=False).fit()
    third = _load('third_ruler_fid')
    res = third.main([str(tmp_path / 'arm-s0'), str(tmp_path / 'arm-s1'), '--samples', '20',
                      '--json', str(tmp_path / 'third.json')])
    assert [r['arm'] for r in res['runs']] == ['arm', 'arm'] and [r['seed'] for r in res['runs']] == [0, 1]
    assert all(r['fid_third'] > 0 and r['floor_third'] > 0 for r in res['runs'])
    assert res['summary']['arm']['fid_third'][1] > 0                    # two seeds: a spread
    nets = sorted(p.name for p in (tmp_path / 'cache' / 'feature_nets').iterdir() if p.suffix == '.safetensors')
    assert len(nets) == 2                            # the run's own FID classifier and the third one: not the same
    ddim = third.main([str(tmp_path / 'arm-s0'), '--samples', '20', '--sampler', 'ddpm', '--steps', '3'])
    assert ddim['sampler'] == 'ddpm' and ddim['runs'][0]['fid_third'] != res['runs'][0]['fid_third']
    with pytest.raises(SystemExit): third.main([str(tmp_path)])


def test_ruler_summarises_budgets_and_its_runs_serve_the_comparisons(tmp_path, capsys):
    ruler, eqc, sft = _load('ruler'), _load('maskdm_equal_compute'), _load('sadm_finetune')
    rdir, extra = tmp_path / 'ruler', ['model.depth=1', 'eval.num_samples=40']
    ruler.main(['--preset', 'smoke', '--steps', '16', '--eval-every', '8', '--seeds', '0', '1', '--jobs', '1',
                '--out', str(rdir), *extra])
    s = json.loads((rdir / 'summary.json').read_text())
    assert [b['budget'] for b in s['budgets']] == [8, 16] and s['seeds'] == [0, 1]
    for b in s['budgets']:
        assert b['fid_mean'] == pytest.approx(sum(b['fids']) / 2) and b['floor_ratio'] == pytest.approx(b['fid_mean'] / b['floor'])
        assert b['fid_std'] == pytest.approx(abs(b['fids'][0] - b['fids'][1]) / 2 ** 0.5)
    assert set(s['checks']) == {'above the floor', 'still improving', 'seed spread', 'time per arm', 'evaluation share'}
    assert s['ruler'] == all(c['pass'] for c in s['checks'].values())
    means = [b['fid_mean'] for b in s['budgets']]
    assert s['checks']['still improving']['pass'] == (means[1] < means[0])         # improving = FID falls
    assert (rdir / 'fid_vs_budget.png').is_file() and '| budget (steps) |' in capsys.readouterr().out
    # the from-scratch arm of an equal-compute comparison is read from the ruler's runs, not trained again
    args = ['--base', 'smoke', '--steps', '8', '--seeds', '0', '--evals', '1', '--eval-samples', '40', '--arms',
            'scratch', 'maskdm', '--finetune-warmup', '2', '--scratch-runs', str(rdir), '--out', str(tmp_path / 'eqc'),
            'model.depth=1']
    eqc.main(args)
    e = json.loads((tmp_path / 'eqc' / 'summary.json').read_text())
    at8 = [r for r in map(json.loads, (rdir / 'scratch-s0' / 'metrics.jsonl').read_text().splitlines())
           if r.get('kind') == 'eval' and r['step'] == 8]
    assert e['arms']['scratch']['final_fids'] == [at8[0]['fid']] and not (tmp_path / 'eqc' / 'scratch-s0').exists()
    m = e['arms']['maskdm']                           # equal wall-clock: read off the longer from-scratch run
    curve = [(t, r['fid']) for r, t in training_clock(list(map(json.loads, (rdir / 'scratch-s0' / 'metrics.jsonl')
                                                              .read_text().splitlines()))) if r.get('kind') == 'eval']
    assert m['scratch_at_equal_time'] == [eqc.fid_at_time(curve, m['train_s_mean'])]
    assert e['arms']['scratch']['time_curves'] == [[list(x) for x in curve]]        # the whole run, for the plot
    with pytest.raises(SystemExit, match='not this comparison'):     # another model is not its from-scratch arm
        eqc.main([*args[:-1], '--out', str(tmp_path / 'eqc2'), 'model.depth=2'])
    # and a ruler run is the base model of a fine-tuning comparison
    sft.main(['--base', 'smoke', '--base-run', str(rdir / 'scratch-s0'), '--arms', 'plain', '--seeds', '0', '--steps',
              '4', '--evals', '1', '--eval-samples', '40', '--warmup', '1', '--out', str(tmp_path / 'sft'), *extra[:1]])
    f = json.loads((tmp_path / 'sft' / 'summary.json').read_text())
    (run,) = f['arms']['plain']['runs']
    assert json.loads((Path(run) / 'config.json').read_text())['train']['init_from'] == str((rdir / 'scratch-s0').resolve())
    assert f['base_fid'] == s['budgets'][-1]['fids'][0]


def test_one_evaluation_per_arm_skips_the_small_batch_first_stage(tmp_path):
    eqc = _load('maskdm_equal_compute')
    out = tmp_path / 'out'
    eqc.main(['--base', 'smoke', '--steps', '8', '--seeds', '0', '--evals', '1', '--eval-samples', '40', '--arms',
              'small-batch', '--finetune-warmup', '2', '--out', str(out), 'model.depth=1'])
    d = json.loads((out / 'summary.json').read_text())['arms']['small-batch']
    ft = json.loads((Path(d['runs'][0]) / 'config.json').read_text())
    pre = Path(ft['train']['init_from'])
    assert json.loads((pre / 'config.json').read_text())['eval']['enabled'] is False
    assert not [r for r in map(json.loads, (pre / 'metrics.jsonl').read_text().splitlines()) if r.get('kind') == 'eval']
    (curve,) = d['curves']
    assert len(curve) == 1 and abs(curve[0][0] - 8) <= 1          # one point: the end of fine-tuning, at the budget


def test_every_benchmark_but_the_2d_toy_takes_a_device():
    "The same script runs on a GPU unchanged (`--device cuda`); the 2-D toy is CPU-sized by design."
    import ast
    for path in sorted((ROOT / 'benchmarks').glob('[a-z]*.py')):
        if path.stem == 'sadm_toy': continue
        tree = ast.parse(path.read_text())
        flags = {a.value for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, 'attr', '') == 'add_argument'
                 for a in n.args if isinstance(a, ast.Constant)}
        assert '--device' in flags, f'{path.name} has no --device option'


def test_transfer_between_halves_of_the_classes_of_one_dataset(tmp_path):
    eqc = _load('maskdm_equal_compute')
    out = tmp_path / 'out'
    eqc.main(['--setting', 'transfer', '--base', 'smoke', '--steps', '8', '--seeds', '0', '--evals', '1',
              '--eval-samples', '40', '--target-images', '50', '--source', 'digits', '--source-classes', '0-4',
              '--target-classes', '5-9', '--arms', 'transfer', '--finetune-warmup', '2', '--out', str(out),
              'model.depth=1'])
    (run,) = json.loads((out / 'summary.json').read_text())['arms']['transfer']['runs']
    ft = json.loads((Path(run) / 'config.json').read_text())
    pre = json.loads((Path(ft['train']['init_from']) / 'config.json').read_text())
    assert (pre['data']['classes'], pre['data']['max_images'], pre['mask']['strategy']) == ('0-4', None, 'patch')
    assert (ft['data']['classes'], ft['data']['max_images'], ft['mask']['strategy']) == ('5-9', 50, 'none')


def test_fid_at_time_interpolates_log_fid_inside_the_curve_only():
    eqc = _load('maskdm_equal_compute')
    curve = [(10.0, 100.0), (20.0, 25.0), (40.0, 16.0)]
    assert eqc.fid_at_time(curve, 15.0) == pytest.approx(50.0)        # geometric mean of 100 and 25
    assert eqc.fid_at_time(curve, 30.0) == pytest.approx(20.0)        # sqrt(25 * 16)
    assert eqc.fid_at_time(curve, 20.0) == pytest.approx(25.0) and eqc.fid_at_time(curve, 40.0) == pytest.approx(16.0)
    assert eqc.fid_at_time(curve, 9.9) is None and eqc.fid_at_time(curve, 40.1) is None


def test_ruler_passes_its_overrides_to_parallel_workers(tmp_path):
    "With --jobs 2 each seed runs in a worker process: the key=value overrides must reach it (they once became seeds)."
    ruler = _load('ruler')
    ruler.main(['--preset', 'smoke', '--steps', '4', '--eval-every', '2', '--seeds', '0', '1', '--jobs', '2',
                '--out', str(tmp_path / 'r'), 'model.depth=1', 'eval.num_samples=40', 'train.precision=fp32'])
    for s in (0, 1):
        cfg = json.loads((tmp_path / 'r' / f'scratch-s{s}' / 'config.json').read_text())
        assert cfg['model']['depth'] == 1 and cfg['train']['precision'] == 'fp32'
