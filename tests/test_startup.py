"""Console scripts start fast: the light modules import no torch, and every script's `--help` answers without
importing torch, fastai, timm, lightgbm or cv2 (they load only once a job runs)."""
import configparser, subprocess, sys, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ('torch', 'torchvision', 'fastai', 'timm', 'lightgbm', 'faiss')

def _run(code):
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()

@pytest.mark.parametrize('mod', ['glr_nb.core', 'glr_nb.data', 'glr_nb.metrics'])
def test_light_modules_import_no_torch(mod):
    "Importing a light module leaves every heavy library out of `sys.modules`"
    out = _run(f"import sys, {mod}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert out == '[]', f"{mod} imports {out}"

def _scripts():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT/'settings.ini')
    lines = [l.strip() for l in cfg['DEFAULT']['console_scripts'].splitlines() if l.strip()]
    return [tuple(l.split('=', 1)) for l in lines]

@pytest.mark.parametrize('name,target', _scripts())
def test_help_imports_no_heavy_library(name, target):
    "`<script> --help` prints its usage and leaves the heavy libraries unloaded"
    mod, fn = target.split(':')
    code = (f"import sys, io, contextlib; sys.argv = [{name!r}, '--help']; from {mod} import {fn}\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            f"    try: {fn}()\n"
            "    except SystemExit: pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), 'usage' in buf.getvalue().lower())")
    t = time.perf_counter()
    out = _run(code)
    print(f"{name} --help: {time.perf_counter() - t:.2f}s")
    assert out == '[] True', f"{name} --help: heavy modules and usage shown = {out}"
