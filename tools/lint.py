"""The lint step of `make test`: a short ruff rule list on the package, tools and tests, plus two house rules ruff
has no code for. Lines nbdev writes itself (the module docstring from a notebook's description, `__all__`) are
not ours to wrap, so their findings are dropped. Prints one line per finding and exits 1 when there is any."""
import json, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RULES = 'E501,E702,E703,E711,E712,E722,F811,F841'   # long lines, `;` chains, == None/True, bare except, redefinitions
PATHS = ['glr_nb', 'tools', 'tests']

def generated(path:Path, line:int)->bool:
    "Is `line` of `path` one that nbdev writes (module docstring on line 1, the `__all__` block)?"
    if path.parent.name != 'glr_nb': return False
    lines = path.read_text().splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('__all__')), None)
    if line == 1 or start is None: return line == 1
    end = next(i for i in range(start, len(lines)) if lines[i].rstrip().endswith(']'))
    return start + 1 <= line <= end + 1

def ruff_findings()->list:
    "ruff's findings as 'path:line:col: CODE message', without those on nbdev's own lines"
    cmd = [sys.executable, '-m', 'ruff', 'check', '--select', RULES, '--line-length', '120', '--output-format', 'json',
           '--exclude', 'glr_nb/_modidx.py', *PATHS]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode not in (0, 1) or (r.returncode == 1 and not r.stdout.strip()):
        sys.exit(f"ruff failed ({sys.executable} -m ruff): {r.stderr.strip()[-500:]}")
    out = []
    for f in json.loads(r.stdout or '[]'):
        p, ln = Path(f['filename']), f['location']['row']
        if generated(p, ln): continue
        out.append(f"{p.relative_to(ROOT)}:{ln}:{f['location']['column']}: {f['code']} {f['message']}")
    return out

MONKEY = re.compile(r'^([A-Z]\w*)\.(\w+)\s*=\s*(?!None\b)[A-Za-z_]')   # `Class.method = f` at module level

def house_findings()->list:
    "`Class.method = f` in the package; `test_eq(<cond>, True)` in notebooks (use `assert cond, msg`)"
    out = []
    for p in sorted((ROOT/'glr_nb').glob('*.py')):
        for i, l in enumerate(p.read_text().splitlines(), 1):
            if MONKEY.match(l): out.append(f"{p.relative_to(ROOT)}:{i}:1: house `{l.split('=')[0].strip()} = ...`:"
                                           " define the method in the class body or with @patch")
    for p in sorted((ROOT/'nbs').glob('*.ipynb')):
        for j, c in enumerate(json.loads(p.read_text())['cells']):
            for l in ''.join(c['source']).splitlines():
                if re.search(r'test_eq\(.*,\s*True\)\s*$', l):
                    out.append(f"{p.relative_to(ROOT)}: cell {j}: house `{l.strip()}`: use `assert cond, msg`")
    return out

if __name__ == '__main__':
    found = ruff_findings() + house_findings()
    print('\n'.join(found) or 'lint: clean')
    sys.exit(1 if found else 0)
