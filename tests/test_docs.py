"`make docs` without quarto: one HTML page per notebook, and every exported symbol documented on its page."
import re, subprocess, sys, importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def test_docs_page_per_notebook_and_every_symbol_documented():
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'docs.py'), '_docs'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    nbs = sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith('_'))
    for nb in nbs:
        page = ROOT/'_docs'/(nb.stem + '.html')
        assert page.is_file() and page.stat().st_size > 1000, f"no page for {nb.name}"
    from glr_nb._modidx import d
    missing = []
    for mod, syms in d['syms'].items():
        src = (ROOT/syms[next(iter(syms))][1]).read_text() if syms else ''
        m = re.search(r'File to edit: \.\./nbs/(.+?)\.ipynb', src)
        assert m, f"{mod} has no notebook header"
        html = (ROOT/'_docs'/(m.group(1) + '.html')).read_text()
        for full in syms:
            name = full[len(mod)+1:]
            if '.' in name or name.startswith('_'): continue   # methods live on their class's page; private helpers are not API
            if not re.search(rf'<h[1-4] id="{re.escape(name.lower())}"', html, flags=re.I):
                missing.append(f"{mod}.{name} ({m.group(1)})")
    assert not missing, f"exported but undocumented: {missing}"
