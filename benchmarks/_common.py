"Helpers shared by the benchmark scripts: device sync and process memory readings."
from __future__ import annotations
import resource, sys

import torch


def sync(device):
    "Wait for queued work on `device` so wall-clock timings are honest."
    if device.type == 'cuda': torch.cuda.synchronize(device)
    elif device.type == 'mps': torch.mps.synchronize()


def _proc_status_kb(field: str) -> int | None:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'): return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    "Current resident set size (Linux /proc; elsewhere the peak, which is all `resource` offers)."
    kb = _proc_status_kb('VmRSS')
    return kb * 1024 if kb is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    "Peak resident set size of this process image. VmHWM is reset by exec; ru_maxrss is not (it keeps the parent's)."
    kb = _proc_status_kb('VmHWM')
    if kb is not None: return kb * 1024
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == 'darwin' else r * 1024


def run_memory_probe(cmd: list, what: str) -> int | None:
    "Run a probe subprocess that prints {'peak_bytes': ...} as its last line; None (with a note) if it fails."
    import json, subprocess
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
        return json.loads(out.strip().splitlines()[-1])['peak_bytes']
    except Exception as e:
        print(f'memory probe failed for {what}: {e}', file=sys.stderr)
        return None
