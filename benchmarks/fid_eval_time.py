"""Time of one FID evaluation at a given N: feature extraction (images/s) with the classifier and the Inception
features, building the evaluator with the reference statistics computed (cold cache) vs loaded (warm cache), one
evaluation, and the extra cost of precision/recall. Prints a table and JSON (also written with --out).

    python benchmarks/fid_eval_time.py --n 800 --features classifier,inception --inception-n 48 --device cpu
    python benchmarks/fid_eval_time.py --preset fashion16-dit --n 5000 --features classifier,inception  # the ruler

Without `--preset`, digits (1,797 images) are tiled with a little noise when 2N real images are needed beyond that: the numbers are
timings, not scores. The Inception network (~0.14 s per image on a 2-core CPU) gets its own, smaller N.
"""
from __future__ import annotations
import argparse, json, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
import torch  # noqa: E402
from sadm_lab.core import sync  # noqa: E402


def digits_real(n_real: int, seed: int = 0):
    "At least `n_real` digit images in [-1, 1] (tiled with small noise beyond the 1,797) and their labels."
    from sklearn.datasets import load_digits
    d = load_digits()
    x, y = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8 - 1, torch.tensor(d.target)
    reps = -(-n_real // len(x))
    g = torch.Generator().manual_seed(seed)
    xs = torch.cat([x] + [(x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1) for _ in range(reps - 1)])
    return xs, y.repeat(reps)


def timed(fn, device):
    sync(device); t0 = time.perf_counter(); out = fn(); sync(device)
    return out, time.perf_counter() - t0


def preset_real(preset: str):
    "A preset's FID reals (the split its `eval.reference` names) and its training data (the classifier's)."
    from sadm_lab.config import get_config
    from sadm_lab.train import build_data, build_reference_data
    cfg = get_config(preset)
    return build_reference_data(cfg, cfg.eval.reference).images, build_data(cfg)


def measure(kind: str, n: int, device: str, batch_size: int | None, preset: str | None = None) -> dict:
    from sadm_lab.metrics import FIDEvaluator, classifier_features, InceptionFeatures, extract_features
    if preset:
        real, train = preset_real(preset)
        real = real[:2 * n + 10]
        if len(real) < 2 * n: raise SystemExit(f'{preset}: {len(real)} reference images, fewer than 2N = {2 * n}')
    else: real = digits_real(2 * n + 10)[0][:2 * n + 10]
    if kind == 'classifier' and preset:
        ext = classifier_features(train.images, train.labels, train.num_classes, dataset=train.name, progress=False,
                                  device=device)
    elif kind == 'classifier':
        d_real, d_labels = digits_real(1797)
        ext = classifier_features(d_real[:1797], d_labels[:1797], 10, dataset='digits', progress=False, device=device)
    else:
        ext = InceptionFeatures(device=device)
    bs = batch_size or (32 if kind == 'inception' else 256)
    fake = (real[:n] + 0.3 * torch.randn(real[:n].shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    extract_features(ext, fake[:bs], batch_size=bs)                         # warm-up (allocations, TorchScript)
    _, t_feat = timed(lambda: extract_features(ext, fake, batch_size=bs), device)
    with tempfile.TemporaryDirectory() as cache:
        kw = dict(n=n, batch_size=bs, cache=cache)
        ev, t_cold = timed(lambda: FIDEvaluator(real, ext, **kw), device)
        res, t_eval_cold = timed(lambda: ev(fake), device)                  # generated + floor set (first time)
        ev2, t_warm = timed(lambda: FIDEvaluator(real, ext, **kw), device)
        assert ev2.ref_source == 'cache'
        res2, t_eval_warm = timed(lambda: ev2(fake), device)                # floor statistics from the cache too
        assert res2 == res
        evp = FIDEvaluator(real, ext, precision_recall=True, **kw)
        resp, t_eval_pr = timed(lambda: evp(fake), device)
    return dict(features=kind, data=preset or 'digits', tag=ext.tag, n=n, n_ref=res['n_ref'], device=device, batch_size=bs,
                extract_img_per_s=round(n / t_feat, 1), build_cold_s=round(t_cold, 3), build_cached_s=round(t_warm, 3),
                eval_first_s=round(t_eval_cold, 3), eval_cached_floor_s=round(t_eval_warm, 3),
                eval_with_pr_s=round(t_eval_pr, 3), total_cold_s=round(t_cold + t_eval_cold, 3),
                total_cached_s=round(t_warm + t_eval_warm, 3), fid=round(res['fid'], 4), floor=round(res['floor'], 4),
                precision=round(resp['precision'], 4), recall=round(resp['recall'], 4))


COLUMNS = ['features', 'data', 'n', 'n_ref', 'extract_img_per_s', 'build_cold_s', 'build_cached_s', 'eval_first_s',
           'eval_cached_floor_s', 'eval_with_pr_s', 'total_cold_s', 'total_cached_s']


def table(rows: list[dict]) -> str:
    lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    return '\n'.join(lines + ['| ' + ' | '.join(str(r[c]) for c in COLUMNS) + ' |' for r in rows])


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--n', type=int, default=800, help='generated images per FID with the classifier features')
    ap.add_argument('--inception-n', type=int, default=48, help='generated images per FID with Inception (slow on CPU)')
    ap.add_argument('--features', default='classifier', help="comma list of 'classifier', 'inception'")
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--preset', help="real images of this preset's data and FID reference (e.g. fashion16-dit, the "
                                     "ruler: --n 5000) instead of tiled digits")
    ap.add_argument('--batch-size', type=int, default=None)
    ap.add_argument('--out', type=Path, default=None, help='also write the JSON here')
    a = ap.parse_args(argv)
    rows = []
    for kind in [k.strip() for k in a.features.split(',') if k.strip()]:
        if kind not in ('classifier', 'inception'): ap.error(f'unknown features {kind!r}')
        rows.append(measure(kind, a.inception_n if kind == 'inception' else a.n, a.device, a.batch_size, a.preset))
    print(table(rows))
    print(json.dumps(rows, indent=2))
    if a.out: a.out.write_text(json.dumps(rows, indent=2) + '\n')
    return rows


if __name__ == '__main__':
    main()
