"""The release path: build the sdist and the wheel as a release would, check what they hold, then install the wheel
into a fresh virtual environment outside the checkout and run the `sadm-lab` command from there.

Conventions (README, "Releasing"):
- the version lives in settings.ini (`version = X.Y.Z`); `nbdev_export` copies it into `sadm_lab/__init__.py`;
- CHANGELOG.md has `## Unreleased` first (changes not yet released), then one `## X.Y.Z` section per release,
  newest first. settings.ini's version must have its own section, or (a version bumped ahead of its release) the
  changelog must start with `## Unreleased`.
- the built `sadm_lab-X.Y.Z-py3-none-any.whl` and `sadm_lab-X.Y.Z.tar.gz` are left in `dist/` (git-ignored), so
  `bash dev.sh test` (and CI) builds the release artifacts.

The fresh-environment test (`-m release`) installs torch and the wheel's dependencies with pip (PyPI or pip's
cache) and runs `sadm-lab demo --fast`: ~2-4 minutes on 2 cores. It runs in CI; `SADM_SKIP_RELEASE_TEST=1` (or
`-m 'not release'`) skips it in local quick loops.
"""
import configparser, email.parser, importlib.metadata, importlib.util, json, os, re, shlex, shutil, subprocess, sys, tarfile, time
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from sadm_lab.metrics import SHIPPED_FEATURE_NETS

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted(p.name for p in (ROOT / 'nbs' / 'tutorials').glob('*.ipynb'))


def settings() -> configparser.SectionProxy:
    cfg = configparser.ConfigParser(delimiters=['='])
    cfg.read(ROOT / 'settings.ini', encoding='utf-8')
    return cfg['DEFAULT']


VERSION = settings()['version']


@pytest.fixture(scope='module')
def dist(tmp_path_factory):
    """Build the sdist, then the wheel from it (`python -m build`, as a release does), into a temp folder; copy
    both into `dist/` at the repository root (replacing older sadm_lab artifacts) and return (wheel, sdist)."""
    if importlib.util.find_spec('build') is None:      # the `build` package is in the dev extra
        pytest.fail("the `build` package is missing: pip install -e '.[dev]' (or bash dev.sh test)")
    out = tmp_path_factory.mktemp('dist')
    # --no-isolation: the dev environment's setuptools/packaging (nbdev and torch require setuptools), no download
    r = subprocess.run([sys.executable, '-m', 'build', '--no-isolation', '--outdir', str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, f"python -m build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    wheel, sdist = out / f'sadm_lab-{VERSION}-py3-none-any.whl', out / f'sadm_lab-{VERSION}.tar.gz'
    assert sorted(p.name for p in out.iterdir()) == sorted([wheel.name, sdist.name]), list(out.iterdir())
    keep = ROOT / 'dist'
    keep.mkdir(exist_ok=True)
    for old in [*keep.glob('sadm_lab-*.whl'), *keep.glob('sadm_lab-*.tar.gz')]: old.unlink()
    for f in (wheel, sdist):
        shutil.copyfile(f, keep / (f.name + '.part')); os.replace(keep / (f.name + '.part'), keep / f.name)
    return wheel, sdist


def _library_files() -> set:
    "The library's modules in the checkout, as paths inside the package."
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / 'sadm_lab').rglob('*.py') if '__pycache__' not in p.parts}


def _reqs(line: str) -> set:
    return {str(Requirement(r)) for r in shlex.split(line)}


def test_version_is_one_pep440_version_everywhere():
    assert str(Version(VERSION)) == VERSION, f"settings.ini version {VERSION!r} is not a normalised PEP 440 version"
    init = (ROOT / 'sadm_lab' / '__init__.py').read_text(encoding='utf-8')
    m = re.search(r'^__version__ = "([^"]+)"', init, re.M)
    assert m and m.group(1) == VERSION, "sadm_lab/__init__.py's __version__ differs from settings.ini: run nbdev_export"


def test_changelog_has_a_section_for_the_version():
    heads = re.findall(r'^## +(.+?)\s*$', (ROOT / 'CHANGELOG.md').read_text(encoding='utf-8'), re.M)
    assert heads, "CHANGELOG.md has no `## ` sections"
    unreleased = [i for i, h in enumerate(heads) if h.lower() == 'unreleased']
    assert unreleased in ([], [0]), f"`## Unreleased` must be the first section, and only one: {heads}"
    # released sections: `## X.Y.Z`, optionally followed by a date or note (`## 0.2.0 - 2026-05-01`)
    released = [Version(re.match(r'\[?v?([0-9][^\s\]]*)', h).group(1)) for h in heads[len(unreleased):]]
    assert released == sorted(released, reverse=True) and len(set(released)) == len(released), \
        f"released sections must be unique and newest first: {heads}"
    v = Version(VERSION)
    assert v in released or unreleased, \
        f"CHANGELOG.md has no `## {VERSION}` section (nor `## Unreleased` for a version not yet released)"
    assert not released or v >= released[0], f"settings.ini version {VERSION} is older than the changelog's {released[0]}"


def test_wheel_contents_and_metadata(dist):
    wheel, _ = dist
    cfg = settings()
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = f'sadm_lab-{VERSION}.dist-info'
        meta = email.parser.Parser().parsestr(z.read(f'{info}/METADATA').decode())
        eps = configparser.ConfigParser(delimiters=['='])
        eps.read_string(z.read(f'{info}/entry_points.txt').decode())
    # the library, every module of it, and nothing from the checkout around it
    lib = {n for n in names if n.endswith('.py')}
    assert lib == _library_files(), f"modules differ: wheel-only {lib - _library_files()}, " \
                                    f"checkout-only {_library_files() - lib}"
    assert {n.split('/')[0] for n in names} == {'sadm_lab', info}, sorted(names)
    # the workshop notebooks as package data, exactly the tutorials (no run folders from running them)
    assert {n for n in names if n.startswith('sadm_lab/tutorials/')} == {f'sadm_lab/tutorials/{t}' for t in TUTORIALS}
    assert len(TUTORIALS) >= 4, TUTORIALS
    # the shipped FID feature networks, byte for byte
    nets = {n for n in names if n.startswith('sadm_lab/feature_nets/')}
    assert nets == {f'sadm_lab/feature_nets/{f}' for f in SHIPPED_FEATURE_NETS}, nets
    with zipfile.ZipFile(wheel) as z:
        for n in nets: assert z.read(n) == (ROOT / n).read_bytes(), n
    assert f'{info}/licenses/LICENSE' in names
    # metadata as settings.ini declares it
    assert (meta['Name'], meta['Version']) == ('sadm-lab', VERSION)
    assert meta['Requires-Python'] == '>=' + cfg['min_python']
    by_extra = {}
    for line in meta.get_all('Requires-Dist'):
        r = Requirement(line)
        extra = re.fullmatch(r'extra == "([\w-]+)"', str(r.marker)).group(1) if r.marker else ''
        r.marker = None
        by_extra.setdefault(extra, set()).add(str(r))
    assert by_extra == {'': _reqs(cfg['requirements']), 'lab': _reqs(cfg['lab_requirements']),
                        'emoji': _reqs(cfg['emoji_requirements']), 'track': _reqs(cfg['track_requirements']),
                        'dev': _reqs(cfg['dev_requirements'])}, by_extra
    assert sorted(meta.get_all('Provides-Extra')) == ['dev', 'emoji', 'lab', 'track']
    # the console script
    name, target = cfg['console_scripts'].split('=')
    assert dict(eps['console_scripts']) == {name.strip(): target.strip()} == {'sadm-lab': 'sadm_lab.cli:main'}


def test_sdist_contents(dist):
    _, sdist = dist
    top = f'sadm_lab-{VERSION}'
    with tarfile.open(sdist) as t:
        names = {m.name for m in t.getmembers() if m.isfile()}
    for f in ['settings.ini', 'setup.py', 'pyproject.toml', 'MANIFEST.in', 'README.md', 'CHANGELOG.md', 'LICENSE',
              'PKG-INFO', *(f'nbs/tutorials/{t}' for t in TUTORIALS),
              *(f'sadm_lab/feature_nets/{f}' for f in SHIPPED_FEATURE_NETS)]:
        assert f'{top}/{f}' in names, f"{f} is missing from the sdist"
    assert {n[len(top) + 1:] for n in names if n.endswith('.py') and n.startswith(f'{top}/sadm_lab/')} \
        == _library_files()
    # nothing a checkout accumulates (tutorial run folders, test artifacts, partial test suites)
    stray = {n for n in names if n.startswith((f'{top}/nbs/', f'{top}/tests/', f'{top}/runs/'))
             and not any(n == f'{top}/nbs/tutorials/{t}' for t in TUTORIALS)}
    assert not stray, sorted(stray)


def _run(cmd, *, env, cwd, timeout, what):
    t0 = time.time()
    r = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{what} failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    print(f"{what}: {time.time() - t0:.0f} s")
    return r


@pytest.mark.release
@pytest.mark.skipif(os.environ.get('SADM_SKIP_RELEASE_TEST') == '1', reason='SADM_SKIP_RELEASE_TEST=1')
def test_wheel_runs_from_a_fresh_venv_outside_the_checkout(dist, tmp_path_factory):
    wheel, _ = dist
    base = tmp_path_factory.mktemp('release').resolve()
    assert not base.is_relative_to(ROOT), base
    venv, work = base / 'venv', base / 'work'
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ('PYTHONPATH', 'PYTHONHOME', 'PYTHONSTARTUP', 'VIRTUAL_ENV', 'PYTHONSAFEPATH')}
    bin_ = venv / 'bin'
    env.update(PATH=f"{bin_}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv), PYTHONNOUSERSITE='1',
               SADM_LAB_CACHE=str(base / 'cache'),     # a first run: no feature network cached yet
               # pytest waits idle meanwhile: the demo may use the cores dev.sh's OMP_NUM_THREADS=1 leaves free
               OMP_NUM_THREADS=str(max(1, min(4, os.cpu_count() or 1))))
    py = bin_ / 'python'
    _run([sys.executable, '-m', 'venv', venv], env=env, cwd=work, timeout=300, what='python -m venv')
    # torch first, pinned to the build this environment uses (dev.sh installed it: pip's cache has it), so that no
    # requirement of the wheel can pull another torch (a bare `pip install torch` is a multi-GB CUDA build)
    torch_pin = f"torch=={Version(importlib.metadata.version('torch')).public}"
    (base / 'constraints.txt').write_text(torch_pin + '\n')
    pip = [py, '-m', 'pip', 'install', '-q', '--disable-pip-version-check']
    hint = "; needs PyPI or pip's cache (CI has PyPI)"
    _run([*pip, torch_pin], env=env, cwd=work, timeout=900, what=f'pip install {torch_pin}{hint}')
    # the wheel with the dependencies it declares: this is what tests its metadata
    _run([*pip, '-c', base / 'constraints.txt', wheel], env=env, cwd=work, timeout=900,
         what=f'pip install {wheel.name}{hint}')
    _run([py, '-m', 'pip', 'check'], env=env, cwd=work, timeout=120, what='pip check')

    r = _run([py, '-c', 'import json, sadm_lab, importlib.metadata as m, sadm_lab.cli as c; print(json.dumps('
              '[sadm_lab.__file__, sadm_lab.__version__, m.version("sadm-lab"), str(c.tutorials_dir())]))'],
             env=env, cwd=work, timeout=300, what='import sadm_lab')
    file, version, dist_version, tutorials = json.loads(r.stdout.strip().splitlines()[-1])
    for p in (file, tutorials):
        assert Path(p).resolve().is_relative_to(venv) and not Path(p).resolve().is_relative_to(ROOT), p
    assert version == dist_version == VERSION

    cli = bin_ / 'sadm-lab'
    assert cli.is_file(), "the wheel installed no `sadm-lab` console script"
    _run([cli, 'demo', '--fast', '--run-dir', work / 'demo', '--no-progress'], env=env, cwd=work, timeout=1800,
         what='sadm-lab demo --fast')
    demo = work / 'demo'
    report = (demo / 'report.md').read_text(encoding='utf-8')
    assert report.startswith('# sadm_lab demo') and 'FID' in report, report[:500]
    for f in ['loss.png', 'fid.png', 'config.json', 'schedule.json', 'metrics.jsonl', 'checkpoints/latest.json']:
        assert (demo / f).is_file() and (demo / f).stat().st_size > 0, f"the demo did not write {f}"
    assert list((demo / 'samples').glob('*.png')), "the demo wrote no sample grids"
    assert list((base / 'cache' / 'feature_nets').iterdir()), "the FID feature network was not cached in SADM_LAB_CACHE"

    _run([cli, 'workshop', work / 'ws'], env=env, cwd=work, timeout=300, what='sadm-lab workshop')
    assert sorted(p.name for p in (work / 'ws').iterdir()) == TUTORIALS
    for t in TUTORIALS:
        assert (work / 'ws' / t).read_bytes() == (ROOT / 'nbs' / 'tutorials' / t).read_bytes(), t
    assert not list(work.glob('runs')), "the commands wrote into the working directory's runs/"
