"""Run by tests/test_train.py under `accelerate launch` with 2 CPU processes: a callback on the main process asks to
stop (as an early-stopping callback or the dashboard's Stop button would), once before the first step and once at
step 3. Every rank must stop at the same step, with a checkpoint, instead of waiting alone in a collective."""
import sys
from pathlib import Path

import torch

from sadm_lab.config import get_config
from sadm_lab.train import Callback, Trainer

out = Path(sys.argv[1])


class StopAt(Callback):
    def __init__(self, when): self.when = when
    def on_train_begin(self, tr):
        if self.when == 'begin': tr.request_stop()
    def on_step_end(self, tr, logs):
        if self.when == 'step' and tr.step == 3: tr.request_stop()


res = {}
for when in ('begin', 'step'):
    cfg = get_config('smoke', ['train.steps=8', 'eval.enabled=false', 'train.sample_every=0', 'sample.grid_size=4',
                               'sample.steps=2', 'train.log_every=2', 'train.ckpt_every=100'])
    tr = Trainer(cfg, out / when, progress=False, callbacks=[StopAt(when)]).fit()
    res[when] = {'step': tr.step, 'checkpoint': tr.run.latest_checkpoint().name}
torch.save(res, out / f'rank{tr.acc.process_index}.pt')
