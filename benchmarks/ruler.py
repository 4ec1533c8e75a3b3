#!/usr/bin/env python
"""Is a benchmark setting a ruler that can tell methods apart? Train from scratch with several seeds, measure FID at
several budgets, and check the requirements of a discriminating comparison, each with its number:

  above the floor   the from-scratch FID at every budget is at least `--min-floor-ratio` (3) times the real-vs-real
                    floor of the same protocol (below a few times the floor, FIDs stop separating methods);
  still improving   the mean FID falls from each budget to the next (the runs are not saturated);
  seed spread       the seed standard deviation of FID is at most `--max-cv` (5%) of its mean at every budget, so a
                    10-15% difference between two methods shows with 3 seeds;
  time per arm      one run to the largest budget trains in at most `--max-arm-min` (20) minutes on this machine;
  evaluation share  one FID evaluation takes at most `--max-eval-share` (15%) of an arm's training time.

Budgets are every `--eval-every` steps up to `--steps` (constant learning rate after warm-up, so FID at step b of a
longer run is FID at budget b). The setting is a preset with overrides; the default, `fashion16-dit`, is the one this
project chose with this script: Fashion-MNIST at 16x16, DiT-T/4 (16 tokens), batch 128, precision `auto` (bf16
where the CPU has it natively, else fp32), FID of 5,000 samples (DPM-Solver++(2M), 20 steps) with the shipped
classifier features against the test split. Before it starts it times a few steps and a sampling batch on this machine
and prints the time it expects (`--estimate` prints only that). Written to `--out`: summary.json (with the machine:
`sadm-lab env`), summary.md (the table and the verdicts) and fid_vs_budget.png. A re-run reuses finished runs and
resumes interrupted ones. `--device cuda` and a larger preset (e.g. `cifar10-dit`) run the same check on a GPU.

    python benchmarks/ruler.py                                   # 3 seeds x 1,600 steps: ~30 min on 2 cores (2 jobs)
    python benchmarks/ruler.py --jobs 1 --seeds 0 1 2 3 4        # more seeds, one run at a time
    python benchmarks/ruler.py --preset digits-dit --steps 1500 --eval-every 500 --out runs/ruler-digits  # the old one
    python benchmarks/ruler.py --preset cifar10-dit --device cuda --out runs/ruler-cifar10   # CIFAR-10 32x32 on a GPU
"""
from __future__ import annotations
import argparse, json, os, statistics, subprocess, sys
from pathlib import Path

from _common import fit_run, machine  # noqa: E402  (benchmarks/ is on sys.path as the script dir)
from sadm_lab.config import get_config  # noqa: E402
from sadm_lab.core import atomic_write_json, atomic_write_text  # noqa: E402


def run_overrides(a, seed: int) -> list[str]:
    return [f'name=scratch-s{seed}', f'train.seed={seed}', f'train.steps={a.steps}', f'train.eval_every={a.eval_every}',
            f'train.ckpt_every={a.eval_every}', f'train.device={a.device}', *a.overrides]


def one_run(a, seed: int) -> dict:
    cfg = get_config(a.preset, run_overrides(a, seed))
    return fit_run(cfg, Path(a.out) / f'scratch-s{seed}', progress=a.progress)


def run_all(a) -> list[dict]:
    "Every seed's run: in this process (`--jobs 1`) or `--jobs` at a time in subprocesses of one thread each."
    if a.jobs <= 1: return [one_run(a, s) for s in a.seeds]
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    base = [sys.executable, __file__, '--preset', a.preset, '--steps', str(a.steps), '--eval-every', str(a.eval_every),
            '--device', a.device, '--out', a.out, '--jobs', '1', '--worker']
    todo, procs = list(a.seeds), []
    while todo or procs:
        while todo and len(procs) < a.jobs:
            s = todo.pop(0)
            log = open(Path(a.out) / f'scratch-s{s}.log', 'a')
            procs.append((s, subprocess.Popen([*base, *a.overrides, '--seeds', str(s)], env=env, stdout=log,
                                              stderr=subprocess.STDOUT), log))
        s, p, log = procs.pop(0)
        if p.wait() != 0: sys.exit(f'the run of seed {s} failed: see {log.name}')
        log.close()
    return [one_run(a, s) for s in a.seeds]      # all finished: reads them back


def summarise(a, runs: list[dict]) -> dict:
    budgets = sorted({e['step'] for r in runs for e in r['evals']})
    rows = []
    for b in budgets:
        es = [next(e for e in r['evals'] if e['step'] == b) for r in runs]
        fids = [e['fid'] for e in es]
        mean = statistics.mean(fids)
        std = statistics.stdev(fids) if len(fids) > 1 else 0.0
        floor = statistics.mean(e['fid_floor'] for e in es)
        rows.append(dict(budget=b, fid_mean=mean, fid_std=std, cv=std / mean, fids=fids, floor=floor,
                         floor_ratio=mean / floor, train_s=statistics.mean(e['train_s'] for e in es),
                         eval_s=statistics.mean(e['seconds'] for e in es),
                         precision=_mean(es, 'precision'), recall=_mean(es, 'recall')))
    arm_s = statistics.mean(r['train_s'] for r in runs)
    eval_s = statistics.mean(row['eval_s'] for row in rows)
    improving = all(later['fid_mean'] < earlier['fid_mean'] for earlier, later in zip(rows, rows[1:]))   # FID falls
    checks = {
        'above the floor': (min(r['floor_ratio'] for r in rows) >= a.min_floor_ratio,
                            f"lowest FID / floor {min(r['floor_ratio'] for r in rows):.1f} (need >= {a.min_floor_ratio})"),
        'still improving': (improving, 'mean FID ' + ' > '.join(f"{r['fid_mean']:.2f}" for r in rows)),
        'seed spread': (max(r['cv'] for r in rows) <= a.max_cv,
                        f"largest std / mean {100 * max(r['cv'] for r in rows):.1f}% (need <= {100 * a.max_cv:.0f}%)"),
        'time per arm': (arm_s / 60 <= a.max_arm_min, f"{arm_s / 60:.1f} min to step {a.steps} (need <= {a.max_arm_min})"),
        'evaluation share': (eval_s / arm_s <= a.max_eval_share,
                             f"one evaluation {eval_s:.0f} s = {100 * eval_s / arm_s:.0f}% of an arm "
                             f"(need <= {100 * a.max_eval_share:.0f}%)"),
    }
    cfg = get_config(a.preset, run_overrides(a, a.seeds[0]))
    e0 = runs[0]['evals'][-1]
    return dict(preset=a.preset, overrides=a.overrides, seeds=a.seeds, steps=a.steps, device=a.device,
                threads=os.environ.get('OMP_NUM_THREADS'), jobs=a.jobs,
                protocol=dict(samples=cfg.eval.num_samples, reference=cfg.eval.reference, features=e0.get('features'),
                              features_version=e0.get('features_version'), n_ref=e0.get('n_ref'),
                              sampler=cfg.sample.sampler, steps=cfg.sample.steps, sample_precision=_used(runs, 'sample'),
                              train_precision=_used(runs, 'train')),
                env=machine(a.device), expected=getattr(a, 'expected', None),
                arm_train_s=arm_s, eval_s=eval_s, budgets=rows,
                checks={k: {'pass': ok, 'detail': d} for k, (ok, d) in checks.items()},
                ruler=all(ok for ok, _ in checks.values()), runs=[r['run'] for r in runs])


def expected_time(a) -> dict:
    """Seconds one arm should take here, from a few timed steps and one timed sampling batch of the preset on one
    thread (as each job runs): training, one evaluation (sampling `eval.num_samples` images; the feature pass and
    the floor are a few seconds more) and the arm with all its evaluations."""
    import tempfile, time
    import torch
    from sadm_lab.train import Trainer
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = get_config(a.preset, run_overrides(a, a.seeds[0]) + ['eval.enabled=false'])
            tr = Trainer(cfg, Path(tmp) / 'probe', progress=False)
            for _ in range(2): tr.train_step()                      # warm-up
            t0 = time.perf_counter()
            for _ in range(5): tr.train_step()
            step_s = (time.perf_counter() - t0) / 5
            n = min(cfg.sample.batch_size, cfg.eval.num_samples)
            t0 = time.perf_counter(); tr.sample_images(n); batch_s = time.perf_counter() - t0
    finally: torch.set_num_threads(threads)
    eval_s = batch_s * cfg.eval.num_samples / n
    evals = a.steps // a.eval_every
    arm_s = a.steps * step_s + evals * eval_s
    return dict(step_s=step_s, train_s=a.steps * step_s, eval_s=eval_s, arm_s=arm_s, precision=tr.precision_note,
                all_s=arm_s * -(-len(a.seeds) // max(a.jobs, 1)))


def _used(runs, what: str):
    "The precision the runs trained / sampled in, as their start events record it ('auto' resolved)."
    from sadm_lab.train import RunDir
    used = {(next((r.get('precision') or {} for r in RunDir(run['run']).read_metrics() if r.get('event') == 'start'),
                  {})).get(what) for run in runs}
    return used.pop() if len(used) == 1 else sorted(map(str, used))


def _mean(es, k):
    v = [e[k] for e in es if k in e]
    return statistics.mean(v) if len(v) == len(es) else None


def markdown(s) -> str:
    p = s['protocol']
    lines = [f"# Is `{s['preset']}` a ruler? {len(s['seeds'])} seeds from scratch", '',
             f"Trained in {p['train_precision']}; FID of {p['samples']} samples ({p['sampler']}, {p['steps']} steps, "
             f"{p['sample_precision']}) with {p['features']} features (`{p['features_version']}`) against {p['n_ref']} "
             f"images of the {p['reference']} split; floor = the same protocol with held-out real images. Training "
             f"time excludes evaluations. Machine: {s['env']['cpu']} ({s['env']['cpu_kind']}, PyTorch dispatch "
             f"{s['env']['torch_cpu_capability']}), {s['jobs']} job(s) of {s['threads'] or '?'} thread(s).", '',
             '| budget (steps) | FID mean ± std | std / mean | per seed | floor | FID / floor | training (s) |',
             '|---|---|---|---|---|---|---|']
    for r in s['budgets']:
        lines.append(f"| {r['budget']} | {r['fid_mean']:.2f} ± {r['fid_std']:.2f} | {100 * r['cv']:.1f}% | "
                     f"{', '.join(f'{x:.2f}' for x in r['fids'])} | {r['floor']:.2f} | {r['floor_ratio']:.1f} | "
                     f"{r['train_s']:.0f} |")
    lines += ['', '| requirement | met | measured |', '|---|---|---|']
    lines += [f"| {k} | {'yes' if c['pass'] else '**no**'} | {c['detail']} |" for k, c in s['checks'].items()]
    lines += ['', f"**{'A ruler' if s['ruler'] else 'Not a ruler'}** by these requirements.", '',
              '![FID vs budget](fid_vs_budget.png)', '']
    return '\n'.join(lines)


def plot(s, out: Path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=80)
    b = [r['budget'] for r in s['budgets']]
    for i in range(len(s['seeds'])):
        ax.plot(b, [r['fids'][i] for r in s['budgets']], 'o-', color='C0', alpha=0.6, ms=3,
                label='from scratch, one line per seed' if i == 0 else None)
    ax.plot(b, [r['floor'] for r in s['budgets']], '--', color='gray', label='real-vs-real floor')
    ax.plot(b, [3 * r['floor'] for r in s['budgets']], ':', color='gray', label='3 x floor')
    ax.set_xlabel('training steps'); ax.set_ylabel('FID'); ax.set_yscale('log'); ax.grid(alpha=0.3)
    ax.legend(fontsize=7); fig.tight_layout(); fig.savefig(out / 'fid_vs_budget.png'); plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='\n'.join(__doc__.split('\n')[1:]))
    p.add_argument('--preset', default='fashion16-dit')
    p.add_argument('--steps', type=int, help="the largest budget (default: the preset's train.steps)")
    p.add_argument('--eval-every', type=int, help="budget spacing (default: the preset's train.eval_every)")
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--jobs', type=int, default=2, help='runs at a time, one thread each (1: in this process)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--min-floor-ratio', type=float, default=3.0)
    p.add_argument('--max-cv', type=float, default=0.05)
    p.add_argument('--max-arm-min', type=float, default=20.0)
    p.add_argument('--max-eval-share', type=float, default=0.15)
    p.add_argument('--out', default='runs/ruler')
    p.add_argument('--progress', action='store_true')
    p.add_argument('--estimate', action='store_true', help='print the expected time on this machine and exit')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('overrides', nargs='*', help='extra key=value for every run')
    a = p.parse_args(argv)
    cfg = get_config(a.preset, a.overrides)
    a.steps = a.steps or cfg.train.steps
    a.eval_every = a.eval_every or cfg.train.eval_every or a.steps
    if a.steps // a.eval_every < 2: p.error('need at least 2 budgets: lower --eval-every')
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.worker:
        for s in a.seeds: one_run(a, s)
        return
    a.expected = e = expected_time(a)
    print(f"expected on this machine ({e['precision']['train']}: {e['precision']['why']}): {e['step_s']:.2f} s a step, "
          f"{e['eval_s']:.0f} s an evaluation, {e['arm_s'] / 60:.0f} min an arm, about {e['all_s'] / 60:.0f} min for "
          f"{len(a.seeds)} seed(s) with {a.jobs} job(s)", flush=True)
    if a.estimate: return
    s = summarise(a, run_all(a))
    out = Path(a.out)
    atomic_write_json(out / 'summary.json', s)
    plot(s, out)
    md = markdown(s)
    atomic_write_text(out / 'summary.md', md)
    print(md)
    print(json.dumps({k: v for k, v in s.items() if k != 'runs'}))


if __name__ == '__main__':
    main()
