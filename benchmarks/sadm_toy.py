#!/usr/bin/env python
"""SADM on 2-D toys: plain denoising training against training whose second half adds a structure term — the literal
SADM term and the consistent variants (`sadm.variant`) — with exact sample metrics, several seeds, on a CPU.

Every setting trains a `sadm_lab.toy.ToyDenoiser` for `--steps` steps (batch `--batch`) from the same data and
initial weights per seed; the structure settings switch their term on at `--start` (a pretrained model fine-tuned,
SADM's setting) with a `--warmup`-step λ ramp. Settings: plain; each variant in `--variants` at each λ in
`--lambdas`; with `--random-encoder` the literal term with a fixed random encoder (`d_steps=0`) at the first λ; with
`--equal-time NAME` a plain arm trained for as long as the setting NAME took (its fine-tuning steps times the
measured time ratio, from the runs of the first seed); ablations: `--samplers K:k ...` (the samples variant with a
K-step sampler, gradients through the last k, at the first λ) and `--t-maxes` (the linear variant's t-range, at the
first λ). Each model is sampled (DDPM, `--sample-steps`) with the same noise, and measured against a fresh real set
of the same size: sliced Wasserstein-2, MMD², high-quality fraction (within 3σ of a mode), modes covered,
mode-histogram TV, and the TV distance between pair-wise distance histograms; `--also-ddim K` measures each model
with a K-step DDIM sampler too, x̂0 clipped at ±2 (the chain the samples variant trains). Written to `--out`: summary.json,
summary.md (mean ± std over seeds) and toy.png (samples and distance histograms of the first seed).

    python benchmarks/sadm_toy.py                                        # 8 Gaussians, 3 seeds, every variant
    python benchmarks/sadm_toy.py --variants literal --lambdas 0.1 1 --random-encoder
    python benchmarks/sadm_toy.py --variants samples --lambdas 1 --samplers 2:1 8:1 4:2 --equal-time "samples λ=1"
"""
from __future__ import annotations
import argparse, json, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from sadm_lab.core import atomic_write_json, atomic_write_text  # noqa: E402
from sadm_lab.toy import TOYS, compare_toy, summarize, plot_toy  # noqa: E402

KEYS = ('swd', 'mmd2', 'hq', 'covered', 'mode_tv', 'pdist_tv', 'train_s')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='\n'.join(__doc__.split('\n')[1:]))
    p.add_argument('--kind', choices=TOYS, default='gaussians')
    p.add_argument('--steps', type=int, default=6000)
    p.add_argument('--start', type=int, default=3000, help='step where the structure term starts')
    p.add_argument('--warmup', type=int, default=200)
    p.add_argument('--batch', type=int, default=512)
    p.add_argument('--variants', nargs='+', default=['literal', 'linear', 'samples'],
                   help="sadm.variant values (the toy has no hidden tokens: 'representation' does not apply)")
    p.add_argument('--lambdas', type=float, nargs='+', default=[1.0])
    p.add_argument('--random-encoder', action='store_true', help='+ the literal term with a fixed random encoder')
    p.add_argument('--equal-time', nargs='*', default=[], metavar='NAME',
                   help='+ a plain arm as long (wall-clock) as each named setting')
    p.add_argument('--samplers', nargs='*', default=[], metavar='K:k', help='samples-variant sampler ablation')
    p.add_argument('--t-maxes', type=float, nargs='*', default=[], help='linear-variant t-range ablation')
    p.add_argument('--t-max', type=float, default=0.5)
    p.add_argument('--d-lr', type=float, default=1e-3)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--samples', type=int, default=2000)
    p.add_argument('--sample-steps', type=int, default=100)
    p.add_argument('--also-ddim', type=int, nargs='*', default=[], metavar='K',
                   help='also measure each model with K-step DDIM (what the samples variant trains)')
    p.add_argument('--out', default='runs/sadm-toy')
    a = p.parse_args(argv)
    if not 0 <= a.start < a.steps: p.error('--start must be in [0, --steps)')
    sadm = {'start_step': a.start, 'warmup_steps': a.warmup, 't_max': a.t_max, 'd_lr': a.d_lr}
    lam0 = a.lambdas[0]
    settings = {'plain': {}}
    for v in a.variants:
        settings.update({(f'sadm λ={x:g}' if v == 'literal' else f'{v} λ={x:g}'):
                         {'lam': x, 'sadm': {**sadm, 'variant': v}} for x in a.lambdas})
    if a.random_encoder:
        settings[f'random encoder λ={lam0:g}'] = {'lam': lam0, 'sadm': {**sadm, 'variant': 'literal', 'd_steps': 0}}
    for spec in a.samplers:
        try: K, k = (int(x) for x in spec.split(':'))
        except ValueError: p.error(f'--samplers takes K:k pairs such as 4:1, got {spec!r}')
        settings[f'samples K={K} k={k} λ={lam0:g}'] = {'lam': lam0, 'sadm': {**sadm, 'variant': 'samples',
                                                                           'sampler_steps': K, 'grad_steps': k}}
    for tm in a.t_maxes:
        settings[f'linear t_max={tm:g} λ={lam0:g}'] = {'lam': lam0, 'sadm': {**sadm, 'variant': 'linear', 't_max': tm}}
    unknown = [n for n in a.equal_time if n not in settings]
    if unknown: p.error(f'--equal-time names settings that are not run: {unknown}; run: {list(settings)}')
    also = {f'ddim{k}': ('ddim', k, 2.0) for k in a.also_ddim}      # the chain the samples variant trains (x0_clip 2)
    kw = dict(kind=a.kind, steps=a.steps, batch_size=a.batch, n_samples=a.samples, sample_steps=a.sample_steps,
              also=also)
    rows = compare_toy(settings, seeds=a.seeds, **kw)
    ratios = {}
    def after_start(setting):            # seconds the first seed's run spent after --start (its logged clock)
        h = next(r['history'] for r in rows if r['setting'] == setting and r['seed'] == a.seeds[0])
        before = [x['time'] for x in h if x['step'] <= a.start]
        return h[-1]['time'] - (before[-1] if before else 0.0)
    for name in a.equal_time:            # plain fine-tuning for as long as `name` took
        ratio = after_start(name) / after_start('plain')
        ratios[name] = ratio
        steps = a.start + round((a.steps - a.start) * ratio)
        rows += compare_toy({f'plain, time of {name}': {}}, seeds=a.seeds, **{**kw, 'steps': steps})
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    summ = summarize(rows, KEYS + tuple(f'{m}_{e}' for e in also for m in ('swd', 'hq', 'covered')))
    plot_toy(rows, kind=a.kind, seed=a.seeds[0], path=out / 'toy.png')
    atomic_write_json(out / 'summary.json', {'config': vars(a), 'summary': summ, 'time_ratios': ratios,
                                             'runs': [{k: v for k, v in r.items() if k not in ('samples',)} for r in rows]})
    lines = [f"# SADM on the 2-D toy `{a.kind}`: {len(a.seeds)} seeds, {a.steps} steps (structure term from step {a.start})", '',
             '| setting | SWD ↓ | MMD² ↓ | high-quality fraction ↑ | modes covered | mode TV ↓ | pair-wise distance TV ↓ | training s |'
             + ''.join(f' {e}: SWD ↓ | {e}: high-quality ↑ | {e}: modes |' for e in also),
             '|---|---|---|---|---|---|---|---|' + '---|' * (3 * len(also))]
    for name, s in summ.items():
        f = lambda k, nd: f"{s[k][0]:.{nd}f} ± {s[k][1]:.{nd}f}"
        lines.append(f"| {name} | {f('swd', 4)} | {s['mmd2'][0]:.2e} ± {s['mmd2'][1]:.1e} | {f('hq', 3)} | "
                     f"{s['covered'][0]:.1f} | {f('mode_tv', 3)} | {f('pdist_tv', 3)} | {s['train_s'][0]:.0f} |"
                     + ''.join(f" {f(f'swd_{e}', 4)} | {f(f'hq_{e}', 3)} | {s[f'covered_{e}'][0]:.1f} |" for e in also))
    md = '\n'.join(lines + ['', '![toy](toy.png)', ''])
    atomic_write_text(out / 'summary.md', md)
    print(md)
    print(json.dumps(summ))


if __name__ == '__main__':
    main()
