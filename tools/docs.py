#!/usr/bin/env python
"""Build the docs offline, without quarto: nbdev's processors (show_doc for every exported symbol, hidden
cells removed) into `_proc/`, then nbconvert's HTML exporter into the output folder (default `_docs`).
With quarto installed, use `nbdev_docs` instead (`make docs` picks it)."""
import sys, shutil
from pathlib import Path

def _clean(nb):
    "Make nbdev's processed notebook valid nbformat and hide the source of `#| echo: false` cells"
    for c in nb.cells:
        c.pop('has_sd', None)
        if c.cell_type == 'code' and '#| echo: false' in c.source:
            c.metadata.setdefault('tags', []).append('hide-input')
    return nb

def main(out='_docs'):
    import nbformat
    from nbconvert import HTMLExporter
    from nbdev.config import get_config
    from nbdev.serve import proc_nbs
    cfg = get_config()
    proc = Path(proc_nbs(n_workers=1))
    out = cfg.config_path/out
    out.mkdir(parents=True, exist_ok=True)
    from nbconvert.preprocessors import TagRemovePreprocessor
    from traitlets.config import Config
    exp = HTMLExporter(config=Config({'TagRemovePreprocessor': {'remove_input_tags': {'hide-input'}}}))
    exp.register_preprocessor(TagRemovePreprocessor, enabled=True)
    nbs = sorted(p for p in proc.rglob('*.ipynb') if not p.name.startswith('_') and '.ipynb_checkpoints' not in p.parts)
    for p in nbs:
        nb = _clean(nbformat.read(p, as_version=4))
        html, _ = exp.from_notebook_node(nb)
        dest = out/p.relative_to(proc).with_suffix('.html')
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(html, encoding='utf-8')
    for p in proc.rglob('*'):  # images and other assets the pages refer to
        if p.is_file() and p.suffix in ('.png', '.jpg', '.svg', '.css'):
            (out/p.relative_to(proc)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, out/p.relative_to(proc))
    print(f"{len(nbs)} pages in {out}")

def readme_text(nb_path='nbs/index.ipynb'):
    "README.md from the front-page notebook: its markdown cells and visible code cells (quarto's nbdev_readme does this with quarto)"
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
    else: main(*sys.argv[1:])
