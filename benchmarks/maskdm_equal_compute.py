#!/usr/bin/env python
"""Does MaskDM's masked pre-training pay off at equal compute? From-scratch training against masked pre-training +
unmasked fine-tuning with the same training FLOPs budget, over several seeds, on the same data and model.

Arms (both start from the same seeded initialisation):
  scratch  `--base` preset trained for S steps, no masking;
  maskdm   masked pre-training (`--strategy`, `--ratio`) for P steps, then unmasked fine-tuning for F steps, with
           P * c + F = S, where c = (training FLOPs of a masked step) / (of an unmasked step) from
           `sadm_lab.models.flops_per_forward` at the visible-token count; `--pretrain-frac` of the budget goes to
           pre-training. Fine-tuning starts with a fresh AdamW state and EMA (MaskDM fine-tunes a copy of the weights).
FID (classifier features, with its real-vs-real floor) is measured at `--evals` points during each run; the script
writes FID against training FLOPs and against measured wall-clock, and a table of the final FID (mean ± std over
seeds). Equal FLOPs is the controlled comparison; wall-clock is measured beside it (it also depends on how well small
matmuls run on the device). Results are what they are: the script makes no claim either way.

    python benchmarks/maskdm_equal_compute.py                         # digits, 3 seeds, ~20 min on 2 CPU cores
    python benchmarks/maskdm_equal_compute.py --steps 2000 --seeds 0 1 2 3 4 --ratio 0.9
"""
from __future__ import annotations
import argparse, json, statistics, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from sadm_lab.config import get_config  # noqa: E402
from sadm_lab.core import atomic_write_json, atomic_write_text  # noqa: E402
from sadm_lab.masking import visible_count  # noqa: E402
from sadm_lab.models import flops_per_forward  # noqa: E402
from sadm_lab.train import Trainer, RunDir  # noqa: E402


def masked_cost_ratio(tr: Trainer, strategy: str, ratio: float, block_size: int) -> tuple[float, int]:
    "Training FLOPs of a masked step relative to an unmasked one, and the visible-token count."
    net = tr.unwrapped
    g = net.input_size // net.patch_size
    n_vis = visible_count(strategy, (g, g), ratio=ratio, block_size=block_size)
    return flops_per_forward(net, num_tokens=n_vis) / flops_per_forward(net), n_vis


def run_arm(name, seed, overrides, out, progress):
    cfg = get_config(ARGS.base, [f'name={name}-s{seed}', f'train.seed={seed}', *COMMON, *overrides])
    t0 = time.time()
    tr = Trainer(cfg, out / f'{name}-s{seed}', progress=progress).fit()
    recs = RunDir(tr.run.path).read_metrics()
    evals = [r for r in recs if r['kind'] == 'eval']
    start = next(r['time'] for r in recs if r.get('event') == 'start')
    return {'arm': name, 'seed': seed, 'wall_s': time.time() - t0, 'evals': evals, 'start': start, 'run': str(tr.run.path)}


def main(argv=None):
    global ARGS, COMMON
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--base', default='digits-dit', help='preset both arms start from')
    p.add_argument('--steps', type=int, default=500, help='budget S in unmasked-step equivalents')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--strategy', default='patch'); p.add_argument('--ratio', type=float, default=0.75)
    p.add_argument('--block-size', type=int, default=2)
    p.add_argument('--pretrain-frac', type=float, default=0.5, help='share of the FLOPs budget spent pre-training')
    p.add_argument('--finetune-warmup', type=int, default=25, help='warm-up steps when fine-tuning starts')
    p.add_argument('--evals', type=int, default=4, help='FID points per run')
    p.add_argument('--eval-samples', type=int, default=400)
    p.add_argument('--out', default='runs/equal-compute')
    p.add_argument('--progress', action='store_true')
    p.add_argument('overrides', nargs='*', help='extra key=value for both arms')
    ARGS = a = p.parse_args(argv)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    S = a.steps
    probe = Trainer(get_config(a.base, ['train.steps=1', 'eval.enabled=false']), out / '_probe', progress=False)
    c, n_vis = masked_cost_ratio(probe, a.strategy, a.ratio, a.block_size)
    P = round(a.pretrain_frac * S / c); F = S - round(a.pretrain_frac * S)
    every_s, every_m = max(1, S // a.evals), max(1, (P + F) // a.evals)
    COMMON = ['train.sample_every=0', f'eval.num_samples={a.eval_samples}', 'train.ckpt_every=100000', *a.overrides]
    print(f"budget {S} unmasked steps; masked step costs {c:.3f} of an unmasked one ({n_vis} visible tokens): "
          f"maskdm = {P} masked + {F} unmasked steps", flush=True)
    results = []
    for seed in a.seeds:
        results.append(run_arm('scratch', seed, [f'train.steps={S}', f'train.eval_every={every_s}'], out, a.progress))
        results.append(run_arm('maskdm', seed, [f'train.steps={P + F}', f'train.eval_every={every_m}',
                                                f'mask.strategy={a.strategy}', f'mask.ratio={a.ratio}',
                                                f'mask.block_size={a.block_size}', f'mask.pretrain_steps={P}',
                                                f'mask.finetune_warmup_steps={a.finetune_warmup}'],
                               out, a.progress))
        print(f"seed {seed}: " + ', '.join(f"{r['arm']} FID {r['evals'][-1]['fid']:.2f} in {r['wall_s']:.0f}s"
                                         for r in results[-2:]), flush=True)

    def flops_at(arm, step):   # training FLOPs in unmasked-step units
        return step if arm == 'scratch' else min(step, P) * c + max(0, step - P)

    summary = {'config': vars(a), 'cost_ratio': c, 'visible_tokens': n_vis, 'pretrain_steps': P, 'finetune_steps': F,
               'floor': results[0]['evals'][-1]['fid_floor'], 'arms': {}}
    for arm in ('scratch', 'maskdm'):
        rs = [r for r in results if r['arm'] == arm]
        fids = [r['evals'][-1]['fid'] for r in rs]
        summary['arms'][arm] = {
            'final_fid_mean': statistics.mean(fids), 'final_fid_std': statistics.stdev(fids) if len(fids) > 1 else 0.0,
            'final_fids': fids, 'wall_s_mean': statistics.mean(r['wall_s'] for r in rs),
            'curves': [[(flops_at(arm, e['step']), e['time'] - r['start'], e['fid']) for e in r['evals']]
                       for r in rs]}
    atomic_write_json(out / 'summary.json', summary)
    _plots(summary, out)
    s, m = summary['arms']['scratch'], summary['arms']['maskdm']
    md = [f"# MaskDM at equal compute ({a.base}, {len(a.seeds)} seeds)", '',
          f"Budget: {S} unmasked training steps. MaskDM arm: {P} steps with {a.strategy} masking at ratio {a.ratio} "
          f"({n_vis} visible tokens, {c:.3f} of the FLOPs of an unmasked step), then {F} unmasked fine-tuning steps.", '',
          '| arm | final FID (mean ± std) | per seed | wall-clock (s) |', '|---|---|---|---|',
          f"| from scratch | {s['final_fid_mean']:.2f} ± {s['final_fid_std']:.2f} | "
          f"{', '.join(f'{x:.2f}' for x in s['final_fids'])} | {s['wall_s_mean']:.0f} |",
          f"| masked pre-training + fine-tuning | {m['final_fid_mean']:.2f} ± {m['final_fid_std']:.2f} | "
          f"{', '.join(f'{x:.2f}' for x in m['final_fids'])} | {m['wall_s_mean']:.0f} |", '',
          f"Real-vs-real floor of the same protocol: {summary['floor']:.2f}.", '',
          '![FID vs FLOPs](fid_vs_flops.png) ![FID vs time](fid_vs_time.png)', '']
    atomic_write_text(out / 'summary.md', '\n'.join(md))
    print('\n'.join(md[4:8]))
    print(json.dumps({k: v for k, v in summary.items() if k != 'arms'} |
                     {arm: {k: v for k, v in d.items() if k != 'curves'} for arm, d in summary['arms'].items()}))


def _plots(summary, out):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    for idx, (fname, xlabel) in enumerate([('fid_vs_flops.png', 'training FLOPs (unmasked-step units)'),
                                            ('fid_vs_time.png', 'wall-clock since start, evaluations included (s)')]):
        fig, ax = plt.subplots(figsize=(4.5, 3), dpi=80)
        for arm, color in (('scratch', 'C0'), ('maskdm', 'C1')):
            for i, curve in enumerate(summary['arms'][arm]['curves']):
                xs = [pt[idx] for pt in curve]; ys = [pt[2] for pt in curve]
                ax.plot(xs, ys, 'o-', color=color, alpha=0.7, label=arm if i == 0 else None)
        ax.axhline(summary['floor'], ls='--', color='gray', label='real-vs-real floor')
        ax.set_xlabel(xlabel); ax.set_ylabel('FID'); ax.set_yscale('log'); ax.legend(fontsize=7); ax.grid(alpha=0.3)
        fig.tight_layout(); fig.savefig(out / fname); plt.close(fig)


if __name__ == '__main__':
    main()
