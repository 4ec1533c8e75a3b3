"""An official DiT release file (a plain state dict in facebookresearch/DiT's layout: DiT-S/2, 32x32x4 latents, 1000
classes, learned sigma) loads strictly through train.init_from and fine-tunes with the masked objective (MaskDM) and
with a structure objective (SADM), as the README's paper-setting commands do at full scale."""
import json
from pathlib import Path

import pytest
import torch

from sadm_lab.config import get_config
from sadm_lab.core import CheckpointError
from sadm_lab.data import ImageData
from sadm_lab.train import Trainer

FIXTURES = Path(__file__).parent / 'fixtures'
OFFICIAL = ['model.preset=DiT-S/2', 'model.learn_sigma=true', 'model.class_dropout_prob=0.1', 'diffusion.schedule=linear',
            'train.batch_size=4', 'train.lr=1e-4', 'train.warmup_steps=0', 'eval.enabled=false', 'sadm.heldout_size=0',
            'sample.grid_size=2', 'sample.steps=2', 'train.log_every=1']


@pytest.fixture(scope='module')
def release(tmp_path_factory):
    "A file like DiT-S-2-256x256.pt: random values in every official key and shape (the fixture lists them)."
    spec = json.loads((FIXTURES / 'dit_s2_official_state_dict.json').read_text())
    g = torch.Generator().manual_seed(0)
    sd = {k: 0.02 * torch.randn(s, generator=g) for k, s in spec['keys'].items()}
    path = tmp_path_factory.mktemp('release') / 'DiT-S-2-256x256.pt'
    torch.save(sd, path)
    return path, sd


def latents(n=8):
    "Stand-ins for cached ImageNet latents: 32x32x4, 1000 classes."
    g = torch.Generator().manual_seed(1)
    return ImageData(torch.randn(n, 4, 32, 32, generator=g), torch.randint(0, 1000, (n,), generator=g), 1000,
                     name='latents')


@pytest.mark.slow
@pytest.mark.parametrize('setting', [
    ['mask.strategy=patch', 'mask.ratio=0.5'],                                  # MaskDM: masked fine-tuning
    ['sadm.enabled=true', 'sadm.variant=linear', 'sadm.weight=0.1', 'sadm.warmup_steps=0'],   # SADM fine-tuning
])
def test_an_official_release_file_fine_tunes_with_each_objective(release, tmp_path, setting):
    path, sd = release
    cfg = get_config('digits-dit', [*OFFICIAL, *setting, 'train.steps=2', f'train.init_from={path}'])
    tr = Trainer(cfg, tmp_path / 'run', progress=False, data=latents())
    for k, v in sd.items(): assert torch.equal(tr.unwrapped.state_dict()[k], v), k      # strict, every key
    tr.fit()
    assert tr.step == 2
    moved = max((tr.unwrapped.state_dict()[k] - v).abs().max().item() for k, v in sd.items())
    assert moved > 0
    logs = [r for r in tr.run.read_metrics() if r.get('kind') == 'train']
    assert logs and all(torch.isfinite(torch.tensor(r['loss'])) for r in logs)
    if 'mask.strategy=patch' in setting: assert logs[-1]['mask_ratio'] == pytest.approx(0.5)
    else: assert all(r['g_struct'] > 0 and 'd_obj' in r for r in logs)            # the structure term ran


def test_a_release_file_for_another_model_is_refused_naming_the_mismatch(release, tmp_path):
    path, _ = release
    cfg = get_config('digits-dit', [*OFFICIAL, 'model.preset=DiT-B/2', 'train.steps=1', f'train.init_from={path}'])
    with pytest.raises(CheckpointError, match='shape mismatches'):
        Trainer(cfg, tmp_path / 'run', progress=False, data=latents())
