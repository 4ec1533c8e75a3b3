"""Train the FID feature network that sadm_lab ships for a dataset and write it into `sadm_lab/feature_nets/`.

    python scripts/ship_feature_net.py                       # the ruler's: Fashion-MNIST at 16x16 (fashion16-dit)
    python scripts/ship_feature_net.py --dataset fashion-mnist --resolution 28

It trains exactly what `sadm_lab.metrics.classifier_features` trains on first use (the same recipe, split and seed, on
the dataset's whole training split, one CPU thread) and prints the weights' sha256 for `SHIPPED_FEATURE_NETS` in
`nbs/api/07_metrics.ipynb`. Training on another CPU kind gives other weights in the last bits (and a network that
only agrees with the shipped one to the precision the ruler page states): that is why one network is shipped, so that
the same images get the same FID on every machine. Rerun it to check or to reproduce the shipped file; commit a new
file only together with a new `FEATURE_NET_RECIPE` or a note in the changelog (every FID it gave changes).
"""
from __future__ import annotations
import argparse, json, platform, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from sadm_lab.core import atomic_write  # noqa: E402
from sadm_lab.data import load_data  # noqa: E402
from sadm_lab.metrics import classifier_features, shipped_feature_net_path  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--dataset', default='fashion-mnist')
    p.add_argument('--resolution', type=int, default=16)
    p.add_argument('--out', type=Path, help='where to write (default: the package folder sadm_lab/feature_nets/)')
    a = p.parse_args(argv)
    data = load_data(a.dataset, resolution=a.resolution, split='train')
    dest = a.out or shipped_feature_net_path(data.name, data.images.shape[1:])
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        ext = classifier_features(data.images, data.labels, data.num_classes, dataset=data.name, cache_dir=tmp,
                                  retrain=True, progress=True)
        with safe_open(ext.meta['path'], framework='pt') as f:
            info = json.loads(f.metadata()['sadm_lab'])
            sd = {k: f.get_tensor(k) for k in f.keys()}
    info['made_by'] = {'script': 'scripts/ship_feature_net.py', 'torch': torch.__version__.split('+')[0],
                       'cpu_capability': torch.backends.cpu.get_cpu_capability(), 'machine': platform.machine(),
                       'train_seconds': round(time.time() - t0, 1), 'date': time.strftime('%Y-%m-%d')}
    atomic_write(dest, lambda q: save_file(sd, q, metadata={'sadm_lab': json.dumps(info, sort_keys=True)}))
    print(json.dumps({'file': str(dest), 'weights_sha256': info['weights_sha256'],
                      'heldout_accuracy': info['heldout_accuracy'], 'train_seconds': info['made_by']['train_seconds']}))
    print(f"\nadd to SHIPPED_FEATURE_NETS: {dest.name!r}: {info['weights_sha256']!r}")


if __name__ == '__main__':
    main()
