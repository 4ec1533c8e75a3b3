#!/usr/bin/env python
"""FID of finished runs under a *third* feature network: neither the FID classifier (seed 0, width 32, 128 features)
nor the representation term's outside classifier (seed 1, width 48, 96 features), so a structure term trained
against one feature space cannot have gamed the ruler.

For every run folder given (e.g. the arms of `sadm_finetune.py`), the EMA weights of its last checkpoint draw
`--samples` images with the run's own sampler settings (or `--sampler`, `--steps`) and a fixed seed; their FID
against the run's training images is measured with a `FeatureCNN` of another recipe (`--seed`, `--width`, `--feat-dim`; trained once on the data and
cached like the FID classifier), with the real-vs-real floor of the same protocol, beside the FID the run itself
logged last. Runs named `<arm>-s<seed>` are summarised per arm (mean ± std). Prints a table and JSON (`--json`).

    python benchmarks/third_ruler_fid.py runs/sadm-finetune/*-s*       # every fine-tuning run of a comparison
    python benchmarks/third_ruler_fid.py runs/sadm-finetune/*-s* --sampler ddim --steps 2 --seed 0 --width 32 \
        --feat-dim 128                       # a 2-step DDIM chain under the FID classifier's own recipe
"""
from __future__ import annotations
import argparse, json, re, statistics
from pathlib import Path

import torch

from sadm_lab.core import atomic_write_json  # noqa: E402
from sadm_lab.metrics import FIDEvaluator, classifier_features  # noqa: E402
from sadm_lab.sample import generate  # noqa: E402
from sadm_lab.train import RunDir, load_run  # noqa: E402


def run_fid(run: Path, a, cache: dict) -> dict:
    model, diffusion, cfg, data = load_run(run, weights='ema', device=a.device)
    key = (cfg.data.name, tuple(data.images.shape))
    if key not in cache:
        ext = classifier_features(data.images, data.labels, data.num_classes, dataset=data.name, seed=a.seed,
                                  width=a.width, feat_dim=a.feat_dim, progress=False,
                                  device=a.device)
        cache[key] = FIDEvaluator(data.images, ext, n=a.samples)
    sc = cfg.sample
    sampler, steps = a.sampler or sc.sampler, a.steps or sc.steps
    with torch.no_grad():
        imgs = generate(model, diffusion, a.samples, sampler=sampler, steps=steps,
                        eta=sc.eta if sampler == 'ddim' else 0., cfg_scale=sc.cfg_scale, batch_size=sc.batch_size,
                        generator=torch.Generator(device=a.device).manual_seed(1234), device=a.device,
                        progress=False)
    res = cache[key](imgs)
    evals = [r for r in RunDir(run).read_metrics() if r.get('kind') == 'eval']
    m = re.fullmatch(r'(.+)-s(\d+)', run.name)
    return {'run': str(run), 'arm': m.group(1) if m else run.name, 'seed': int(m.group(2)) if m else None,
            'fid_third': res['fid'], 'floor_third': res['floor'],
            'fid_logged': evals[-1]['fid'] if evals else None, 'floor_logged': evals[-1].get('fid_floor') if evals else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='\n'.join(__doc__.split('\n')[1:]))
    p.add_argument('runs', nargs='+', help='run folders')
    p.add_argument('--samples', type=int, default=800)
    p.add_argument('--seed', type=int, default=2)
    p.add_argument('--width', type=int, default=24)
    p.add_argument('--feat-dim', type=int, default=64)
    p.add_argument('--sampler', help="sampler (default: each run's own), e.g. ddim with --steps 2 for a few-step chain")
    p.add_argument('--steps', type=int, help="sampling steps (default: each run's own)")
    p.add_argument('--device', default='cpu', help='where the runs sample and the features are computed (e.g. cuda)')
    p.add_argument('--json', help='also write the JSON here')
    a = p.parse_args(argv)
    runs = [Path(r) for r in a.runs]
    bad = [str(r) for r in runs if not (r / 'config.json').is_file()]
    if bad: p.error(f'not run folders: {bad}')
    cache, rows = {}, []
    for r in runs:
        rows.append(run_fid(r, a, cache))
        print(f"{rows[-1]['arm']:>16} seed {rows[-1]['seed']}: third-ruler FID {rows[-1]['fid_third']:.3f} "
              f"(floor {rows[-1]['floor_third']:.3f}), logged FID {rows[-1]['fid_logged']}", flush=True)
    arms = {}
    for r in rows: arms.setdefault(r['arm'], []).append(r)
    summary = {arm: {k: (statistics.mean(x[k] for x in rs), statistics.stdev(x[k] for x in rs) if len(rs) > 1 else 0.0)
                     for k in ('fid_third', 'fid_logged') if all(x[k] is not None for x in rs)}
               for arm, rs in arms.items()}
    res = {'recipe': {'seed': a.seed, 'width': a.width, 'feat_dim': a.feat_dim}, 'samples': a.samples,
           'sampler': a.sampler, 'steps': a.steps,
           'floor_third': rows[0]['floor_third'], 'runs': rows, 'summary': summary}
    print(json.dumps(res))
    if a.json: atomic_write_json(Path(a.json), res)
    print(f"\n| arm | FID, third ruler (floor {rows[0]['floor_third']:.2f}) | FID as logged |\n|---|---|---|")
    for arm, s in summary.items():
        f = lambda k: f"{s[k][0]:.2f} ± {s[k][1]:.2f}" if k in s else '–'
        print(f"| {arm} | {f('fid_third')} | {f('fid_logged')} |")
    return res


if __name__ == '__main__':
    main()
