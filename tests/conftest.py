"Shared test helpers."
import os, subprocess, sys
from pathlib import Path

import pytest


@pytest.fixture
def launch_two_processes():
    """Run `script out_dir` under `accelerate launch` with 2 CPU processes (gloo); return the files rank0.pt and
    rank1.pt it must write, after checking they exist (the launcher's output is shown if not). Ranks rarely abort in
    destroy_process_group after all work is done, so the results they wrote are what counts, not the exit status."""
    def run(script: Path, out: Path) -> list[Path]:
        env = {**os.environ, 'ACCELERATE_USE_CPU': '1', 'OMP_NUM_THREADS': '1'}
        cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
               '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', str(script), str(out)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        outs = [out / f'rank{r}.pt' for r in (0, 1)]
        assert all(o.is_file() for o in outs), p.stdout[-3000:] + p.stderr[-3000:]
        return outs
    return run
