"""End-to-end notebook tests in a real JupyterLab driven by headless Chromium (Playwright), offline.

A `Lab` serves JupyterLab on 127.0.0.1 with a random token from a temporary root folder, with this interpreter as
the kernel; `open_notebook` opens one notebook in a fresh workspace and waits for its kernel; the other helpers run
cells, wait for outputs and drive widgets. Facts this relies on (see the project's ENVIRONMENT notes): Debian's
/usr/bin/chromium, Playwright's Python wheel (its driver, never `playwright install`), the kernel readiness read from
the session context rather than the toolbar, windowing and the news toast switched off.
"""
from __future__ import annotations
import json, os, secrets, shutil, signal, socket, subprocess, sys, time, urllib.error, urllib.parse, urllib.request, uuid
from pathlib import Path

CHROMIUM = os.environ.get('SADM_CHROMIUM', '/usr/bin/chromium')
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking',
                 '--disable-component-update', '--no-first-run', '--disable-sync', '--disable-quic']
ARTIFACTS = Path(os.environ.get('SADM_TEST_ARTIFACTS', Path(__file__).parent / 'artifacts'))
PANEL = '.jp-NotebookPanel:not(.lm-mod-hidden)'


def missing_pieces() -> list[str]:
    "What the browser tests need and this machine lacks (empty when they can run)."
    out = []
    for mod in ('playwright', 'jupyterlab', 'ipywidgets', 'plotly', 'anywidget', 'ipykernel'):
        try: __import__(mod)
        except ImportError: out.append(f"python package {mod}")
    if not Path(CHROMIUM).is_file(): out.append(f"{CHROMIUM} (Debian package chromium)")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def write_notebook(path: Path, cells: list[str]) -> Path:
    "A minimal nbformat-4 notebook of code cells."
    nb = {'cells': [{'cell_type': 'code', 'execution_count': None, 'id': f'c{i}', 'metadata': {}, 'outputs': [],
                     'source': src} for i, src in enumerate(cells)],
          'metadata': {'kernelspec': {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'},
                       'language_info': {'name': 'python'}},
          'nbformat': 4, 'nbformat_minor': 5}
    path.write_text(json.dumps(nb, indent=1))
    return path


class Lab:
    "A JupyterLab server on 127.0.0.1 (random port and token) over a temporary root folder; use as a context manager."
    def __init__(self, root: Path, *, env: dict | None = None, ready_timeout: float = 90):
        self.root = Path(root)
        self.port, self.token = _free_port(), secrets.token_hex(16)
        self.url = f'http://127.0.0.1:{self.port}'
        self.env, self.ready_timeout = env or {}, ready_timeout
        self.proc = None

    def _settings(self, base: Path):
        "User settings: no news toast, no windowing (every cell in the DOM), no autosave."
        s = base / 'settings'
        for plugin, value in {'@jupyterlab/apputils-extension/notification.jupyterlab-settings':
                                  {'fetchNews': 'false', 'checkForUpdates': False},
                              '@jupyterlab/notebook-extension/tracker.jupyterlab-settings':
                                  {'windowingMode': 'none'},
                              '@jupyterlab/docmanager-extension/plugin.jupyterlab-settings':
                                  {'autosave': False}}.items():
            p = s / plugin
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(value))
        return s

    def __enter__(self) -> 'Lab':
        base = self.root.parent / f'.lab-{self.port}'
        data = base / 'data'
        # this interpreter is the notebooks' kernel, whatever kernelspecs the machine has
        ks = data / 'kernels' / 'python3'
        ks.mkdir(parents=True, exist_ok=True)
        (ks / 'kernel.json').write_text(json.dumps({'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f',
                                                             '{connection_file}'],
                                                    'display_name': 'Python 3', 'language': 'python'}))
        env = {**os.environ, 'JUPYTER_DATA_DIR': str(data), 'JUPYTER_CONFIG_DIR': str(base / 'config'),
               'JUPYTER_RUNTIME_DIR': str(base / 'runtime'), 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1',
               'JUPYTER_PLATFORM_DIRS': '1', **self.env}
        cmd = [sys.executable, '-m', 'jupyterlab', '--no-browser', '--allow-root', '--ip=127.0.0.1', f'--port={self.port}',
               '--ServerApp.port_retries=0', f'--IdentityProvider.token={self.token}', f'--ServerApp.root_dir={self.root}',
               f'--LabApp.user_settings_dir={self._settings(base)}', f'--LabApp.workspaces_dir={base / "workspaces"}',
               '--expose-app-in-browser', '--LabApp.news_url=', '--ServerApp.open_browser=False']
        self.log = open(base / 'server.log', 'wb')
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.root)
        end = time.monotonic() + self.ready_timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None: break
            try:
                self.api('GET', '/api/status'); return self
            except (urllib.error.URLError, ConnectionError, OSError): time.sleep(0.3)
        self.__exit__(None, None, None)
        raise RuntimeError(f"JupyterLab did not start within {self.ready_timeout} s; server log:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try: return (self.root.parent / f'.lab-{self.port}' / 'server.log').read_bytes()[-n:].decode(errors='replace')
        except OSError: return ''

    def api(self, method: str, path: str):
        req = urllib.request.Request(self.url + path, method=method, headers={'Authorization': f'token {self.token}'})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self):
        "Delete every session and kernel (kernels outlive the page)."
        try:
            for s in self.api('GET', '/api/sessions') or []: self.api('DELETE', f"/api/sessions/{s['id']}")
            for k in self.api('GET', '/api/kernels') or []: self.api('DELETE', f"/api/kernels/{k['id']}")
        except (urllib.error.URLError, OSError): pass

    def __exit__(self, *exc):
        if self.proc is None: return
        if self.proc.poll() is None:
            self.shutdown_kernels()
            self.proc.send_signal(signal.SIGTERM)
            try: self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill(); self.proc.wait(10)
        self.log.close()

    def add_notebook(self, name: str, cells: list[str]) -> str:
        write_notebook(self.root / name, cells)
        return name

    def notebook_url(self, name: str) -> str:
        return (f"{self.url}/lab/workspaces/{uuid.uuid4().hex}/tree/{urllib.parse.quote(name)}"
                f"?reset&token={self.token}")


def launch_browser(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


class OffsiteRequests:
    "Records every request a page makes that does not stay on 127.0.0.1 / localhost (data: and blob: are local)."
    def __init__(self, page):
        self.hosts: list[str] = []
        page.on('request', self._on)

    def _on(self, req):
        u = urllib.parse.urlparse(req.url)
        if u.scheme in ('data', 'blob', 'about'): return
        if u.hostname not in ('127.0.0.1', 'localhost'): self.hosts.append(req.url)


def open_notebook(page, lab: Lab, name: str, *, timeout: float = 90):
    "Open `name` in a fresh workspace and wait until its kernel is started and idle."
    page.goto(lab.notebook_url(name))
    page.wait_for_selector(f'{PANEL} .jp-Notebook', timeout=timeout * 1000)
    page.wait_for_function("""() => {
        const app = window.jupyterapp; if (!app) return false;
        const w = app.shell.currentWidget; if (!w || !w.sessionContext) return false;
        const sc = w.sessionContext;
        return sc.isReady && sc.session && sc.session.kernel && sc.session.kernel.status === 'idle';
    }""", timeout=timeout * 1000)


def run_all(page):
    "Run every cell (not awaited: cells may run long; wait for their outputs instead)."
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")


def wait_for_text(page, text: str, *, timeout: float = 120):
    "Wait until an output area of the visible notebook contains `text`; fail with the visible errors if a cell raised."
    loc = page.locator(f'{PANEL} .jp-OutputArea-output').filter(has_text=text)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if loc.count(): return loc.first
        errs = page.locator(f'{PANEL} .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
        for i in range(errs.count()):
            t = errs.nth(i).inner_text()
            if 'Traceback' in t: raise AssertionError(f"a cell raised while waiting for {text!r}:\n{t[-3000:]}")
        page.wait_for_timeout(250)
    raise AssertionError(f"no output containing {text!r} after {timeout} s")


def count(page, css: str) -> int:
    return page.locator(f'{PANEL} {css}').count()


def wait_for_count(page, css: str, at_least: int, *, timeout: float = 60) -> int:
    "Wait until at least `at_least` elements match `css` in the visible notebook; return the count."
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        n = count(page, css)
        if n >= at_least: return n
        page.wait_for_timeout(200)
    raise AssertionError(f"{css}: {count(page, css)} elements after {timeout} s, expected >= {at_least}")


def wait_until(fn, *, timeout: float = 60, what: str = 'condition', page=None):
    "Poll `fn()` until truthy (letting the page run between polls); return its value."
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = fn()
        if v: return v
        if page is not None: page.wait_for_timeout(200)
        else: time.sleep(0.2)
    shot = screenshot(page, 'timeout-' + ''.join(c if c.isalnum() else '-' for c in what)[:60]) if page is not None else None
    raise AssertionError(f"timed out after {timeout} s waiting for {what}" + (f" (screenshot {shot})" if shot else ''))


def widget_text(page, cls: str) -> str:
    "Text of the (first) widget carrying the CSS class `cls` (set with `widget.add_class`)."
    return page.locator(f'{PANEL} .{cls}').first.inner_text()


def press_slider(page, cls: str, key: str = 'ArrowRight', times: int = 1):
    "Move the ipywidgets slider with CSS class `cls` by keyboard, as a user does."
    handle = page.locator(f'{PANEL} .{cls} .noUi-handle').first
    handle.focus()
    for _ in range(times): handle.press(key)


def screenshot(page, name: str, *, locator=None) -> Path:
    "Save a PNG screenshot (of the page or one element) into the artefacts folder."
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f'{name}.png'
    (locator or page).screenshot(path=str(path))
    return path


def copy_tree(src: Path, dst: Path):
    if dst.exists(): shutil.rmtree(dst)
    shutil.copytree(src, dst)
