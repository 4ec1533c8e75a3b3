"""What the benchmark scripts share, so that each measurement is written once:

- `time_steps` / `interleaved_times`: wall-clock of a step function, synchronised with the device (CUDA, MPS) before and
  after, and the same for several arms in interleaved, rotating repetitions so that drifts in machine load hit every
  arm alike (`paired_ratio` then compares two arms repetition by repetition);
- `rss_bytes`, `peak_rss_bytes` (the library's `sadm_lab.core.memory_now` / `peak_memory_mb`) and `run_memory_probe`,
  which reads a peak-memory figure from a fresh subprocess;
- `fit_run`: train one run of a comparison, finish an interrupted one or reuse a finished one, and read its training
  time back from the run folder with `sadm_lab.train.training_clock` (evaluations and a resume's pause left out);
- `machine`: the `sadm-lab env` block (versions, CPU kind, dispatch, threads, GPU, measured matmul rates) that every
  benchmark's JSON records, so that numbers from two machines are compared knowing what each ran on.

Importing this module also puts the checkout on `sys.path`, so the scripts run from a checkout without installing.
"""
from __future__ import annotations
import json, statistics, subprocess, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from sadm_lab.core import memory_now, peak_memory_mb, sync  # noqa: E402

__all__ = ['sync', 'time_steps', 'interleaved_times', 'paired_ratio', 'rss_bytes', 'peak_rss_bytes', 'run_memory_probe',
           'fit_run', 'machine']


def machine(device='cpu') -> dict:
    "The machine a benchmark ran on (`sadm_lab.hardware.env_report`): recorded in every benchmark's JSON."
    from sadm_lab.hardware import env_report
    return env_report(device)


def time_steps(step, n: int, device) -> float:
    "Seconds for `n` calls of `step()`, the device's queued work included."
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n): step()
    sync(device)
    return time.perf_counter() - t0


def interleaved_times(arms: dict, *, reps: int, steps: int, warmup: int, device) -> dict[str, list[float]]:
    """name -> seconds per step in each repetition, for arms given as name -> zero-argument step function: `warmup`
    untimed steps per arm, then `reps` repetitions of `steps` steps of every arm, the order rotating each repetition."""
    for step in arms.values():
        for _ in range(warmup): step()
    names = list(arms)
    out = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            out[n].append(time_steps(arms[n], steps, device) / steps)
    return out


def paired_ratio(a: list[float], b: list[float]) -> float:
    "Median over repetitions of a[i] / b[i]: two arms compared where they ran back to back."
    return statistics.median(x / y for x, y in zip(a, b))


def rss_bytes() -> int:
    "This process's resident set size now (Linux /proc; elsewhere the peak)."
    return int(memory_now()['rss_mb'] * 2**20)


def peak_rss_bytes() -> int:
    "This process's peak resident set size (VmHWM, reset by exec, unlike ru_maxrss)."
    return int(peak_memory_mb('cpu') * 2**20)


def run_memory_probe(cmd: list, what: str) -> int | None:
    "Run a probe subprocess that prints {'peak_bytes': ...} as its last line; None (with a note) if it fails."
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
        return json.loads(out.strip().splitlines()[-1])['peak_bytes']
    except Exception as e:
        print(f'memory probe failed for {what}: {e}', file=sys.stderr)
        return None


def fit_run(cfg, run_dir: Path, *, progress: bool = False, evaluate: bool = True) -> dict:
    """Train one run, or finish an interrupted one, or reuse a finished one (a re-run of a comparison picks up where it
    stopped; a changed config is refused by the trainer). Building the FID evaluator is kept out of the times.
    Returns the run folder, its eval records each with `train_s` (training seconds up to it), the total training
    seconds and whether it was resumed."""
    from sadm_lab.train import Trainer, training_clock
    run_dir = Path(run_dir)
    tr = Trainer(cfg, run_dir, resume=None, progress=progress)      # resume if it can, start if it has no checkpoint
    if not any(r.get('event') == 'end' for r in tr.run.read_metrics()):
        if evaluate: tr.evaluator()
        tr.fit()
    recs = tr.run.read_metrics()
    clock = training_clock(recs)
    return {'run': str(tr.run.path), 'evals': [dict(r, train_s=s) for r, s in clock if r.get('kind') == 'eval'],
            'train_s': clock[-1][1] if clock else 0.0, 'resumed': any(r.get('event') == 'resume' for r in recs)}
