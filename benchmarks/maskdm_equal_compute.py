#!/usr/bin/env python
"""Does MaskDM's masked pre-training pay off at equal compute? From-scratch training against masked pre-training +
unmasked fine-tuning with the same budget, over several seeds, with the same model and the same target data.

The budget is S unmasked training steps of `--base`. A masked step costs c of an unmasked one, where c is
  --match flops  (default) training FLOPs of a masked step / of an unmasked one (`sadm_lab.models.flops_per_forward`
                 at the visible-token count): the controlled comparison, independent of the machine;
  --match time   the measured time of a masked training step / of an unmasked one (interleaved repetitions on this
                 machine, before the runs): equal wall-clock.
Pre-training gets `--pretrain-frac` of the budget, P = frac * S / c masked steps, and fine-tuning the rest,
F = S - frac * S unmasked steps, so P * c + F = S. Fine-tuning starts with a fresh AdamW state and EMA and its own
warm-up (MaskDM fine-tunes a copy of the pre-trained weights).

Settings and their arms (every arm of a seed starts from the same seeded initialisation):
  --setting same      on the base data:
      scratch            S unmasked steps;
      maskdm             one two-stage run: P masked steps, then F unmasked steps (`mask.pretrain_steps`);
      small-batch        the control for "more, cheaper updates": P unmasked steps with batch c * B (as many tokens
                         per step as a masked step of batch B), then the same F unmasked fine-tuning steps.
  --setting transfer  MaskDM's small-data case: the target is `--target-images` images of the base data (default 300)
                      and `--source` (default fashion-mnist, resized to the target's resolution) is a larger dataset,
                      or, with `--source-classes` / `--target-classes`, other classes of the same dataset
                      (`data.classes`: pre-train on classes 0-4, fine-tune on a few hundred images of 5-9):
      scratch            S unmasked steps on the target;
      maskdm             two stages, both on the target;
      transfer           P masked steps on the source, then F unmasked steps on the target (`train.init_from`);
      transfer-unmasked  the control: frac * S unmasked steps on the source, then F on the target. Transfer beating
                         this control is evidence for masking; beating only scratch could be the extra data alone.
FID (classifier features, `--eval-samples` samples against the whole target dataset's split that the preset's
`eval.reference` names, only its `--target-classes` when given, with the real-vs-real floor of the same protocol)
is measured at `--evals` points of every run on the target (`--evals 1`: at its end only), and the memorisation check
(nearest-training-image distance ratio) beside it. Written to `--out`: summary.json, summary.md (table of the final
FID, mean ± std over seeds), fid_vs_flops.png and fid_vs_time.png (training time, evaluations excluded).
Running the same command again reuses the finished runs in `--out` and resumes interrupted ones (the measured step
costs are kept in plan.json so the runs' configs stay the same); other settings need another `--out`.
Results are what they are: the script makes no claim either way.

    python benchmarks/maskdm_equal_compute.py                                   # digits, 3 seeds, ~15 min (2 cores)
    python benchmarks/maskdm_equal_compute.py --setting transfer                # needs Fashion-MNIST on disk
    python benchmarks/maskdm_equal_compute.py --steps 1000 --match time --ratio 0.9 --seeds 0 1 2 3 4
    # on the ruler (benchmarks/ruler.py): the from-scratch arm read from its runs, one FID-5k per arm
    python benchmarks/maskdm_equal_compute.py --base fashion16-dit --steps 800 --evals 1 --eval-samples 5000 \
        --scratch-runs runs/ruler --out runs/eqc-800
    python benchmarks/maskdm_equal_compute.py --base fashion16-dit --setting transfer --source-classes 0-4 \
        --target-classes 5-9 --steps 400 --evals 1 --eval-samples 5000 --out runs/eqc-transfer
    # the papers' scale on a GPU, unchanged but for the preset and the device
    python benchmarks/maskdm_equal_compute.py --base cifar10-dit --steps 20000 --device cuda --out runs/eqc-cifar10
"""
from __future__ import annotations
import argparse, json, shutil, statistics, tempfile
from pathlib import Path

from _common import fit_run, interleaved_times, machine  # noqa: E402  (benchmarks/ is on sys.path as the script dir)
from sadm_lab.config import get_config  # noqa: E402
from sadm_lab.core import atomic_write_json, atomic_write_text  # noqa: E402
from sadm_lab.masking import STRATEGIES, visible_count  # noqa: E402
from sadm_lab.models import flops_per_forward  # noqa: E402
from sadm_lab.train import Trainer  # noqa: E402

ARMS = {'same': ('scratch', 'maskdm', 'small-batch'), 'transfer': ('scratch', 'maskdm', 'transfer', 'transfer-unmasked')}
LABELS = {'scratch': 'from scratch', 'maskdm': 'masked pre-training + fine-tuning',
          'transfer': 'masked pre-training on the source + fine-tuning',
          'transfer-unmasked': 'unmasked pre-training on the source + fine-tuning (control)',
          'small-batch': 'small-batch unmasked steps + fine-tuning (control)'}


def masked_flops_ratio(tr: Trainer, a) -> tuple[float, int, int]:
    "Training FLOPs of a masked step relative to an unmasked one, the visible-token count and the token count."
    net = tr.unwrapped
    g = net.input_size // net.patch_size
    n_vis = visible_count(a.strategy, (g, g), ratio=a.ratio, block_size=a.block_size)
    return flops_per_forward(net, num_tokens=n_vis) / flops_per_forward(net), n_vis, g * g


def masked_time_ratio(base_overrides, a, tmp: Path, reps=5, steps=4) -> tuple[float, float, float]:
    "Measured seconds per masked / unmasked training step (median of interleaved repetitions, after warm-up)."
    trs = {}
    for masked in (False, True):
        m = [f'mask.strategy={a.strategy}', f'mask.ratio={a.ratio}', f'mask.block_size={a.block_size}'] if masked else []
        trs[masked] = Trainer(get_config(a.base, [*base_overrides, 'train.steps=100000', 'eval.enabled=false', *m]),
                              tmp / f'probe-{"masked" if masked else "unmasked"}', progress=False)
    times = interleaved_times({k: tr.train_step for k, tr in trs.items()}, reps=reps, steps=steps, warmup=2,
                              device=trs[False].device)
    t_u, t_m = statistics.median(times[False]), statistics.median(times[True])
    return t_m / t_u, t_m, t_u


def run_arm(arm, seed, plan, a, out):
    "Train `arm` for `seed`; return its FID curve as (FLOPs in unmasked-step units, training seconds, eval record)."
    S, P, F, c_flops = plan['S'], plan['P'], plan['F'], plan['c_flops']
    base = [f'train.seed={seed}', *plan['common'], *plan['target']]
    mask = [f'mask.strategy={a.strategy}', f'mask.ratio={a.ratio}', f'mask.block_size={a.block_size}']
    name = f'{arm}-s{seed}'
    if arm == 'scratch' and a.scratch_runs:     # a longer from-scratch run of the same preset and seed (ruler.py):
        want = get_config(a.base, [f'name={name}', *base, f'train.steps={S}'])
        r = read_scratch(Path(a.scratch_runs) / f'scratch-s{seed}', S, want)   # its step-S eval is budget S
        return r | {'points': [(e['step'], e['train_s'], e) for e in r['evals']], 'updates': S}
    if arm == 'scratch':
        r = fit_run(get_config(a.base, [f'name={name}', *base, f'train.steps={S}', f'train.eval_every={max(1, S // a.evals)}']),
                    out / name, progress=a.progress)
        pts = [(e['step'], e['train_s'], e) for e in r['evals']]
        return r | {'points': pts, 'updates': S}
    if arm == 'maskdm':
        r = fit_run(get_config(a.base, [f'name={name}', *base, *mask, f'train.steps={P + F}', f'mask.pretrain_steps={P}',
                                        f'mask.finetune_warmup_steps={a.finetune_warmup}',
                                        f'train.eval_every={max(1, (P + F) // a.evals)}']), out / name, progress=a.progress)
        pts = [(min(e['step'], P) * c_flops + max(0, e['step'] - P), e['train_s'], e) for e in r['evals']]
        return r | {'points': pts, 'updates': P + F}
    # two runs: a first stage (on the source, or small batches on the target), then unmasked fine-tuning on the
    # target initialised from it with a fresh optimiser, EMA and warm-up, like the switch of the maskdm arm
    if arm == 'small-batch':      # P full-image steps of as many tokens as a masked step: more updates, no masking
        b = max(1, round(plan['batch'] * plan['c']))
        Q, q_flops, first = P, P * b / plan['batch'], [*plan['target'], f'train.batch_size={b}',
                                                      f'train.eval_every={max(1, P // a.evals)}',
                                                      *(['eval.enabled=false'] if a.evals == 1 else [])]
    else:
        masked = arm == 'transfer'
        Q = P if masked else S - F
        q_flops = Q * (c_flops if masked else 1.0)
        first = [*plan['source'], *(mask if masked else []), 'eval.enabled=false']
    on_target = arm == 'small-batch'
    pre = fit_run(get_config(a.base, [f'name={name}-pretrain', f'train.seed={seed}', *plan['common'], *first,
                                      f'train.steps={Q}']), out / f'{name}-pretrain', progress=a.progress,
                  evaluate=on_target and a.evals > 1)   # --evals 1: each arm is evaluated at its end only
    ft = fit_run(get_config(a.base, [f'name={name}', *base, f'train.steps={F}', f'train.init_from={pre["run"]}',
                                     f'train.warmup_steps={a.finetune_warmup}', f'train.eval_every={max(1, F // a.evals)}']),
                 out / name, progress=a.progress)
    pts = [(e['step'] * q_flops / Q, e['train_s'], e) for e in pre['evals']] if on_target else []
    pts += [(q_flops + e['step'], pre['train_s'] + e['train_s'], e) for e in ft['evals']]
    return ft | {'points': pts, 'updates': Q + F, 'pretrain_s': pre['train_s'], 'train_s': pre['train_s'] + ft['train_s'],
                 'resumed': pre['resumed'] or ft['resumed']}


def read_scratch(run: Path, S: int, want) -> dict:
    """The from-scratch arm read from a finished run that went at least to step S: its evals up to S with their
    training time. The run must have the config `want` but for its length and bookkeeping (checked: evaluation and
    sampling settings included) and a constant learning rate after warm-up, so that its first S steps are the
    S-step run."""
    from sadm_lab.config import config_diff, load_config
    from sadm_lab.train import RunDir, training_clock
    cfg = load_config(run / 'config.json')
    if d := config_diff(want, cfg, ignore={'name', 'train.steps', 'train.eval_every', 'train.ckpt_every',
                                           'train.keep_checkpoints', 'train.sample_every', 'train.log_every',
                                           'train.device'}):
        raise SystemExit(f'{run} is not this comparison\'s from-scratch run: {d}')
    if cfg.train.lr_schedule != 'constant':
        raise SystemExit(f'{run}: lr_schedule={cfg.train.lr_schedule!r}; only a constant schedule makes its first '
                         f'{S} steps an {S}-step run')
    every = [(r, t) for r, t in training_clock(RunDir(run).read_metrics()) if r.get('kind') == 'eval']
    clock = [(r, t) for r, t in every if r['step'] <= S]
    if not clock or clock[-1][0]['step'] != S: raise SystemExit(f'{run} has no evaluation at step {S}')
    return {'run': str(run), 'evals': [dict(r, train_s=t) for r, t in clock], 'train_s': clock[-1][1],
            'resumed': False, 'config': cfg, 'time_curve': [(t, r['fid']) for r, t in every]}


def fid_at_time(curve, t: float) -> float | None:
    """FID of a from-scratch run after `t` seconds of training: interpolated in log FID between its evaluations
    (`curve`: (training seconds, FID) pairs), None outside the times it covers. Equal wall-clock, read off one
    longer run instead of training a run per time."""
    import math
    for (t0, f0), (t1, f1) in zip(curve, curve[1:]):
        if t0 <= t <= t1:
            w = (t - t0) / (t1 - t0) if t1 > t0 else 0.0
            return math.exp((1 - w) * math.log(f0) + w * math.log(f1))
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='\n'.join(__doc__.split('\n')[1:]))
    p.add_argument('--setting', choices=tuple(ARMS), default='same')
    p.add_argument('--arms', nargs='+', help='a subset of the setting\'s arms (default: all)')
    p.add_argument('--base', default='digits-dit', help='preset every arm starts from (its data is the target)')
    p.add_argument('--steps', type=int, default=500, help='budget S in unmasked-step equivalents')
    p.add_argument('--match', choices=('flops', 'time'), default='flops', help='what the masked step cost c measures')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--strategy', default='patch', choices=STRATEGIES)
    p.add_argument('--ratio', type=float, default=0.75)
    p.add_argument('--block-size', type=int, default=2)
    p.add_argument('--pretrain-frac', type=float, default=0.5, help='share of the budget spent pre-training')
    p.add_argument('--finetune-warmup', type=int, default=25, help='warm-up steps when fine-tuning starts')
    p.add_argument('--target-images', type=int, help='train on this many target images (transfer default: 300)')
    p.add_argument('--source', default='fashion-mnist', help='transfer: the dataset pre-trained on')
    p.add_argument('--target-classes', help="the target's classes only, e.g. 5-9 (data.classes; FID against them too)")
    p.add_argument('--source-classes', help='transfer: the source\'s classes only, e.g. 0-4 with --source = the '
                   'target\'s dataset: pre-train on one half of the classes, fine-tune on the other')
    p.add_argument('--source-root', help='transfer: folder of the source data (default: the loader\'s own search)')
    p.add_argument('--evals', type=int, default=4, help='FID points per run on the target')
    p.add_argument('--eval-samples', type=int, default=400)
    p.add_argument('--scratch-runs', help='the from-scratch arm from these finished runs (`ruler.py --out`: '
                                          'scratch-s<seed>, same preset and overrides, constant lr) instead of training it')
    p.add_argument('--device', default='cpu', help='where every run trains and is evaluated (e.g. cuda)')
    p.add_argument('--out', default='runs/equal-compute')
    p.add_argument('--progress', action='store_true')
    p.add_argument('overrides', nargs='*', help='extra key=value for every run')
    a = p.parse_args(argv)
    if not 0 < a.pretrain_frac < 1: p.error('--pretrain-frac must be in (0, 1)')
    arms = a.arms or ARMS[a.setting]
    if bad := [x for x in arms if x not in ARMS[a.setting]]: p.error(f'arms {bad} are not in setting {a.setting!r}: {ARMS[a.setting]}')
    if a.setting == 'transfer' and a.target_images is None: a.target_images = 300
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    common = ['train.sample_every=0', f'eval.num_samples={a.eval_samples}', 'train.ckpt_every=500',
              f'train.device={a.device}', *a.overrides]
    target = ([f'data.max_images={a.target_images}'] if a.target_images else []) + \
             ([f'data.classes={a.target_classes}'] if a.target_classes else [])
    tmp = Path(tempfile.mkdtemp(prefix='eqc-probe-'))               # throw-away run folders of the probes
    probe = Trainer(get_config(a.base, [*common, *target, 'train.steps=1', 'eval.enabled=false']), tmp / 'probe', progress=False)
    res, ch = probe.data.resolution, probe.data.channels
    source = [f'data.name={a.source}', f'data.resolution={res}', f'data.channels={ch}', 'data.max_images=none',
              *([f'data.root={a.source_root}'] if a.source_root else []),
              *([f'data.classes={a.source_classes}'] if a.source_classes else [])]
    c_flops, n_vis, n_tok = masked_flops_ratio(probe, a)
    # a re-run into the same --out reuses the measured step costs, so finished runs are reused and interrupted ones
    # resume (the runs' configs depend on them); other settings need another --out
    key = {k: v for k, v in vars(a).items() if k not in ('seeds', 'arms', 'progress', 'out', 'scratch_runs')}
    saved = json.loads((out / 'plan.json').read_text()) if (out / 'plan.json').is_file() else None
    if saved is not None and saved['settings'] != key:
        diff = ', '.join(f'{k}: {saved["settings"].get(k)!r} -> {v!r}' for k, v in key.items() if saved['settings'].get(k) != v)
        p.error(f'{out} holds a comparison with other settings ({diff}); use another --out')
    timing = saved['timing'] if saved else (masked_time_ratio([*common, *target], a, tmp) if a.match == 'time' else None)
    shutil.rmtree(tmp, ignore_errors=True)
    if saved is None: atomic_write_json(out / 'plan.json', {'settings': key, 'timing': timing})
    c = timing[0] if timing else c_flops
    S = a.steps
    P, F = round(a.pretrain_frac * S / c), S - round(a.pretrain_frac * S)
    plan = dict(S=S, P=P, F=F, c=c, c_flops=c_flops, common=common, target=target, source=source,
                batch=probe.cfg.train.batch_size)
    print(f"budget {S} unmasked steps; a masked step ({n_vis} of {n_tok} tokens visible) costs {c_flops:.3f} of an unmasked one in FLOPs"
          + (f", {timing[0]:.3f} in measured time ({1e3 * timing[1]:.0f} vs {1e3 * timing[2]:.0f} ms/step)" if timing else '')
          + f"; matched by {a.match}: pre-training {P} masked + fine-tuning {F} unmasked steps", flush=True)
    results = []
    for seed in a.seeds:
        for arm in arms:
            r = run_arm(arm, seed, plan, a, out)
            results.append(r | {'arm': arm, 'seed': seed})
        print(f"seed {seed}: " + ', '.join(f"{r['arm']} FID {r['evals'][-1]['fid']:.2f} ({r['train_s']:.0f}s)"
                                         for r in results[-len(arms):]), flush=True)

    summary = {'config': vars(a), 'env': machine(a.device), 'cost_ratio_flops': c_flops, 'cost_ratio_time': timing[0] if timing else None,
               'step_ms': {'masked': 1e3 * timing[1], 'unmasked': 1e3 * timing[2]} if timing else None,
               'visible_tokens': n_vis, 'pretrain_steps': P, 'finetune_steps': F,
               'small_batch': max(1, round(plan['batch'] * c)) if 'small-batch' in arms else None,
               'floor': results[0]['evals'][-1]['fid_floor'], 'arms': {}}
    for arm in arms:
        rs = [r for r in results if r['arm'] == arm]
        fids = [r['evals'][-1]['fid'] for r in rs]
        nn = [r['evals'][-1].get('nn_ratio') for r in rs]
        summary['arms'][arm] = {
            'final_fid_mean': statistics.mean(fids), 'final_fid_std': statistics.stdev(fids) if len(fids) > 1 else 0.0,
            'final_fids': fids, 'nn_ratio_mean': statistics.mean(nn) if None not in nn else None,
            'train_s_mean': statistics.mean(r['train_s'] for r in rs), 'updates': rs[0]['updates'],
            'resumed_runs': sum(r['resumed'] for r in rs),
            'curves': [[(x, t, e['fid']) for x, t, e in r['points']] for r in rs], 'runs': [r['run'] for r in rs]}
        if all('time_curve' in r for r in rs): summary['arms'][arm]['time_curves'] = [r['time_curve'] for r in rs]
        # equal wall-clock: the same seed's from-scratch run (--scratch-runs) at this arm's training time
        scr = {r['seed']: r['time_curve'] for r in results if r['arm'] == 'scratch' and 'time_curve' in r}
        if arm != 'scratch' and all(r['seed'] in scr for r in rs):
            eq = [fid_at_time(scr[r['seed']], r['train_s']) for r in rs]
            summary['arms'][arm]['scratch_at_equal_time'] = eq
            summary['arms'][arm]['scratch_at_equal_time_mean'] = statistics.mean(eq) if None not in eq else None
    atomic_write_json(out / 'summary.json', summary)
    _plots(summary, out)
    md = _markdown(summary, a)
    atomic_write_text(out / 'summary.md', md)
    print(md)
    print(json.dumps({k: v for k, v in summary.items() if k != 'arms'} |
                     {arm: {k: v for k, v in d.items() if k not in ('curves', 'runs')} for arm, d in summary['arms'].items()}))


def _markdown(s, a) -> str:
    P, F = s['pretrain_steps'], s['finetune_steps']
    data = f"{a.target_images} images of `{a.base}`'s data" if a.target_images else f"`{a.base}`'s data"
    lines = [f"# MaskDM at equal compute: setting `{a.setting}`, {len(a.seeds)} seed{'s' if len(a.seeds) > 1 else ''}", '',
             f"Target: {data}. Budget: {a.steps} unmasked training steps, matched by {a.match}. Pre-training: {P} steps "
             f"with {a.strategy} masking at ratio {a.ratio} ({s['visible_tokens']} visible tokens; a masked step costs "
             f"{s['cost_ratio_flops']:.3f} of an unmasked one in FLOPs"
             + (f", {s['cost_ratio_time']:.3f} in measured time" if s['cost_ratio_time'] else '') + f"), then {F} "
             f"unmasked fine-tuning steps." + (f" Source for the transfer arms: `{a.source}`" + (f", classes {a.source_classes}" if a.source_classes else '')
                + '.' if a.setting == 'transfer' else '')
             + (f" Target classes: {a.target_classes}." if a.target_classes else '')
             + (f" The small-batch control's first stage uses batch {s['small_batch']}." if s['small_batch'] else ''),
             '', '| arm | final FID (mean ± std) | per seed | NN ratio | optimiser updates | training time (s) |',
             '|---|---|---|---|---|---|']
    for arm, d in s['arms'].items():
        nn = f"{d['nn_ratio_mean']:.2f}" if d['nn_ratio_mean'] is not None else '–'
        lines.append(f"| {LABELS[arm]} | {d['final_fid_mean']:.2f} ± {d['final_fid_std']:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in d['final_fids'])} | {nn} | {d['updates']} | {d['train_s_mean']:.0f}"
                     f"{' *' if d['resumed_runs'] else ''} |")
    eq = {arm: d for arm, d in s['arms'].items() if d.get('scratch_at_equal_time')}
    if eq:
        lines += ['', 'Equal wall-clock: the same seed\'s from-scratch run after as much training time as the arm '
                  '(interpolated between the evaluations of its longer run; – where the arm trained longer than it):', '',
                  '| arm | its FID | from scratch at its training time | per seed |', '|---|---|---|---|']
        for arm, d in eq.items():
            m = d['scratch_at_equal_time_mean']
            lines.append(f"| {LABELS[arm]} | {d['final_fid_mean']:.2f} | {'–' if m is None else f'{m:.2f}'} | "
                         + ', '.join('–' if x is None else f'{x:.2f}' for x in d['scratch_at_equal_time']) + ' |')
    lines += ['', f"Real-vs-real floor of the same protocol: {s['floor']:.2f}. NN ratio: median distance of a sample to "
              "its nearest training image over that of held-out real images (about 1 = fresh, near 0 = copies).", '',
              '![FID vs FLOPs](fid_vs_flops.png) ![FID vs time](fid_vs_time.png)', '']
    if any(d['resumed_runs'] for d in s['arms'].values()):
        lines += ['\\* some runs of this arm were interrupted and resumed: their training time adds up the sessions and '
                  'counts the steps re-done after the last checkpoint.', '']
    return '\n'.join(lines)


def _plots(summary, out):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    for idx, (fname, xlabel) in enumerate([('fid_vs_flops.png', 'training FLOPs (unmasked-step units)'),
                                            ('fid_vs_time.png', 'training time, evaluations excluded (s)')]):
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=80)
        for k, (arm, d) in enumerate(summary['arms'].items()):
            for i, curve in enumerate(d['curves']):
                ax.plot([pt[idx] for pt in curve], [pt[2] for pt in curve], 'o-', color=f'C{k}', alpha=0.7, ms=3,
                        label=arm if i == 0 else None)
            for i, curve in enumerate(d.get('time_curves', []) if idx == 1 else []):   # the longer ruler runs
                ax.plot([t for t, _ in curve], [f for _, f in curve], ':', color=f'C{k}', alpha=0.6,
                        label=f'{arm}, the rest of its run' if i == 0 else None)
        ax.axhline(summary['floor'], ls='--', color='gray', label='real-vs-real floor')
        ax.set_xlabel(xlabel); ax.set_ylabel('FID'); ax.set_yscale('log'); ax.legend(fontsize=7); ax.grid(alpha=0.3)
        fig.tight_layout(); fig.savefig(out / fname); plt.close(fig)


if __name__ == '__main__':
    main()
