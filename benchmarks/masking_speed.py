#!/usr/bin/env python
"""Training step time and peak memory of MaskDM-style masked training against the mask ratio, for DiT and U-ViT.

One training step is what `sadm_lab.train` does per micro-batch: draw a mask (`sadm_lab.masking.make_mask`, strategy
'patch' by default) and turn it into `keep_idx` (`mask_to_keep_idx`), forward plus the masked denoising loss
(`Diffusion.training_losses(model, x0, y=, generator=, view=token_view(model, keep_idx))`), backward, AdamW step. Ratio 0 is the
unmasked baseline (`keep_idx=None`, i.e. `mask.strategy='none'`). Each preset has one model and one AdamW optimizer,
shared by all its ratios; short repetitions of all ratios are interleaved (order alternating between repetitions) so
drifts in machine load hit every ratio alike. Reported per ratio: ms/step (best repetition, like `timeit`; median and
all in the JSON), the speed-up over ratio 0 as the median over repetitions of the paired ratio t(0)/t(r) (each pair ran
back to back, so load on a shared machine mostly cancels), and beside it two ideals: the token-count ratio N/N_vis and
the FLOPs ratio `flops_per_forward(model)` / `flops_per_forward(model, num_tokens=N_vis)`. The optimizer step is also
timed inside every step (CUDA events on a GPU, so nothing is synchronised): it does not depend on the tokens, and the
'+opt' column shows the best speed-up left once it is kept fixed and everything else shrinks like the FLOPs.

Peak memory (one model at a time, after the timings): on CUDA `torch.cuda.max_memory_allocated` over one step per ratio
of a freshly built model that has taken one step already, minus what was allocated before it; on CPU the peak resident set
size of a fresh subprocess that builds the model and runs two steps at that ratio, minus its resident size after
imports (weights, gradients, AdamW state and activations; allocator caching included).

What stands between the measured speed-up and the ideal (read off sadm_lab/models and sadm_lab/diffusion.py):

* Patch embedding runs on all N tokens, not only the visible ones: both `DiT.forward` and `UViT.forward` compute
  `x_embedder(x) + pos_embed` / `patch_embed(x) + pos_embed` on the whole image and only then `gather_tokens(h, keep_idx)`;
  in the backward the gather scatters into a dense (B, N, D) gradient and the conv's weight gradient covers all N
  positions. `flops_per_forward(num_tokens=N_vis)` counts the patch embedding at N_vis, so it is slightly optimistic
  here; the JSON also gives `ideal_flops_as_run` with the patch embedding at N (the difference is small: C*p*p << D).
* The output head runs only on visible tokens: DiT's `final_layer` and U-ViT's `norm` + `decoder_pred` act on the
  gathered tokens and the output is returned as tokens (no unpatchify; U-ViT's `conv=True` head refuses `keep_idx`).
* Per-image conditioning does not shrink: DiT's timestep MLP (256*D + D*D MACs), label embedding and, in every block
  and the final layer, the adaLN modulation Linear(D, 6D) (Linear(D, 2D) in the final layer) run once per image
  whatever N_vis is (only the `modulate` that applies them is per token). `flops_per_forward` includes these, which is
  why the FLOPs ideal is below what the quadratic attention alone would give. U-ViT has no adaLN (and, in its presets,
  no time MLP: `mlp_time_embed=False`); instead it carries time (and class) as extra tokens that are never dropped, so
  its blocks see N_vis + 1 (+1) tokens; the FLOPs ideal counts them.
* Attention is quadratic in the tokens (2*N^2*D MACs per block in `transformer_block_macs`), so the FLOPs ideal can
  exceed N/N_vis: dropping 90 % of the tokens removes ~99 % of the attention-score work.
* The AdamW step (and `zero_grad`) costs the same at every ratio: it reads and writes every parameter, its gradient
  and two moments (16 bytes of fp32 state per parameter, memory-bound). Likewise the weights, gradients and optimizer
  state set a floor under the peak memory that masking cannot lower.
* The loss itself (`training_losses`) draws noise, forms x_t and the target and patchifies them on the full image
  before gathering the visible tokens: cheap elementwise work, but proportional to N, not N_vis.
* Small shapes run less efficiently: at 90 % masking the GEMMs have B*N_vis rows (208 at the defaults) instead of
  B*N, which uses the CPU's cores and caches (or a GPU's SMs) less well; the elementwise ops (LayerNorm, GELU, adaLN
  addcmul, residuals, softmax) are memory-bound, and the per-op dispatch overhead of eager PyTorch (hundreds of
  small ops per step, forward and backward) does not shrink at all. On a GPU at small batches this launch overhead
  dominates even sooner.

On a shared CPU, another process running torch on the same cores makes the OpenMP threads wait for each other, and a
single repetition can then take 3-10x longer; the paired median absorbs isolated bursts, and the load average before
and after is recorded. Use more --reps (or --threads 1) when the machine is busy.

    python benchmarks/masking_speed.py                          # CPU default: DiT-S/2 and UViT-T/2, 4x32x32, batch 8, ~2 min
    python benchmarks/masking_speed.py --models UViT-S/2 --strategy block --reps 9
    python benchmarks/masking_speed.py --device cuda --models DiT-S/2,UViT-S/2,DiT-B/2 --batch 64 --steps 5 --bf16
"""
from __future__ import annotations
import argparse, json, os, platform, statistics, sys, time
from pathlib import Path

import torch

from _common import machine, sync, rss_bytes, peak_rss_bytes, run_memory_probe   # noqa: E402  (benchmarks/ is on sys.path)
from sadm_lab.models import build_model, family_of, flops_per_forward, count_params   # noqa: E402
from sadm_lab.diffusion import Diffusion   # noqa: E402
from sadm_lab.masking import STRATEGIES, make_mask, mask_to_keep_idx, token_grid, token_view, visible_count   # noqa: E402

TARGET = dict(model='DiT-S/2', ratio=0.9, speedup=4.0)   # the target, on CPU


def build(preset: str, a) -> torch.nn.Module:
    return build_model(preset, input_size=a.input_size, in_channels=a.channels, num_classes=a.num_classes)


class Bench:
    "One model, its AdamW optimizer and fixed data; `step(ratio)` is one masked training step."
    def __init__(self, preset: str, a, device):
        self.preset, self.a, self.device = preset, a, device
        self.model = build(preset, a).to(device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.0)
        self.diffusion = Diffusion()
        self.grid = token_grid(a.input_size, self.model.patch_size)
        g = torch.Generator(device='cpu').manual_seed(0)
        self.x0 = torch.randn(a.batch, a.channels, a.input_size, a.input_size, generator=g).to(device)
        self.y = torch.randint(0, a.num_classes, (a.batch,), generator=g).to(device) if a.num_classes > 0 else None
        self.gen = torch.Generator(device=device).manual_seed(0)   # masks, timesteps and noise, drawn on the device
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16)
        self._marks = []

    def keep_idx(self, ratio: float):
        if ratio == 0: return None   # the unmasked baseline (mask.strategy='none')
        a = self.a
        mask = make_mask(a.strategy, a.batch, self.grid, ratio=ratio, block_size=a.block_size, generator=self.gen, device=self.device)
        return mask_to_keep_idx(mask)

    def step(self, ratio: float):
        keep_idx = self.keep_idx(ratio)
        with self.amp:
            view = None if keep_idx is None else token_view(self.model, keep_idx)
            out = self.diffusion.training_losses(self.model, self.x0, y=self.y, generator=self.gen, view=view)
        loss = out['loss'].float().mean()
        loss.backward()
        m0 = self._mark()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._marks.append((m0, self._mark()))
        return loss

    def _mark(self):
        "A timestamp that does not stall the device: a recorded CUDA event, or perf_counter on CPU."
        if self.device.type != 'cuda': return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True); ev.record()
        return ev

    def time_steps(self, ratio: float, n: int) -> tuple[float, float]:
        "Seconds for `n` steps at `ratio`, and of them the seconds spent in the AdamW step + zero_grad (timed in place)."
        self._marks = []
        sync(self.device); t0 = time.perf_counter()
        for _ in range(n): self.step(ratio)
        sync(self.device)
        total = time.perf_counter() - t0
        opt = sum(b.elapsed_time(e) / 1e3 if self.device.type == 'cuda' else e - b for b, e in self._marks)
        return total, opt


# ---- CPU peak memory: one fresh subprocess per (model, ratio) ----
def memory_probe(a):
    "Subprocess entry: build one model, run two steps at one ratio (the second has AdamW state), print the peak RSS growth."
    preset, ratio = a._probe[0], float(a._probe[1])
    base = rss_bytes()
    b = Bench(preset, a, torch.device('cpu'))
    for _ in range(2): b.step(ratio)
    print(json.dumps({'peak_bytes': peak_rss_bytes() - base}))


def cpu_peak_memory(preset: str, ratio: float, a) -> int | None:
    cmd = [sys.executable, __file__, '--_probe', preset, repr(ratio), '--batch', str(a.batch), '--input-size', str(a.input_size),
           '--channels', str(a.channels), '--num-classes', str(a.num_classes), '--strategy', a.strategy,
           '--block-size', str(a.block_size), '--threads', str(torch.get_num_threads())]
    if a.bf16: cmd.append('--bf16')
    return run_memory_probe(cmd, f'{preset} at ratio {ratio}')


def cuda_peak_memory(preset: str, ratios, a, device) -> dict:
    "Peak allocated bytes of one step per ratio on a freshly built model (after one step, so AdamW state exists), above what was allocated before building it."
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    b = Bench(preset, a, device)
    b.step(ratios[0]); sync(device)
    out = {}
    for r in ratios:
        torch.cuda.reset_peak_memory_stats(device)
        b.step(r); sync(device)
        out[r] = torch.cuda.max_memory_allocated(device) - base
    del b
    torch.cuda.empty_cache()
    return out


# ---- the run ----
def parse_ratios(s: str) -> list[float]:
    rs = sorted({float(x) for x in s.split(',') if x.strip()})
    bad = [r for r in rs if not 0 <= r < 1]
    if bad: raise SystemExit(f'mask ratios must be in [0, 1), got {bad}')
    return rs if 0.0 in rs else [0.0] + rs   # ratio 0 is the baseline every speed-up is measured against


def model_info(b: Bench, ratios, a) -> dict:
    m = b.model
    N = m.num_patches
    full = flops_per_forward(m)
    embed_per_token = m.in_channels * m.patch_size ** 2 * m.hidden_size   # patch-embedding MACs per token
    rows = []
    for r in ratios:
        nv = N if r == 0 else visible_count(a.strategy, b.grid, ratio=r, block_size=a.block_size)
        f = flops_per_forward(m, num_tokens=nv)
        rows.append(dict(ratio=r, ratio_actual=1 - nv / N, n_visible=nv, ideal_tokens=N / nv, ideal_flops=full / f,
                         ideal_flops_as_run=full / (f + (N - nv) * embed_per_token), gmacs_per_forward=f / 1e9))
    return dict(model=b.preset, family=family_of(b.preset), params=count_params(m), num_tokens=N,
                gmacs_per_forward=full / 1e9, rows=rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--models', default='DiT-S/2,UViT-T/2', help='comma-separated DiT_models / UViT_models preset names')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--input-size', type=int, default=32)
    p.add_argument('--channels', type=int, default=4)
    p.add_argument('--num-classes', type=int, default=10, help='class-conditional models (0: unconditional)')
    p.add_argument('--ratios', default='0,0.5,0.75,0.9', help='comma-separated mask ratios; 0 (the baseline) is always added')
    p.add_argument('--strategy', default='patch', choices=STRATEGIES, help='sadm_lab.masking strategy')
    p.add_argument('--block-size', type=int, default=4, help="block side in tokens for --strategy block")
    p.add_argument('--steps', type=int, default=1, help='training steps per timed repetition')
    p.add_argument('--reps', type=int, default=7, help='interleaved repetitions per (model, ratio)')
    p.add_argument('--warmup', type=int, default=1, help='untimed steps per (model, ratio) first')
    p.add_argument('--bf16', action='store_true', help='bf16 autocast (CPU or CUDA)')
    p.add_argument('--device', default='cpu', help="cpu, cuda, cuda:N or auto")
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    p.add_argument('--no-memory', action='store_true', help='skip the peak-memory measurement')
    p.add_argument('--json', default=None, help='also write the JSON result to this file')
    p.add_argument('--_probe', nargs=2, metavar=('MODEL', 'RATIO'), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    if a._probe: return memory_probe(a)
    from sadm_lab.core import get_device
    device = get_device(a.device)
    ratios = parse_ratios(a.ratios)
    presets = [m.strip() for m in a.models.split(',') if m.strip()]
    unknown = [m for m in presets if family_of(m) is None]
    if unknown: raise SystemExit(f'unknown model preset(s) {unknown}')
    load_before = os.getloadavg() if hasattr(os, 'getloadavg') else None
    torch.manual_seed(0)
    t_start = time.perf_counter()
    benches = [Bench(pr, a, device) for pr in presets]
    infos = [model_info(b, ratios, a) for b in benches]
    names = ', '.join(f"{i['model']} ({i['num_tokens']} tokens)" for i in infos)
    print(f"timing {names} at ratios {ratios}, "
          f"{a.strategy} masks, {device}, {torch.get_num_threads()} threads ...", file=sys.stderr)
    for b in benches:                                    # warm-up: allocator, kernels per shape, optimizer state
        for r in ratios:
            for _ in range(a.warmup): b.step(r)
    times = [{r: [] for r in ratios} for _ in benches]
    opt_times = [[] for _ in benches]                    # seconds per AdamW step (+ zero_grad), every timed step pooled
    for rep in range(a.reps):                            # interleaved; ratio order alternates between repetitions
        for i, b in enumerate(benches):
            for r in (ratios if (rep + i) % 2 == 0 else ratios[::-1]):
                total, opt = b.time_steps(r, a.steps)
                times[i][r].append(total); opt_times[i].append(opt / a.steps)
    opt_s = [statistics.median(o) for o in opt_times]
    mem = [{r: None for r in ratios} for _ in benches]
    del benches                                          # memory is measured one model at a time, after the timings
    if not a.no_memory and device.type == 'cuda':
        for i, pr in enumerate(presets): mem[i] = cuda_peak_memory(pr, ratios, a, device)
    if not a.no_memory and device.type == 'cpu':
        for i, pr in enumerate(presets):
            for r in ratios: mem[i][r] = cpu_peak_memory(pr, r, a)
    load_after = os.getloadavg() if hasattr(os, 'getloadavg') else None

    results = []
    for info, t, o, ot, m in zip(infos, times, opt_s, opt_times, mem):
        base = t[0.0]
        for row in info['rows']:
            r = row['ratio']
            ms = [s / a.steps * 1e3 for s in t[r]]
            row.update(ms_per_step=min(ms), ms_per_step_median=statistics.median(ms), ms_per_step_all=ms,
                       speedup=statistics.median(b0 / br for b0, br in zip(base, t[r])),   # median of paired ratios
                       speedup_best_of=min(base) / min(t[r]), peak_mem_bytes=m[r])
            m0 = m[0.0]
            row['mem_ratio'] = m0 / m[r] if m0 and m[r] else None
            # if everything but the optimizer step shrank exactly as the FLOPs: the best speed-up left after that fixed cost
            t0 = statistics.median(base) / a.steps
            row['ideal_flops_with_opt_step'] = t0 / (o + max(t0 - o, 0) / row['ideal_flops_as_run'])
        info['opt_step_ms'] = o * 1e3
        info['opt_step_ms_all'] = [x * 1e3 for x in ot]
        results.append(info)

    target = None
    if device.type == 'cpu':
        hit = [row for info in results if info['model'] == TARGET['model'] for row in info['rows'] if row['ratio'] == TARGET['ratio']]
        if hit:
            target = dict(TARGET, measured=hit[0]['speedup'], met=hit[0]['speedup'] >= TARGET['speedup'],
                          config=dict(batch=a.batch, input_size=a.input_size, strategy=a.strategy, bf16=a.bf16))
    record = dict(benchmark='masked_train_step_vs_mask_ratio', env=machine(device), device=str(device), cpu=platform.processor() or platform.machine(),
                  threads=torch.get_num_threads(), torch=torch.__version__, loadavg_before=load_before, loadavg_after=load_after,
                  wall_s=time.perf_counter() - t_start,
                  config=dict(models=presets, batch=a.batch, input_size=a.input_size, channels=a.channels, num_classes=a.num_classes,
                              ratios=ratios, strategy=a.strategy, block_size=a.block_size, steps=a.steps, reps=a.reps,
                              warmup=a.warmup, bf16=a.bf16),
                  target=target, results=results)
    print(json.dumps(record))
    if a.json: Path(a.json).write_text(json.dumps(record, indent=1) + '\n')

    mb = lambda b: f'{b / 2**20:8.1f}' if b else '     n/a'
    la = lambda l: '/'.join(f'{x:.2f}' for x in l) if l else 'n/a'
    print(f"\ndevice {device}, {torch.get_num_threads()} threads, {'bf16' if a.bf16 else 'fp32'}, batch {a.batch}, "
          f"{a.channels}x{a.input_size}x{a.input_size}, '{a.strategy}' masks, {a.reps} reps x {a.steps} steps, "
          f"load average {la(load_before)} before, {la(load_after)} after")
    print(f"{'model':10} {'ratio':>5} {'N_vis':>5} {'ms/step':>8} {'median':>8} {'speed-up':>8} {'N/N_vis':>8} "
          f"{'FLOPs':>6} {'+opt':>6} {'peakMiB':>8} {'mem x':>6}")
    for info in results:
        for row in info['rows']:
            mr = row['mem_ratio']
            print(f"{info['model']:10} {row['ratio_actual']:5.2f} {row['n_visible']:5d} {row['ms_per_step']:8.1f} "
                  f"{row['ms_per_step_median']:8.1f} {row['speedup']:8.2f} {row['ideal_tokens']:8.2f} {row['ideal_flops']:6.2f} "
                  f"{row['ideal_flops_with_opt_step']:6.2f} {mb(row['peak_mem_bytes'])} {(f'{mr:6.2f}' if mr else '   n/a')}")
        t0 = info['rows'][0]['ms_per_step_median']
        print(f"{info['model']:10} AdamW step + zero_grad {info['opt_step_ms']:.1f} ms (median, timed inside every step) ({info['opt_step_ms'] / t0:.1%} of an unmasked step); "
              f"{info['params'] / 1e6:.1f}M params, {info['gmacs_per_forward']:.2f} GMACs/forward/image unmasked")
    print("speed-up: median over repetitions of the paired t(ratio 0)/t(ratio); N/N_vis: token-count ideal; FLOPs: "
          "flops_per_forward(N)/flops_per_forward(N_vis); +opt: the FLOPs ideal (patch embedding at N) once the measured AdamW step is kept fixed")
    if target:
        print(f"target: >= {TARGET['speedup']:.0f}x per step at {TARGET['ratio']:.0%} masking on {TARGET['model']} (CPU): "
              f"{'MET' if target['met'] else 'NOT MET'} ({target['measured']:.2f}x)")
    return record


if __name__ == '__main__':
    main()
