#!/usr/bin/env python
"""Step time of SADM training against plain denoising training: the same model, data, batch and settings, one run.

Each arm is a real `Trainer` (run folder in a temp dir, evaluation and samples off) whose `train_step()` is timed:
plain (`sadm.enabled=false`), the literal SADM term and each consistent variant (`sadm.variant` linear, samples,
representation; `--variants all` adds encoder options and other sampler lengths). Short repetitions of the arms are
interleaved, the order rotating, so drifts in machine load hit all alike; reported per arm are the median ms/step and,
as the ratio to plain, the median over repetitions of the paired ratio. Target: at most 1.3x plain; the samples
variant runs K extra forward passes per step, so its extra cost is also reported per sampler step.

    python benchmarks/sadm_step_time.py                         # DiT-T/2 on 8x8 digits, batch 128 (the demo's step)
    python benchmarks/sadm_step_time.py --preset digits-dit --override model.preset=DiT-S/2 --reps 5
    python benchmarks/sadm_step_time.py --variants all          # + encoder options, K=2 and k=2 samplers
"""
from __future__ import annotations
import argparse, json, platform, statistics, tempfile
from pathlib import Path

import torch

from _common import interleaved_times, machine, paired_ratio   # noqa: E402  (benchmarks/ is on sys.path as the script dir)
from sadm_lab.config import get_config   # noqa: E402
from sadm_lab.train import Trainer   # noqa: E402

VARIANTS = {
    'sadm': ['sadm.enabled=true', 'sadm.variant=literal'],
    'linear': ['sadm.enabled=true', 'sadm.variant=linear'],
    'samples K=4 k=1': ['sadm.enabled=true', 'sadm.variant=samples', 'sadm.sampler_steps=4', 'sadm.grad_steps=1'],
    'representation': ['sadm.enabled=true', 'sadm.variant=representation', 'sadm.outside_encoder=random'],
    'sadm, time-conditioned encoder': ['sadm.enabled=true', 'sadm.variant=literal', 'sadm.time_cond=true'],
    'sadm, R1 gamma=1': ['sadm.enabled=true', 'sadm.variant=literal', 'sadm.r1_gamma=1'],
    'sadm, d_steps=2': ['sadm.enabled=true', 'sadm.variant=literal', 'sadm.d_steps=2'],
    'sadm, spectral norm': ['sadm.enabled=true', 'sadm.variant=literal', 'sadm.spectral_norm=true'],
    'samples K=2 k=1': ['sadm.enabled=true', 'sadm.variant=samples', 'sadm.sampler_steps=2', 'sadm.grad_steps=1'],
    'samples K=4 k=2': ['sadm.enabled=true', 'sadm.variant=samples', 'sadm.sampler_steps=4', 'sadm.grad_steps=2'],
}
DEFAULT = ('sadm', 'linear', 'samples K=4 k=1', 'representation')   # the literal term and each consistent variant


def _sampler_steps(over) -> int:
    return next((int(o.split('=')[1]) for o in over if o.startswith('sadm.sampler_steps=')), 0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--preset', default='digits-dit')
    p.add_argument('--override', action='append', default=[], help='config key=value for every arm (repeatable)')
    p.add_argument('--variants', choices=('default', 'all'), default='default',
                   help="'default' (literal + each variant) or 'all'")
    p.add_argument('--steps', type=int, default=10, help='timed steps per repetition')
    p.add_argument('--reps', type=int, default=7)
    p.add_argument('--warmup', type=int, default=3, help='untimed steps per arm first')
    p.add_argument('--bf16', action='store_true')
    p.add_argument('--device', default='cpu', help='where the arms train (e.g. cuda)')
    p.add_argument('--json', help='also write the JSON here')
    a = p.parse_args(argv)
    arms = {'plain': []} | ({n: VARIANTS[n] for n in DEFAULT} if a.variants == 'default' else VARIANTS)
    common = ['eval.enabled=false', 'train.sample_every=0', 'train.ckpt_every=1000000', 'train.steps=1000000',
              'sadm.warmup_steps=0', 'sadm.heldout_size=0', f'train.device={a.device}'] + (['train.precision=bf16'] if a.bf16 else []) + a.override
    tmp = tempfile.TemporaryDirectory()
    trainers = {name: Trainer(get_config(a.preset, common + over), Path(tmp.name) / f'arm{i}', progress=False)
                for i, (name, over) in enumerate(arms.items())}
    dev = next(iter(trainers.values())).device
    secs = interleaved_times({n: tr.train_step for n, tr in trainers.items()}, reps=a.reps, steps=a.steps,
                             warmup=a.warmup, device=dev)
    times = {n: [1e3 * x for x in v] for n, v in secs.items()}
    names = list(trainers)
    cfg = trainers['plain'].cfg
    res = {'env': machine(a.device), 'preset': a.preset, 'model': cfg.model.preset, 'batch': cfg.train.batch_size,
           'image': list(trainers['plain'].data.images.shape[1:]), 'device': str(dev), 'bf16': a.bf16,
           'torch': torch.__version__, 'threads': torch.get_num_threads(), 'machine': platform.machine(),
           'steps_per_rep': a.steps, 'reps': a.reps, 'arms': {}}
    for n in names:
        res['arms'][n] = {'ms_per_step_median': statistics.median(times[n]), 'ms_per_step_all': times[n],
                          'ratio_to_plain': paired_ratio(times[n], times['plain']), 'overrides': arms[n]}
        K = _sampler_steps(arms[n])
        if K: res['arms'][n]['extra_ms_per_sampler_step'] = (res['arms'][n]['ms_per_step_median']
                                                             - res['arms']['plain']['ms_per_step_median']) / K
    print(json.dumps(res))
    if a.json: Path(a.json).write_text(json.dumps(res, indent=2))
    print(f"\n{cfg.model.preset}, batch {cfg.train.batch_size}, images {tuple(res['image'])}, {dev}, "
          f"{'bf16' if a.bf16 else 'fp32'}, median of {a.reps} interleaved repetitions of {a.steps} steps\n")
    print('| arm | ms/step | ratio to plain | target | extra ms per sampler step |\n|---|---|---|---|---|')
    for n, r in res['arms'].items():
        tgt = '' if n == 'plain' else ('≤ 1.30 ✓' if r['ratio_to_plain'] <= 1.3 else '≤ 1.30 ✗')
        per = f"{r['extra_ms_per_sampler_step']:.1f}" if 'extra_ms_per_sampler_step' in r else ''
        print(f"| {n} | {r['ms_per_step_median']:.1f} | {r['ratio_to_plain']:.3f} | {tgt} | {per} |")
    tmp.cleanup()
    return res


if __name__ == '__main__':
    main()
