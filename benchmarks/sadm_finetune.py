#!/usr/bin/env python
"""Does SADM's structure term improve a pretrained diffusion model? Plain denoising fine-tuning against SADM
fine-tuning from the same checkpoint, at equal steps and at equal wall-clock, over several seeds, plus the ablations
a researcher asks for first.

One plain run of `--base` for `--base-steps` steps (seed 0), or the finished run `--base-run`, is the pretrained
model. Every arm fine-tunes its EMA
weights for S = `--steps` steps (fresh AdamW and EMA, `--warmup` warm-up steps) with seed-dependent data order, noise
and encoder initialisation:
  plain            S steps of denoising training (sadm.enabled=false);
  sadm             S steps with the structure term at its defaults (λ = `--lam`);
  plain-time       plain fine-tuning for as long as the sadm arm takes: round(S x r) steps, r the measured step-time
                   ratio sadm / plain (interleaved repetitions on this machine before the runs, kept in plan.json).
With `--ablations` (all at S steps, every other option at its default):
  lam=X            each λ in `--lambdas` (λ = 0 would train the discriminator and log, the denoiser plain: tested to
                   equal plain fine-tuning bit for bit, so it is not in the default grid);
and, at λ = `--ablation-lam` (default 0.1: large enough that the term changes the result beyond seed noise, so the
choices below can be told apart):
  random-encoder   a fixed random encoder (sadm.d_steps=0): is the adversarial game needed, or any embedding will do?
  time-cond        a timestep-conditioned encoder (it judges each prediction knowing its noise level);
  gaussian, softmax  the other affinities;
  t_max=X          each t-range in `--t-maxes` (the term sees predictions at t < t_max·T);
  omega=dsm        within the t-range, each sample weighted by the denoising loss's own x0-space weight (capped).
With `--variants`, the consistent variants of the structure term (`sadm.variant`), at λ = `--ablation-lam`:
  linear           the unbiased linear game; samples: MMD² of a 2-step DDIM sampler's output against data (gradients
  through its last step), samples-sn the same with a spectral-normalised discriminator; representation: the hidden
  tokens' structure against a frozen outside classifier's.
FID (classifier features, `--eval-samples` samples, against the whole training split, with its real-vs-real floor)
and the memorisation check at `--evals` points of each fine-tuning; the structure distance between held-out images
and the model's one-step predictions of them, in pixel space, is logged by the SADM arms. Written to `--out`:
<name>.json, <name>.md and <name>-fid.png (`--name`, default summary).
Running the same command again reuses finished runs and resumes interrupted ones; `--jobs 2` trains two runs at a
time (one thread each). Results are what they are: the script makes no claim either way.

    python benchmarks/sadm_finetune.py                         # digits, DiT-T/2, 3 seeds, main arms (~25 min, 2 cores)
    python benchmarks/sadm_finetune.py --ablations --jobs 2    # + λ grid, random encoder, affinities, t-range
"""
from __future__ import annotations
import argparse, json, multiprocessing, statistics, tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from _common import fit_run, interleaved_times, machine  # noqa: E402  (benchmarks/ is on sys.path as the script dir)
from sadm_lab.config import get_config  # noqa: E402
from sadm_lab.core import atomic_write_json, atomic_write_text  # noqa: E402
from sadm_lab.train import Trainer, RunDir  # noqa: E402

MAIN = ('plain', 'sadm', 'plain-time')
VARIANT_ARMS = {       # the consistent variants (sadm_lab.structure_variants), at λ = --ablation-lam
    'linear': ['sadm.variant=linear'],
    'samples': ['sadm.variant=samples', 'sadm.sampler_steps=2', 'sadm.grad_steps=1'],
    'representation': ['sadm.variant=representation'],
    'samples-sn': ['sadm.variant=samples', 'sadm.sampler_steps=2', 'sadm.grad_steps=1', 'sadm.spectral_norm=true'],
}


def arm_overrides(arm: str, a) -> list[str]:
    "The sadm.* settings of an arm."
    on = ['sadm.enabled=true', 'sadm.variant=literal', f'sadm.weight={a.ablation_lam}']   # literal unless a variant
    if arm in ('plain', 'plain-time'): return []
    if arm == 'sadm': return ['sadm.enabled=true', 'sadm.variant=literal', f'sadm.weight={a.lam}']
    if arm.startswith('lam='): return ['sadm.enabled=true', 'sadm.variant=literal', f'sadm.weight={arm[4:]}']
    if arm == 'random-encoder': return on + ['sadm.d_steps=0']
    if arm in ('gaussian', 'softmax'): return on + [f'sadm.affinity={arm}']
    if arm == 'time-cond': return on + ['sadm.time_cond=true']
    if arm.startswith('t_max='): return on + [f'sadm.t_max={arm[6:]}']
    if arm.startswith('omega='): return on + [f'sadm.omega={arm[6:]}']
    if arm in VARIANT_ARMS: return ['sadm.enabled=true', f'sadm.weight={a.ablation_lam}', *VARIANT_ARMS[arm]]
    raise ValueError(f'unknown arm {arm!r}')


def step_time_ratio(common: list[str], a, tmp: Path, reps=5, steps=4) -> tuple[float, float, float]:
    "Median seconds per step of the sadm arm over the plain arm, interleaved repetitions after warm-up."
    trs = {arm: Trainer(get_config(a.base, [*common, 'train.steps=100000', 'eval.enabled=false', *arm_overrides(arm, a)]),
                        tmp / arm, progress=False) for arm in ('plain', 'sadm')}
    times = interleaved_times({arm: tr.train_step for arm, tr in trs.items()}, reps=reps, steps=steps, warmup=2,
                              device=trs['plain'].device)
    ts, tp = statistics.median(times['sadm']), statistics.median(times['plain'])
    return ts / tp, ts, tp


def run_arm(arm: str, seed: int, plan: dict, a) -> dict:
    "Fine-tune the base model as `arm` says for `seed`; its FID curve and last logged structure distances."
    if a.jobs > 1:
        import torch; torch.set_num_threads(1)
    steps = plan['steps_time'] if arm == 'plain-time' else a.steps
    cfg = get_config(a.base, [f'name={arm}-s{seed}', *plan['common'], f'train.seed={seed}', f'train.steps={steps}',
                              f'train.init_from={plan["base_run"]}', 'train.init_weights=ema',
                              f'train.warmup_steps={a.warmup}', f'train.eval_every={max(1, steps // a.evals)}',
                              *arm_overrides(arm, a)])
    r = fit_run(cfg, Path(a.out) / f'{arm}-s{seed}', progress=a.progress)
    train = [x for x in RunDir(r['run']).read_metrics() if x.get('kind') == 'train']
    last = {k: train[-1].get(k) for k in ('g_struct', 'd_obj', 'heldout_struct', 'heldout_struct_pixels', 'g_mmd',
                                          'd_mmd', 'g_repr', 'p_repr')}
    return r | {'arm': arm, 'seed': seed, 'steps': steps, 'last': last}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='\n'.join(__doc__.split('\n')[1:]))
    p.add_argument('--base', default='digits-dit', help='preset of the base run and of every fine-tuning')
    p.add_argument('--base-steps', type=int, default=600)
    p.add_argument('--base-run', help='fine-tune this finished run (same preset) instead of training a base run')
    p.add_argument('--steps', type=int, default=400, help='fine-tuning steps S')
    p.add_argument('--warmup', type=int, default=25)
    p.add_argument('--lam', type=float, default=None, help="λ of the sadm arm (default: the config's sadm.weight)")
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--arms', nargs='+', help='arms to run (default: plain sadm plain-time, plus the ablations)')
    p.add_argument('--ablations', action='store_true')
    p.add_argument('--variants', action='store_true',
                   help='+ the consistent variants linear, samples (K=2, k=1), representation at λ = --ablation-lam')
    p.add_argument('--lambdas', type=float, nargs='+', default=[0.001, 0.1, 1.0])
    p.add_argument('--ablation-lam', type=float, default=0.1, help='λ of the ablation arms other than the λ grid')
    p.add_argument('--name', default='summary', help='file name stem of the summary (several invocations, one --out)')
    p.add_argument('--t-maxes', type=float, nargs='+', default=[0.2])
    p.add_argument('--evals', type=int, default=2, help='FID points per fine-tuning run')
    p.add_argument('--eval-samples', type=int, default=800)
    p.add_argument('--jobs', type=int, default=1, help='runs trained at a time (each on one thread when > 1)')
    p.add_argument('--device', default='cpu', help='where every run trains and is evaluated (e.g. cuda)')
    p.add_argument('--out', default='runs/sadm-finetune')
    p.add_argument('--progress', action='store_true')
    p.add_argument('overrides', nargs='*', help='extra key=value for every run (base included)')
    a = p.parse_args(argv)
    if a.lam is None: a.lam = get_config(a.base).sadm.weight
    arms = a.arms or [*MAIN, *((f'lam={x:g}' for x in a.lambdas) if a.ablations else ()),
                      *(('random-encoder', 'time-cond', 'gaussian', 'softmax', *(f't_max={x:g}' for x in a.t_maxes), 'omega=dsm')
                        if a.ablations else ()), *(VARIANT_ARMS if a.variants else ())]
    for arm in arms:
        try: arm_overrides(arm, a)
        except ValueError as e: p.error(str(e))
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    common = ['train.sample_every=0', f'eval.num_samples={a.eval_samples}', 'train.ckpt_every=500',
              f'train.device={a.device}', *a.overrides]
    key = {k: v for k, v in vars(a).items() if k not in ('seeds', 'arms', 'progress', 'out', 'jobs', 'ablations', 'variants',
                                                         'lambdas', 't_maxes', 'ablation_lam', 'name')}
    saved = json.loads((out / 'plan.json').read_text()) if (out / 'plan.json').is_file() else None
    if saved is not None and saved['settings'] != key:
        diff = ', '.join(f'{k}: {saved["settings"].get(k)!r} -> {v!r}' for k, v in key.items() if saved['settings'].get(k) != v)
        p.error(f'{out} holds a comparison with other settings ({diff}); use another --out')
    if a.base_run:                  # a finished run (e.g. ruler.py's scratch-s0): its last checkpoint and evaluation
        recs = RunDir(a.base_run).read_metrics()
        evals = [r for r in recs if r.get('kind') == 'eval']
        if not evals or not any(r.get('event') == 'end' for r in recs):
            p.error(f'--base-run {a.base_run}: not a finished run with an evaluation')
        base, a.base_steps = {'run': str(Path(a.base_run).resolve()), 'evals': evals}, evals[-1]['step']
    else:
        base = fit_run(get_config(a.base, ['name=base', *common, 'train.seed=0', f'train.steps={a.base_steps}',
                                           f'train.eval_every={a.base_steps}']), out / 'base', progress=a.progress)
    print(f"base: {a.base_steps} plain steps, FID {base['evals'][-1]['fid']:.2f} (floor {base['evals'][-1]['fid_floor']:.2f})", flush=True)
    if saved is None:
        if a.jobs > 1:                               # time the steps as the runs will take them: one thread each
            import torch; torch.set_num_threads(1)
        with tempfile.TemporaryDirectory(prefix='sadm-probe-') as tmp:
            timing = step_time_ratio(common, a, Path(tmp))
        atomic_write_json(out / 'plan.json', {'settings': key, 'timing': timing})
    else: timing = saved['timing']
    plan = {'common': common, 'base_run': base['run'], 'steps_time': round(a.steps * timing[0])}
    print(f"step time: sadm {1e3 * timing[1]:.0f} ms, plain {1e3 * timing[2]:.0f} ms (ratio {timing[0]:.3f}); "
          f"plain-time fine-tunes {plan['steps_time']} steps", flush=True)
    jobs = [(arm, seed) for seed in a.seeds for arm in arms]
    if a.jobs > 1:
        with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context('spawn')) as ex:   # no fork after torch
            results = list(ex.map(run_arm, *zip(*jobs), [plan] * len(jobs), [a] * len(jobs)))
    else: results = [run_arm(arm, seed, plan, a) for arm, seed in jobs]
    for r in results: print(f"{r['arm']:>15} seed {r['seed']}: FID {r['evals'][-1]['fid']:.3f} ({r['train_s']:.0f} s)")
    summary = {'config': vars(a), 'env': machine(a.device), 'base_fid': base['evals'][-1]['fid'], 'floor': base['evals'][-1]['fid_floor'],
               'step_time_ratio': timing[0], 'step_ms': {'sadm': 1e3 * timing[1], 'plain': 1e3 * timing[2]},
               'steps_time': plan['steps_time'], 'arms': {}}
    for arm in arms:
        rs = [r for r in results if r['arm'] == arm]
        fids = [r['evals'][-1]['fid'] for r in rs]
        nn = [r['evals'][-1].get('nn_ratio') for r in rs]
        held = [r['last']['heldout_struct_pixels'] for r in rs]
        summary['arms'][arm] = {
            'overrides': arm_overrides(arm, a), 'steps': rs[0]['steps'], 'seeds': [r['seed'] for r in rs],
            'final_fid_mean': statistics.mean(fids), 'final_fid_std': statistics.stdev(fids) if len(fids) > 1 else 0.0,
            'final_fids': fids, 'nn_ratio_mean': statistics.mean(nn) if None not in nn else None,
            'copy_fraction_max': max((r['evals'][-1].get('copy_fraction') or 0) for r in rs),
            'heldout_struct_pixels_mean': statistics.mean(held) if None not in held else None,
            'train_s_mean': statistics.mean(r['train_s'] for r in rs),
            'curves': [[(e['step'], e['train_s'], e['fid']) for e in r['evals']] for r in rs], 'runs': [r['run'] for r in rs]}
    atomic_write_json(out / f'{a.name}.json', summary)
    _plot(summary, out / f'{a.name}-fid.png')
    md = _markdown(summary, a)
    atomic_write_text(out / f'{a.name}.md', md)
    print(md)
    print(json.dumps({k: v for k, v in summary.items() if k != 'arms'} |
                     {arm: {k: v for k, v in d.items() if k not in ('curves', 'runs')} for arm, d in summary['arms'].items()}))


def _markdown(s, a) -> str:
    lines = [f"# SADM fine-tuning vs plain fine-tuning: `{a.base}`, {len(a.seeds)} seed{'s' if len(a.seeds) > 1 else ''}", '',
             f"Base: {a.base_steps} plain steps, FID {s['base_fid']:.2f}. Every arm fine-tunes its EMA weights for "
             f"{a.steps} steps (plain-time: {s['steps_time']}, as long as the sadm arm; measured step time sadm "
             f"{s['step_ms']['sadm']:.0f} ms vs plain {s['step_ms']['plain']:.0f} ms, ratio {s['step_time_ratio']:.3f}). "
             f"λ of the sadm arm: {a.lam:g}; of the ablation arms: {a.ablation_lam:g} unless named.", '',
             '| arm | settings | steps | final FID (mean ± std) | per seed | NN ratio | held-out structure distance (pixels) | training time (s) |',
             '|---|---|---|---|---|---|---|---|']
    for arm, d in s['arms'].items():
        nn = f"{d['nn_ratio_mean']:.2f}" if d['nn_ratio_mean'] is not None else '–'
        hs = f"{d['heldout_struct_pixels_mean']:.2e}" if d['heldout_struct_pixels_mean'] is not None else '–'
        st = ' '.join(o for o in d['overrides'] if o != 'sadm.enabled=true') or '–'
        lines.append(f"| {arm} | {st} | {d['steps']} | {d['final_fid_mean']:.3f} ± {d['final_fid_std']:.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in d['final_fids'])} | {nn} | {hs} | {d['train_s_mean']:.0f} |")
    lines += ['', f"Real-vs-real floor of the same protocol: {s['floor']:.2f}. NN ratio: median distance of a sample to "
              "its nearest training image over that of held-out real images (about 1 = fresh, near 0 = copies).", '',
              f'![FID]({a.name}-fid.png)', '']
    return '\n'.join(lines)


def _plot(s, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    arms = list(s['arms'])
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(arms) + 1.5), 3.2), dpi=80)
    for i, arm in enumerate(arms):
        f = s['arms'][arm]['final_fids']
        ax.scatter([i] * len(f), f, color=f'C{i % 10}', s=14)
        ax.errorbar([i], [statistics.mean(f)], yerr=[statistics.stdev(f) if len(f) > 1 else 0], fmt='_', color='k', ms=14)
    ax.axhline(s['base_fid'], ls=':', color='gray', label='base model')
    ax.set_xticks(range(len(arms))); ax.set_xticklabels(arms, rotation=35, ha='right', fontsize=8)
    ax.set_ylabel('final FID'); ax.set_yscale('log'); ax.legend(fontsize=7); ax.grid(alpha=0.3)
    fig.tight_layout(); fig.savefig(path); plt.close(fig)


if __name__ == '__main__':
    main()
