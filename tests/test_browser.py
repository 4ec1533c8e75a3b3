"""The widgets in a real JupyterLab, in headless Chromium (Playwright): each renders and responds. Screenshots are
kept in tests/artifacts/ (or $SADM_TEST_ARTIFACTS). Without chromium/playwright these tests skip, unless
SADM_REQUIRE_BROWSER=1 (set by .ci/run), where they fail."""
import os

import pytest

from jupyter_harness import (Lab, OffsiteRequests, launch_browser, missing_pieces, open_notebook, press_slider, run_all,
                             screenshot, wait_for_count, wait_for_text, wait_until, widget_text, PANEL)

pytestmark = pytest.mark.browser

_missing = missing_pieces()
if _missing:
    if os.environ.get('SADM_REQUIRE_BROWSER') == '1':
        raise RuntimeError(f"SADM_REQUIRE_BROWSER=1 but the browser tests lack: {', '.join(_missing)}")
    pytest.skip(f"browser tests need: {', '.join(_missing)}", allow_module_level=True)

WIDGETS_NB = [
    "import torch\ntorch.set_num_threads(1)",
    "from sadm_lab.config import get_config\nfrom sadm_lab.train import build_data, build_network, build_diffusion\n"
    "from sadm_lab.widgets import ManifoldExplorer, MaskVisualiser, TrainingDashboard",
    "cfg = get_config('smoke')\ndata = build_data(cfg)\ntorch.manual_seed(0)\n"
    "net, diff = build_network(cfg, data).eval(), build_diffusion(cfg)\nprint('SETUP-DONE')",
    "mv = MaskVisualiser(data.images, model=net, diffusion=diff, labels=data.labels, ratio=0.5, n_images=16)\nmv",
    "ex = ManifoldExplorer(net, diff, data, batch_size=32, k=4, layout='umap')\nex",
    "dash = TrainingDashboard(refresh_s=0.3, title='smoke run')\n"
    "dash.train(get_config('smoke', ['train.steps=100000', 'train.log_every=5', 'train.sample_every=30', "
    "'train.ckpt_every=100000', 'eval.enabled=false', 'sample.steps=5']), 'runs/e2e-dash')\ndash",
    "print('ALL-CELLS-' + 'RAN')",
]


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp('lab') / 'root'
    root.mkdir()
    with Lab(root) as server:
        yield server


@pytest.fixture(scope='module')
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = launch_browser(p)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={'width': 1400, 'height': 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(60_000)
    yield pg
    ctx.close()


def _plotly_len(page, scope: str, trace: int) -> int:
    "Number of x values of one trace of the first plotly figure inside `scope` (plotly keeps `data` on its div)."
    return page.evaluate(f"""() => {{
        const gd = document.querySelector('{PANEL} {scope} .js-plotly-plot');
        return gd && gd.data && gd.data[{trace}] ? gd.data[{trace}].x.length : -1; }}""")


def test_widgets_render_and_respond_in_jupyterlab(lab, page):
    lab.add_notebook('widgets.ipynb', WIDGETS_NB)
    offsite = OffsiteRequests(page)
    open_notebook(page, lab, 'widgets.ipynb')
    run_all(page)
    wait_for_text(page, 'ALL-CELLS-RAN', timeout=180)

    # mask visualiser: 8 of 16 tokens visible at ratio 0.5; five slider steps (0.05 each) -> 0.75 -> 4 visible
    mv = page.locator(f'{PANEL} .sadm-mask-visualiser')
    wait_until(lambda: widget_text(page, 'sadm-visible-n') == '8', page=page, what='8 visible tokens')
    assert mv.locator('img').count() == 2                       # overlay and the model's prediction
    press_slider(page, 'sadm-mask-ratio', 'ArrowRight', 5)
    wait_until(lambda: widget_text(page, 'sadm-visible-n') == '4', page=page, what='4 visible tokens after the slider')
    assert '75% masked' in widget_text(page, 'sadm-visible-count')
    screenshot(page, 'mask_visualiser', locator=mv)

    # manifold explorer: 32 points in each panel, edges, heat-maps; PCA at once, then UMAP; the t slider redraws
    ex = page.locator(f'{PANEL} .sadm-manifold-explorer')
    wait_for_count(page, '.sadm-manifold-explorer .js-plotly-plot .scatterlayer .point', 64, timeout=60)
    assert _plotly_len(page, '.sadm-manifold-explorer', 1) == 32 and _plotly_len(page, '.sadm-manifold-explorer', 4) == 32
    assert _plotly_len(page, '.sadm-manifold-explorer', 0) > 0  # kNN edges drawn
    wait_until(lambda: 'UMAP layout' in widget_text(page, 'sadm-status'), timeout=120, page=page, what='the UMAP layout')
    d0 = widget_text(page, 'sadm-distance-value')
    press_slider(page, 'sadm-explorer-t', 'ArrowRight', 10)              # 10 steps of 10: t = 250 -> 350
    wait_until(lambda: 't = 350' in ex.text_content() and widget_text(page, 'sadm-distance-value') != d0,
               timeout=60, page=page, what='the explorer to redraw at t = 350')
    ex.locator('.js-plotly-plot').first.scroll_into_view_if_needed()
    box = ex.locator('.js-plotly-plot .scatterlayer .point').nth(3).bounding_box()   # plotly hovers by mouse position
    page.mouse.move(box['x'] + box['width'] / 2, box['y'] + box['height'] / 2)
    wait_until(lambda: '#' in widget_text(page, 'sadm-explorer-hover'), timeout=20, page=page, what='hover thumbnails')
    screenshot(page, 'manifold_explorer', locator=ex)

    # dashboard: the loss curve gains points while training runs; Stop ends it with a checkpoint
    dash = page.locator(f'{PANEL} .sadm-dashboard')
    n1 = wait_until(lambda: max(_plotly_len(page, '.sadm-dashboard', 0), 0) >= 5 and _plotly_len(page, '.sadm-dashboard', 0),
                    timeout=60, page=page, what='loss points')
    n2 = wait_until(lambda: (_plotly_len(page, '.sadm-dashboard', 0) > n1 + 5) and _plotly_len(page, '.sadm-dashboard', 0),
                    timeout=60, page=page, what='the curve to grow')
    assert n2 > n1
    wait_until(lambda: dash.locator('.sadm-dash-samples img, img.sadm-dash-samples').count() and
               dash.locator('img').first.get_attribute('src'), timeout=60, page=page, what='a sample grid')
    screenshot(page, 'training_dashboard', locator=dash)
    dash.locator('.sadm-dash-stop').click()
    wait_until(lambda: 'stopped at step' in widget_text(page, 'sadm-dash-status'), timeout=60, page=page,
               what='the stopped status')
    assert dash.locator('.sadm-dash-stop').is_disabled()
    assert list((lab.root / 'runs' / 'e2e-dash' / 'checkpoints').glob('*.pt')), 'Stop wrote no checkpoint'
    screenshot(page, 'notebook_full')
    assert not offsite.hosts, f"requests left 127.0.0.1: {offsite.hosts[:5]}"


@pytest.mark.slow
def test_workshop_notebook_runs_in_jupyterlab(lab, page):
    "`sadm-lab workshop` copies the tutorials; the widget tutorial then runs end to end in the browser."
    import subprocess, sys
    ws = lab.root / 'workshop'
    p = subprocess.run([sys.executable, '-m', 'sadm_lab.cli', 'workshop', str(ws)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and 'jupyter lab' in p.stdout, p.stdout + p.stderr
    nb = 'workshop/04_exploring_structure.ipynb'
    assert (lab.root / nb).is_file()
    open_notebook(page, lab, nb)
    run_all(page)
    wait_for_text(page, 'visible tokens:', timeout=420)         # the last cell's output
    assert 'finished at step 400' in widget_text(page, 'sadm-dash-status')
    assert _plotly_len(page, '.sadm-dashboard', 0) == 400         # every step's loss reached the browser
    assert _plotly_len(page, '.sadm-dashboard', 7) == 1           # the final FID point (trace 7) ...
    assert _plotly_len(page, '.sadm-dashboard', 2) > 0            # ... and SADM's generator term (trace 2)
    assert _plotly_len(page, '.sadm-manifold-explorer', 1) == 48 and _plotly_len(page, '.sadm-manifold-explorer', 4) == 48
    wait_until(lambda: widget_text(page, 'sadm-visible-n') == '4', page=page, what="the run's 75% patch mask")
    screenshot(page, 'workshop_04_dashboard', locator=page.locator(f'{PANEL} .sadm-dashboard'))
    screenshot(page, 'workshop_04_explorer', locator=page.locator(f'{PANEL} .sadm-manifold-explorer'))
