"""`make docs` without quarto (tools/docs.py): pages that read as an nbdev site, offline.

Two builds per run, to keep `make test` short: every page with `--no-exec` (structure: front matter, show_doc,
sidebar, formulas, no CDN), and 06_postprocess executed (formulas, a plot and DataFrames: the outputs check).
A third, tiny build checks that a failing cell stops the build with one line and that flagged cells do not run."""
import html, re, subprocess, sys
from pathlib import Path
import nbformat, pytest

ROOT = Path(__file__).resolve().parents[1]
EXEC_NB = '06_postprocess'   # formulas, a plot and tables, executed in about 20 s
PROMPT = re.compile(r'\b(In|Out)\s*\[\s*\d*\s*\]:')   # Jupyter's `In [ ]:` / `Out[3]:`

def _build(out, proc, *args):
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'docs.py'), str(out), '--proc', str(proc), *args],
                       cwd=ROOT, capture_output=True, text=True)
    return r

def _book():
    nbs = [p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith('_')]
    return sorted(nbs, key=lambda p: (p.stem != 'index', p.name))

@pytest.fixture(scope='module')
def site(tmp_path_factory):
    "Every page, not executed"
    d = tmp_path_factory.mktemp('docs')
    r = _build(d/'out', d/'proc', '--no-exec')
    assert r.returncode == 0, r.stderr[-3000:]
    return d/'out'

@pytest.fixture(scope='module')
def executed(tmp_path_factory):
    "One page, executed: (page html, processed notebook)"
    d = tmp_path_factory.mktemp('docs_exec')
    r = _build(d/'out', d/'proc', '--only', EXEC_NB)
    assert r.returncode == 0, r.stderr[-3000:]
    return (d/'out'/f'{EXEC_NB}.html').read_text(), nbformat.read(d/'proc'/f'{EXEC_NB}.ipynb', as_version=4)

def _md(nb):
    "The markdown prose of a notebook without code blocks and code spans (where `$` is not math)"
    src = '\n\n'.join(c.source for c in nb.cells if c.cell_type == 'markdown')
    return re.sub(r'`[^`]*`', '', re.sub(r'```.*?```', '', src, flags=re.S))

def _formulas(nb): return re.findall(r'\$\$.+?\$\$|\$[^$\n]+\$', _md(nb), flags=re.S)

def _text(page):
    "What a reader sees: the page without tags (and without the MathML, whose markup is not prose)"
    return html.unescape(re.sub(r'<[^>]+>', ' ', re.sub(r'<math.*?</math>|<style.*?</style>', ' ', page, flags=re.S)))

def test_docs_page_per_notebook_and_every_symbol_documented(site):
    for nb in _book():
        page = site/(nb.stem + '.html')
        assert page.is_file() and page.stat().st_size > 1000, f"no page for {nb.name}"
    from glr_nb._modidx import d
    missing = []
    for mod, syms in d['syms'].items():
        src = (ROOT/syms[next(iter(syms))][1]).read_text() if syms else ''
        m = re.search(r'File to edit: \.\./nbs/(.+?)\.ipynb', src)
        assert m, f"{mod} has no notebook header"
        page = (site/(m.group(1) + '.html')).read_text()
        for full in syms:
            name = full[len(mod)+1:]
            if '.' in name or name.startswith('_'): continue   # methods live on their class's page; private: not API
            if not re.search(rf'<h[1-4][^>]*\bid="{re.escape(name.lower())}"', page, flags=re.I):
                missing.append(f"{mod}.{name} ({m.group(1)})")
    assert not missing, f"exported but undocumented: {missing}"

def test_pages_read_as_an_nbdev_site(site):
    "Title and description from the front matter, no raw quarto markup, no prompts, formulas as MathML"
    for p in _book():
        nb = nbformat.read(p, as_version=4)
        page = (site/(p.stem + '.html')).read_text()
        text = _text(page)
        title = re.search(r'^#\s+(\S.*?)\s*$', nb.cells[0].source, flags=re.M).group(1)
        assert f'<h1 class="title" id="title">{html.escape(title)}</h1>' in page, f"{p.name}: no title {title!r}"
        assert re.search(r'<div class="description"><p>\S', page), f"{p.name}: no description"
        raw_fm = re.search(r'^\s*---\s*$\s*^\s*(description|title):', text, flags=re.M)
        assert 'output-file:' not in text and not raw_fm, f"{p.name}: raw front matter"
        assert '{target=' not in page and 'style="float:right' not in page, f"{p.name}: raw quarto attributes"
        assert not PROMPT.search(text) and 'jp-InputPrompt' not in page, f"{p.name}: prompts"
        n = len(_formulas(nb))
        assert page.count('<math') >= n, f"{p.name}: {n} formulas in the notebook, {page.count('<math')} rendered"
        assert not re.search(r'\$[^$\n]*\\(frac|sum|mathrm|bar|cdot)', text), f"{p.name}: a formula left as raw LaTeX"

def test_showdoc_blocks_link_their_source_line(site):
    "Each show_doc block: heading, signature box, and a source link to settings.ini git_url at the symbol's line"
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(ROOT/'settings.ini')
    git_url, branch = cfg['DEFAULT']['git_url'], cfg['DEFAULT']['branch']
    checked = 0
    for p in _book():
        page = (site/(p.stem + '.html')).read_text()
        blocks = r'class="sd-source" href="([^"]+)".*?<h[1-4][^>]*class="sd-name"[^>]*>([^<]+)</h'
        for m in re.finditer(blocks, page, flags=re.S):
            url, name = html.unescape(m.group(1)), html.unescape(m.group(2))
            prefix = f"{git_url}/blob/{branch}/"
            assert url.startswith(prefix), f"{p.name}: {name} links to {url}, not {prefix}"
            path, line = re.fullmatch(r'(.+)#L(\d+)', url[len(prefix):]).groups()
            src = (ROOT/path).read_text().splitlines()
            near = '\n'.join(src[int(line)-1:int(line)+2])
            assert re.search(rf'\b{re.escape(name.split(".")[-1])}\b', near), f"{p.name}: {url} does not show {name}"
            checked += 1
        for b in re.findall(r'celltag_showdoc.*?(?=<div [^>]*class="jp-Cell |</main>)', page, flags=re.S):
            assert 'class="sd-name"' in b and 'class="highlight' in b, f"{p.name}: show_doc lacks heading or signature"
    assert checked > 50, f"only {checked} source links found"

def test_sidebar_lists_the_book_and_nothing_comes_from_a_network(site):
    order = [p.stem + '.html' for p in _book()]
    for p in _book():
        page = (site/(p.stem + '.html')).read_text()
        nav = re.search(r'<ol class="pages">(.*?)</ol>', page, flags=re.S).group(1)
        assert re.findall(r'href="([^"]+)"', nav) == order, f"{p.name}: sidebar not in book order"
        assert re.search(rf'<a href="{p.stem}.html" class=current>', nav), f"{p.name}: current page not marked"
        assert '<script' not in page, f"{p.name}: scripts (a CDN?)"
        assert not re.search(r'<(link|img|iframe)[^>]+(href|src)="(https?:)?//', page), f"{p.name}: a remote asset"
    for css in ('docs.css', 'pygments.css'):
        remote = re.search(r'@import|url\(\s*["\']?(https?:)?//', (site/css).read_text())
        assert not remote, f"{css} loads a remote asset"

def test_executed_page_shows_outputs(executed):
    page, nb = executed
    outs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
    plots = sum('image/png' in o.get('data', {}) for o in outs)
    assert plots >= 1, f"{EXEC_NB} executed but produced no plot"
    imgs = len(re.findall(r'<img\b[^>]*\bsrc="data:image/png;base64,', page))
    assert imgs >= plots, f"{EXEC_NB}: {plots} plots, {imgs} images on the page"
    frames = sum('dataframe' in str(o.get('data', {}).get('text/html', '')) for o in outs)
    assert page.count('class="dataframe"') >= frames, f"{EXEC_NB}: {frames} DataFrame outputs, fewer tables on the page"
    src = nbformat.read(ROOT/'nbs'/f'{EXEC_NB}.ipynb', as_version=4)
    assert page.count('<math') >= len(_formulas(src)), f"{EXEC_NB}: formulas not rendered"
    assert not PROMPT.search(_text(page)), "prompts on the executed page"

def test_flagged_cells_skipped_and_a_failing_cell_named(tmp_path):
    "Cells flagged with settings.ini tst_flags do not run; a cell that raises fails the build with one line naming it"
    def nb(path, *cells):
        cs = [nbformat.v4.new_markdown_cell('# Probe\n\n> A notebook for the docs test.')]
        cs += [nbformat.v4.new_code_cell(c) for c in cells]
        nbformat.write(nbformat.v4.new_notebook(cells=cs), path)
        return path
    ok = nb(tmp_path/'probe_ok.ipynb', "#| slow\nraise SystemExit('slow cell ran')",
            "#| cuda\nraise SystemExit('cuda cell ran')", "print(6 * 7)")
    r = _build(tmp_path/'out', tmp_path/'proc', '--only', str(ok))
    assert r.returncode == 0, r.stderr[-2000:]
    page = (tmp_path/'out'/'probe_ok.html').read_text()
    assert '42' in _text(page) and 'celltag_docs-not-run' in page
    bad = nb(tmp_path/'probe_bad.ipynb', "x = 1", "x / 0", "print('never')")
    r = _build(tmp_path/'out', tmp_path/'proc', '--only', str(bad))
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith('docs:')]
    want = "docs: probe_bad.ipynb: cell 3 of 4 (`x / 0`) raised ZeroDivisionError: division by zero"
    assert lines == [want], r.stderr[-2000:]
