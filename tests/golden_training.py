"""Golden training runs: a few steps of every objective combination the trainer offers, in float32, summarised by
per-tensor [sum, L2 norm, number of elements] of the final weights (model, EMA, structure encoder) and the logged
losses. bf16 is not pinned: `plain-v-bf16` is compared with the float32 run `plain-v` at bf16's precision.

`tests/test_golden_training.py` re-trains them and compares with `fixtures/golden_training.json`, so a refactor of the
trainer or the objectives cannot change what training computes without a test failing. Regenerate the file only for a
change that is meant to alter training numerics, and say so in its commit:

    python tests/golden_training.py      # rewrites tests/fixtures/golden_training.json
"""
from __future__ import annotations
import json, sys, tempfile
from pathlib import Path

import torch

from sadm_lab.config import get_config
from sadm_lab.train import Trainer, RunDir

FIXTURE = Path(__file__).parent / 'fixtures' / 'golden_training.json'
BASE = ['train.device=cpu', 'eval.enabled=false', 'train.sample_every=0', 'train.log_every=2', 'train.ckpt_every=100',
        'train.steps=10', 'train.warmup_steps=3', 'sample.steps=2', 'sample.grid_size=4', 'train.batch_size=16']

RUNS = {
    'plain': [],
    'plain-x0-minsnr-cosine': ['diffusion.prediction=x0', 'diffusion.loss_weighting=min_snr', 'train.lr_schedule=cosine',
                               'train.grad_accum=2', 'train.weight_decay=0.01'],
    'plain-v': ['diffusion.prediction=v'],
    'plain-v-bf16': ['diffusion.prediction=v', 'train.precision=bf16'],       # not pinned: checked against plain-v
    'masked-patch-two-stage': ['mask.strategy=patch', 'mask.ratio=0.5', 'mask.pretrain_steps=6', 'mask.finetune_lr=5e-4',
                               'mask.finetune_warmup_steps=2', 'train.lr_schedule=cosine'],
    'masked-patch-anneal': ['mask.strategy=patch', 'mask.ratio=0.75', 'mask.pretrain_steps=8', 'mask.anneal=cosine',
                            'mask.reset_optimizer=false', 'mask.reset_ema=false'],
    'masked-crop-uvit': ['model.preset=UViT-T/2', 'model.depth=3', 'mask.strategy=crop', 'mask.crop_size=2'],
    'masked-block-uvit': ['model.preset=UViT-T/2', 'model.depth=3', 'mask.strategy=block', 'mask.block_size=2',
                          'mask.ratio=0.5', 'mask.pretrain_steps=5'],
    'maskdit-mae': ['model.preset=MaskDiT-T/2', 'mask.strategy=patch', 'mask.ratio=0.5', 'mask.mae_weight=0.1',
                    'mask.pretrain_steps=6'],
    'sadm': ['sadm.enabled=true', 'sadm.variant=literal',
             'sadm.weight=0.5', 'sadm.start_step=3', 'sadm.warmup_steps=3', 'sadm.heldout_size=8'],
    'sadm-options': ['sadm.enabled=true', 'sadm.variant=literal',
                     'sadm.weight=0.3', 'sadm.warmup_steps=0', 'sadm.time_cond=true',
                     'sadm.r1_gamma=0.1', 'sadm.d_every=2', 'sadm.d_steps=2', 'sadm.affinity=softmax', 'sadm.omega=dsm',
                     'sadm.spectral_norm=true', 'train.grad_accum=2', 'sadm.heldout_size=0'],
    'sadm-after-masked': ['mask.strategy=patch', 'mask.ratio=0.5', 'mask.pretrain_steps=4', 'sadm.enabled=true',
                          'sadm.variant=literal', 'sadm.weight=0.2', 'sadm.start_step=6', 'sadm.warmup_steps=2', 'sadm.affinity=gaussian',
                          'sadm.p=2', 'sadm.omega=snr', 'sadm.heldout_size=8'],
}


PINNED = [n for n in RUNS if n != 'plain-v-bf16']


def _sums(sd: dict) -> dict:
    "name -> [sum, L2 norm, numel] of every floating-point tensor (the norm scales what a difference in the sum means)."
    return {k: [float(v.double().sum()), float(v.double().norm()), v.numel()] for k, v in sd.items()
            if torch.is_tensor(v) and v.is_floating_point()}


def summarise(run_dir: Path) -> dict:
    "Per-tensor sums of the last checkpoint's weights and the logged training values of a run folder."
    ck = torch.load(RunDir(run_dir).latest_checkpoint(), weights_only=True)
    out = {'model': _sums(ck['model']), 'ema': _sums(ck['ema'])}
    objectives = ck.get('objectives') or {}
    sadm = objectives.get('sadm', ck.get('sadm'))
    if sadm: out['encoder'] = _sums(sadm['encoder'])
    keys = ('loss', 'mae', 'g_struct', 'd_obj', 'r1', 'lambda', 'mask_ratio', 'heldout_struct', 'heldout_struct_pixels')
    out['logs'] = [{k: r[k] for k in keys if r.get(k) is not None} | {'step': r['step']}
                   for r in RunDir(run_dir).read_metrics() if r.get('kind') == 'train']
    return out


def train(name: str, root: Path) -> dict:
    torch.set_num_threads(1)
    Trainer(get_config('smoke', BASE + RUNS[name] + [f'name={name}']), root / name, progress=False).fit()
    return summarise(root / name)


if __name__ == '__main__':
    names = sys.argv[1:] or PINNED
    data = json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in names:
            data[n] = train(n, Path(tmp))
            print(n, 'loss', [r['loss'] for r in data[n]['logs']][-1])
    meta = {'torch': torch.__version__, 'cpu_capability': torch.backends.cpu.get_cpu_capability()}
    FIXTURE.write_text(json.dumps({**meta, **{k: v for k, v in data.items() if k not in meta}}, indent=1) + '\n')
