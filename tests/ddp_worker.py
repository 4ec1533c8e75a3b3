"Run by tests/test_train.py under `accelerate launch` with 2 CPU processes: train a few steps, save each rank's weights."
import sys
from pathlib import Path

import torch

from sadm_lab.config import get_config
from sadm_lab.train import Trainer

out = Path(sys.argv[1])
cfg = get_config('smoke', ['train.steps=6', 'eval.enabled=false', 'train.sample_every=0', 'sample.grid_size=4',
                           'sample.steps=2', 'train.log_every=2'])
tr = Trainer(cfg, out / 'run', progress=False)
init = {k: v.clone() for k, v in tr.unwrapped.state_dict().items()}
tr.fit()
torch.save({'model': tr.unwrapped.state_dict(), 'ema': tr.ema.model.state_dict(), 'init': init, 'step': tr.step,
            'world_size': tr.acc.num_processes}, out / f'rank{tr.acc.process_index}.pt')
