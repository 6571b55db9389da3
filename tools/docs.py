#!/usr/bin/env python
"""Build the docs offline, without quarto (with quarto installed, `make docs` runs `nbdev_docs` instead).

    python tools/docs.py [OUT] [--no-exec] [--only NB ...] [--workers N]    # OUT defaults to _docs
    python tools/docs.py --readme                                            # README.md from nbs/index.ipynb

1. Each notebook of the book is executed at its defaults, the way `nbdev_test` runs it (same working folder, cells
   flagged with settings.ini `tst_flags` skipped), in parallel, into `_proc/_offline/` (never into `nbs/`); a cell
   that raises stops the build with one line naming the notebook and the cell. `--no-exec` skips this step (pages
   without outputs, for a fast structure check).
2. nbdev's own processors (`FilterDefaults`: front matter, a `show_doc` for every exported symbol, hidden and
   exported cells removed, doc links) run on the executed copy, with `show_doc` rendered as plain HTML + markdown
   (a source link to settings.ini `git_url`, the signature in a code box, the docstring, a docments table)
   instead of quarto's `{target=...}` attribute syntax.
3. nbconvert renders the cells (no prompts, no CDN: formulas become MathML with latex2mathml, which browsers draw
   natively) and each page gets the site's shell: title and description from the front matter, a sidebar with
   every page in book order, an on-page table of contents, and local CSS (`tools/docs_assets/`).
"""
import argparse, html, json, os, re, shutil, signal, subprocess, sys, threading, time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent

def book(nbs_path):
    "The notebooks of the book in reading order: index first, then by file name (files starting with `_` are not pages)"
    nbs = [p for p in Path(nbs_path).glob('*.ipynb') if not p.name.startswith(('_', '.'))]
    return sorted(nbs, key=lambda p: (p.stem != 'index', p.name))

_re_h1 = re.compile(r'^#\s+(\S.*?)\s*$', flags=re.MULTILINE)

def split_title_cell(nb):
    "Leave only the lines nbdev reads as front matter (`# Title`, `> description`, `- key: value`) in the title cell"
    # nbdev's FrontmatterProc drops the whole title cell, so prose after the description would vanish from the page.
    from execnb.nbio import mk_cell
    for i, c in enumerate(nb.cells):
        if c.cell_type == 'raw': return
        if c.cell_type != 'markdown' or not _re_h1.search(c.source): continue
        lines, head, desc = c.source.splitlines(), [], False
        for j, ln in enumerate(lines):   # the title, then the description and `- key: value` lines right under it
            if not head:
                if _re_h1.match(ln): head.append(j)
            elif not desc and re.match(r'^>\s+\S', ln):
                head.append(j)
                desc = True
            elif re.match(r'^-\s+(\S.*:.*\S)\s*$', ln): head.append(j)
            elif ln.strip(): break
        rest = '\n'.join(ln for j, ln in enumerate(lines) if j not in head).strip()
        if rest:
            c.source = '\n\n'.join(lines[j] for j in head)
            nb.cells.insert(i + 1, mk_cell(rest, 'markdown'))
        return

def _skipped(cell, flags):
    "Why `nbdev_test` would not run this cell (a flag from `flags`, `eval: false`, `nbdev_export()`), or ''"
    from nbdev.process import extract_directives
    if cell.cell_type != 'code': return 'markdown'
    if 'nbdev_export' + '(' in cell.source: return 'nbdev_export'
    d = extract_directives(cell, remove=False)
    if d.get('eval:', [''])[0].lower() == 'false': return 'eval: false'
    return ' '.join(sorted(flags & d.keys()))

def execute(nb, path, flags):
    "Run the cells of `nb` (read from `path`) as `nbdev_test` does, keeping their outputs; an error message or None"
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    os.environ['IN_TEST'] = '1'
    k = CaptureShell(path)
    with working_directory(path.parent):
        for i, cell in enumerate(nb.cells, 1):
            why = _skipped(cell, flags)
            if why == 'markdown': continue
            if why:
                cell.metadata.setdefault('tags', []).append('docs-not-run')
                continue
            k.cell(cell)
            if k.exc:
                first = next((ln for ln in cell.source.splitlines() if ln.strip() and not ln.startswith('#|')), '')
                err = f'{type(k.exc).__name__}: {k.exc}'.splitlines()[0][:300]
                return f'{path.name}: cell {i} of {len(nb.cells)} (`{first.strip()[:80]}`) raised {err}'

def _showdoc_renderer():
    "nbdev's show_doc renderer as HTML-in-markdown without quarto: source link, signature, docstring, docments table"
    from fastcore.docments import DocmentTbl
    from nbdev.doclinks import NbdevLookup
    from nbdev.showdoc import BasicMarkdownRenderer

    class DocsRenderer(BasicMarkdownRenderer):
        "show_doc for the offline pages"
        def _repr_markdown_(self):
            src = NbdevLookup().code(self.fn)
            h = self.title_level
            link = f'<a class="sd-source" href="{html.escape(src)}" target="_blank" rel="noopener">source</a>'
            md = f'{link}\n\n' if src else ''
            md += f'<h{h} id="{html.escape(self.nm.lower())}" class="sd-name">{html.escape(self.nm)}</h{h}>\n\n'
            for v in self.dm.dm.values():   # the per-parameter comments go in the table below
                v['docment'] = None
            md += f'```python\n{self.dm}\n```\n\n'
            if self.docs: md += f'<div class="sd-doc">\n\n{self.docs.strip()}\n\n</div>\n\n'
            tbl = DocmentTbl(self.sym) if callable(self.sym) else None
            if tbl is not None and tbl.has_docment: md += str(tbl) + '\n'
            return md
    return DocsRenderer

def prepare(src, dst, do_exec):
    "Execute (unless `do_exec` is False) and process one notebook into `dst`: (name, seconds, error or None)"
    t0 = time.time()
    try:
        import nbdev.showdoc
        from execnb.nbio import read_nb, write_nb
        from nbdev.config import get_config
        from nbdev.processors import FilterDefaults
        cfg = get_config()
        sys.path.insert(0, str(cfg.config_path))
        nbdev.showdoc.BasicMarkdownRenderer = _showdoc_renderer()   # show_doc looks its renderer up at call time
        nb = read_nb(src)
        if do_exec and (err := execute(nb, Path(src), set(cfg.get('tst_flags', '').split()))):
            return Path(src).stem, time.time() - t0, err
        split_title_cell(nb)
        FilterDefaults()(nb)
        write_nb(nb, dst)
    except Exception as e:
        msg = (str(e).splitlines() or [''])[0]
        return Path(src).stem, time.time() - t0, f'{Path(src).name}: {type(e).__name__}: {msg}'
    return Path(src).stem, time.time() - t0, None

def prepare_all(jobs):
    "`prepare` several notebooks in this process, stopping at the first error"
    out = []
    for job in jobs:
        out.append(prepare(*job))
        if out[-1][2]: break
    return out

def _prepare_cli(result_file, jobs_json):
    "Worker entry point (`docs.py --prepare RESULT JOBS`): run `prepare_all` and write its results as JSON"
    jobs = [(Path(src), Path(dst), do_exec) for src, dst, do_exec in json.loads(jobs_json)]
    Path(result_file).write_text(json.dumps(prepare_all(jobs)))

def _kill(pr):
    "Stop a worker and whatever it started (DataLoader workers, kernels): it leads its own process group"
    try: os.killpg(pr.pid, signal.SIGTERM)
    except ProcessLookupError: pass

def run_all(srcs, proc, do_exec, workers):
    "`prepare` the notebooks in `workers` parallel processes, longest first (last run's timings); stop at an error"
    # Each worker is a fresh interpreter: an executed notebook gets one of its own, as under nbdev_test; without
    # execution each worker processes its share. Plain processes, not a multiprocessing pool, whose daemonic workers
    # could not start the DataLoader workers and kernels that the notebooks start.
    from concurrent.futures import ThreadPoolExecutor
    tfile = proc/'timings.json'
    last = json.loads(tfile.read_text()) if tfile.is_file() else {}
    srcs = sorted(srcs, key=lambda p: -last.get(p.stem, 0))
    jobs = [(str(p), str(proc/p.name), do_exec) for p in srcs]
    chunks = [[j] for j in jobs] if do_exec else [c for c in (jobs[i::workers] for i in range(workers)) if c]
    stop, lock, running = threading.Event(), threading.Lock(), set()

    def work(i):
        res = proc/f'.result{i}.json'
        res.unlink(missing_ok=True)
        with lock:
            if stop.is_set(): return []
            pr = subprocess.Popen([sys.executable, __file__, '--prepare', str(res), json.dumps(chunks[i])],
                                  start_new_session=True)
            running.add(pr)
        pr.wait()
        with lock: running.discard(pr)
        if stop.is_set(): return []
        first = Path(chunks[i][0][0])
        died = [(first.stem, 0., f'{first.name}: the worker died (exit code {pr.returncode})')]
        out = json.loads(res.read_text()) if res.is_file() else died
        res.unlink(missing_ok=True)
        if any(err for _, _, err in out):
            stop.set()
            with lock:
                for q in running: _kill(q)
        return out

    times, errors = {}, []
    try:
        with ThreadPoolExecutor(workers) as ex:
            for out in ex.map(work, range(len(chunks))):
                for name, secs, err in out:
                    times[name] = secs
                    if err: errors.append(err)
    finally:   # Ctrl-C or an error here: no worker outlives the build
        stop.set()
        with lock:
            for q in running: _kill(q)
    if do_exec and not errors: tfile.write_text(json.dumps({**last, **times}, indent=1))
    return times, errors

# ---------------------------------------------------------------- rendering

def _mathml(tex, display):
    from latex2mathml.converter import convert
    try: return convert(html.unescape(tex.strip()), display=display)
    except Exception as e: raise ValueError(f'formula ${tex}$ cannot be rendered ({type(e).__name__}: {e})') from None

def _exporter():
    "nbconvert's HTML exporter on the cells-only template, with formulas as MathML and no prompts"
    from jinja2 import pass_context
    from nbconvert import HTMLExporter
    from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath

    class MathMLRenderer(IPythonRenderer):
        def block_math(self, body): return _mathml(body, 'block')
        def inline_math(self, body): return _mathml(body, 'inline')
        def latex_environment(self, name, body): return _mathml(f'\\begin{{{name}}}{body}\\end{{{name}}}', 'block')

    class DocsExporter(HTMLExporter):
        @pass_context
        def markdown2html(self, context, source):
            cell = context.get('cell', {})
            r = MathMLRenderer(escape=False, attachments=cell.get('attachments', {}), anchor_link_text='¶')
            return MarkdownWithMath(renderer=r).render(source)

    return DocsExporter(template_name='docs_template', extra_template_basedirs=[str(TOOLS)],
                        exclude_input_prompt=True, exclude_output_prompt=True)

_re_quarto = re.compile(r'^#\|\s*([\w-]+)\s*:\s*(.*?)\s*$')
_re_cr = re.compile(r'[^\n]*\r(?!\n)')   # progress bars: keep what a terminal would show after the last \r

def page_cells(nb):
    "Front matter dict and the notebook ready for nbconvert: quarto cell options applied, nbdev's notes dropped"
    import yaml
    fm = {}
    if nb.cells and nb.cells[0].cell_type == 'raw' and nb.cells[0].source.lstrip().startswith('---'):
        fm = yaml.safe_load(nb.cells.pop(0).source.strip().strip('-')) or {}
    cells = []
    for c in nb.cells:
        if c.cell_type == 'markdown' and re.fullmatch(r'\s*<!--.*?-->\s*', c.source, flags=re.S): continue
        if c.cell_type == 'code':
            lines = c.source.splitlines()
            opts = {}
            while lines and (m := _re_quarto.match(lines[0])):
                opts[m.group(1)] = m.group(2).strip('"\'').lower()
                lines.pop(0)
            c.source = '\n'.join(lines)
            if opts.get('include') == 'false': continue
            if opts.get('echo') == 'false': c.metadata['transient'] = {'remove_source': True}
            if opts.get('output') == 'false': c.outputs = []
            if re.match(r'\s*show_doc\(', c.source): c.metadata.setdefault('tags', []).append('showdoc')
            for o in c.get('outputs', []):
                if o.get('output_type') == 'stream': o['text'] = _re_cr.sub('', ''.join(o['text']))
            if not c.source.strip() and not c.get('outputs'): continue
        cells.append(c)
    nb.cells = cells
    return fm

def _toc(body):
    "(level, id, text) of the h2/h3 headings in `body`"
    out = []
    for m in re.finditer(r'<h([23])\b[^>]*\bid="([^"]+)"[^>]*>(.*?)</h\1>', body, flags=re.S):
        text = re.sub(r'<a class="anchor-link".*?</a>|<[^>]+>', '', m.group(3)).strip()
        out.append((int(m.group(1)), m.group(2), html.unescape(text)))
    return out

def render_page(body, fm, desc_html, nav, current, site):
    "The page shell: sidebar (book order), header (title + description), cells, on-page contents"
    items = '\n'.join(f'<li><a href="{href}"{" class=current" if href == current else ""}>{html.escape(t)}</a></li>'
                      for href, t in nav)
    toc = '\n'.join(f'<li class="toc-h{lv}"><a href="#{html.escape(i)}">{html.escape(t)}</a></li>'
                     for lv, i, t in _toc(body))
    title = html.escape(str(fm.get('title', current)))
    return f'''<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} – {html.escape(site)}</title>
<link rel="stylesheet" href="docs.css">
<link rel="stylesheet" href="pygments.css">
</head>
<body>
<nav class="sidebar" aria-label="Pages">
<a class="site-title" href="index.html">{html.escape(site)}</a>
<ol class="pages">
{items}
</ol>
</nav>
<main>
<header class="page-header">
<h1 class="title" id="title">{title}</h1>
<div class="description">{desc_html}</div>
</header>
{body}
</main>
<nav class="toc" aria-label="On this page">
<h2 class="toc-title">On this page</h2>
<ul>
{toc}
</ul>
</nav>
</body>
</html>
'''

def _nav(srcs):
    "(page file, title) for every notebook of the book"
    from execnb.nbio import read_nb
    out = []
    for p in srcs:
        md = [c.source for c in read_nb(p).cells if c.cell_type == 'markdown']
        m = next((m for s in md if (m := _re_h1.search(s))), None)
        out.append((p.stem + '.html', m.group(1) if m else p.stem))
    return out

def render(srcs, proc, out, nav, cfg):
    "Write one HTML page per processed notebook, the CSS, and rewrite links to the published site to local pages"
    import nbformat
    from nbdev.doclinks import _nbpath2html
    from pygments.formatters import HtmlFormatter
    exp = _exporter()
    site = f"{cfg.doc_host}{cfg.doc_baseurl}".rstrip('/') + '/'
    local = {_nbpath2html(Path(f)).name: f for f, _ in nav}   # quarto's output-file -> our page
    def _link(m): return f'href="{local.get(m.group(1), m.group(1))}{m.group(2) or ""}"'
    for p in srcs:
        nb = nbformat.read(proc/p.name, as_version=4)
        for c in nb.cells: c.pop('has_sd', None)   # nbdev's marker is not nbformat
        fm = page_cells(nb)
        try:
            body, _ = exp.from_notebook_node(nb)
            desc = exp.markdown2html({}, str(fm.get('description', '')))
        except ValueError as e: raise SystemExit(f'docs: {p.name}: {e}') from None
        body = re.sub(rf'href="{re.escape(site)}([\w.-]+\.html)(#[^"]*)?"', _link, body)
        page = render_page(body, fm, desc, nav, p.stem + '.html', cfg.title)
        (out/(p.stem + '.html')).write_text(page, encoding='utf-8')
    shutil.copy(TOOLS/'docs_assets'/'docs.css', out/'docs.css')
    (out/'pygments.css').write_text(HtmlFormatter(style='friendly').get_style_defs('.highlight'), encoding='utf-8')

def main(argv=None):
    ap = argparse.ArgumentParser(description='Build the offline docs (see the module docstring).')
    ap.add_argument('out', nargs='?', default='_docs', help='output folder, relative to the repo root')
    ap.add_argument('--no-exec', action='store_true', help='do not execute the notebooks (pages without outputs)')
    ap.add_argument('--only', nargs='+', default=None, help='only these notebooks (stems of nbs/ or paths)')
    ap.add_argument('--workers', type=int, default=2, help='notebooks processed in parallel')
    ap.add_argument('--proc', default='_proc/_offline', help='where the executed, processed notebooks go')
    a = ap.parse_args(argv)
    from nbdev.config import get_config
    cfg = get_config()
    root = cfg.config_path
    srcs = book(cfg.nbs_path)
    nav = _nav(srcs)
    if a.only:
        by_stem = {p.stem: p for p in srcs}
        srcs = [by_stem[o] if o in by_stem else Path(o).resolve() for o in a.only]
        missing = [str(p) for p in srcs if not p.is_file()]
        if missing: raise SystemExit(f'docs: no such notebook: {", ".join(missing)}')
        nav += [(p.stem + '.html', p.stem) for p in srcs if p.stem + '.html' not in dict(nav)]
    proc, out = root/a.proc, root/a.out
    proc.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    times, errors = run_all(srcs, proc, not a.no_exec, a.workers)
    if errors:
        for e in errors: print(f'docs: {e}', file=sys.stderr)
        raise SystemExit(1)
    render(srcs, proc, out, nav, cfg)
    slow = ', '.join(f'{k} {v:.0f}s' for k, v in sorted(times.items(), key=lambda kv: -kv[1])[:4])
    how = 'not executed' if a.no_exec else 'executed'
    print(f"{len(srcs)} pages in {out} ({how}; {time.time() - t0:.0f}s; slowest: {slow})")

def readme_text(nb_path='nbs/index.ipynb'):
    "README.md from the front-page notebook: markdown and visible code cells (quarto's nbdev_readme, without quarto)"
    import nbformat
    nb = nbformat.read(nb_path, as_version=4)
    parts = []
    for c in nb.cells:
        src = c.source.strip()
        if not src or src.startswith('#| hide') or '#| hide' in src.splitlines()[:3]: continue
        parts.append(src if c.cell_type == 'markdown' else f"```python\n{src}\n```")
    return '\n\n'.join(parts) + '\n'

if __name__ == '__main__':
    if sys.argv[1:2] == ['--readme']: Path('README.md').write_text(readme_text(), encoding='utf-8')
    elif sys.argv[1:2] == ['--prepare']: _prepare_cli(*sys.argv[2:4])
    else: main()
