"""Run by tests/test_structure.py under `accelerate launch` with 2 CPU processes. Part 1: the global-batch structure
term's gradients (generator and discriminator) on each process; rank 0 also computes the one-process reference on the
whole batch. Part 2: a few Trainer steps with sadm.global_batch=true. Each rank saves what it saw."""
import sys
from copy import deepcopy
from pathlib import Path

import torch
from torch import nn
from accelerate import Accelerator

from sadm_lab.config import get_config
from sadm_lab.diffusion import Diffusion
from sadm_lab.structure import StructureEncoder, StructureTerm
from sadm_lab.train import Trainer

out = Path(sys.argv[1])
acc = Accelerator(cpu=True)
rank, world = acc.process_index, acc.num_processes
B = 8                                               # global batch; each process holds B / world samples
g = torch.Generator().manual_seed(0)
x0 = torch.rand(B, 1, 8, 8, generator=g) * 2 - 1
noise = torch.randn(B, 1, 8, 8, generator=g)
t = torch.tensor([3, 40, 90, 200, 310, 420, 450, 480])     # all below t_max·T, so every sample counts
torch.manual_seed(1)
den0 = nn.Conv2d(1, 1, 3, padding=1)
enc0 = StructureEncoder((1, 8, 8), dim=8)
dif = Diffusion(schedule='cosine', timesteps=1000)
term = StructureTerm(dif, global_batch=True, t_max=0.5)
sl = slice(rank * B // world, (rank + 1) * B // world)

# generator: gradient of D over the global batch w.r.t. the denoiser, through DDP's gradient average
den = acc.prepare_model(deepcopy(den0))
d, n = term.g_term(enc0, x0[sl], den(x0[sl] + noise[sl]), t[sl])
d.backward()
res = {'g_value': d.detach() / world, 'n': n, 'g_grad': {k: p.grad.clone() for k, p in den.module.named_parameters()}}

# discriminator: one SGD step of the encoder (DDP-wrapped) on the global structure
enc = deepcopy(enc0)
opt = torch.optim.SGD(enc.parameters(), lr=0.1)
d_out = term.d_update(acc.prepare_model(enc), opt, x0[sl], (x0[sl] + 0.3 * noise[sl]), t[sl])
res.update(d_obj=d_out['d_obj'], enc_after={k: v.clone() for k, v in enc.state_dict().items()})

if rank == 0:                                       # one process, the whole batch, no gathering
    den_r, enc_r = deepcopy(den0), deepcopy(enc0)
    ref_term = StructureTerm(dif, global_batch=False, t_max=0.5)
    d_r, _ = ref_term.g_term(enc_r, x0, den_r(x0 + noise), t)
    d_r.backward()
    opt_r = torch.optim.SGD(enc_r.parameters(), lr=0.1)
    dr_out = ref_term.d_update(enc_r, opt_r, x0, x0 + 0.3 * noise, t)
    res['ref'] = {'g_value': d_r.detach(), 'g_grad': {k: p.grad.clone() for k, p in den_r.named_parameters()},
                  'd_obj': dr_out['d_obj'], 'enc_after': {k: v.clone() for k, v in enc_r.state_dict().items()}}

# the trainer with the structure over the gathered global batch
cfg = get_config('smoke', ['train.steps=4', 'eval.enabled=false', 'train.sample_every=0', 'sample.grid_size=4',
                           'sample.steps=2', 'train.log_every=2', 'train.batch_size=8', 'sadm.enabled=true',
                           'sadm.variant=literal', 'sadm.global_batch=true', 'sadm.warmup_steps=0', 'sadm.heldout_size=8'])
tr = Trainer(cfg, out / 'run', progress=False, accelerator=acc).fit()
res.update(model=tr.unwrapped.state_dict(), encoder=tr.objectives['sadm'].encoder.state_dict(), world=world)
torch.save(res, out / f'rank{rank}.pt')
