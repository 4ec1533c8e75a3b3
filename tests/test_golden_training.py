"""Training numerics are pinned: each objective combination of `golden_training.RUNS` trained for 10 steps gives the
recorded weights (per-tensor sums), EMA, structure encoder and logged values (see `golden_training.py`)."""
import json, math

import pytest

from golden_training import FIXTURE, RUNS, train

GOLDEN = json.loads(FIXTURE.read_text())


def _close(a: float, b: float, rel: float = 2e-5, abs_: float = 2e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


@pytest.mark.parametrize('name', list(RUNS))
def test_training_matches_the_golden_run(name, tmp_path):
    got, want = train(name, tmp_path), GOLDEN[name]
    assert sorted(got) == sorted(want)
    for part in ('model', 'ema', 'encoder'):
        if part not in want: continue
        assert sorted(got[part]) == sorted(want[part]), part
        bad = [k for k in want[part] if not _close(got[part][k], want[part][k])]
        assert not bad, f"{part}: {[(k, got[part][k], want[part][k]) for k in bad[:4]]}"
    assert [r['step'] for r in got['logs']] == [r['step'] for r in want['logs']]
    for g, w in zip(got['logs'], want['logs']):
        for k, v in w.items():
            assert k in g and _close(g[k], v, rel=1e-4, abs_=1e-6), (g['step'], k, g.get(k), v)
