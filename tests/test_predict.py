"glr_index and glr_predict as processes: their --help imports no torch, and bad arguments exit 2 with one line"
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'PYTHONPATH': str(ROOT)}


def _run(script, *argv, code=''):
    "Run console script `script` of glr_nb.predict (as its entry point does) in a fresh interpreter"
    src = (f"import sys\nfrom glr_nb.predict import {script}\n{code}\n"
           f"sys.argv[1:] = {list(map(str, argv))!r}\n{script}()")
    return subprocess.run([sys.executable, '-c', src], env=ENV, capture_output=True, text=True, timeout=120)


def test_help_imports_no_torch():
    "Each script's --help lists its flags without importing torch"
    check = "import atexit\natexit.register(lambda: print('TORCH', 'torch' in sys.modules))"
    for script, flag in (('glr_index', '--checkpoints'), ('glr_predict', '--index')):
        r = _run(script, '--help', code=check)
        assert r.returncode == 0 and flag in r.stdout, r.stderr
        assert 'TORCH False' in r.stdout, f"{script} --help imported torch"


def test_missing_index_exits_2_with_one_line(tmp_path):
    "A folder that holds no index is refused by both scripts with one stderr line naming it"
    photo = tmp_path/'a.jpg'
    photo.write_bytes(b'x')
    for script, argv in (('glr_predict', ['--index', tmp_path, photo]), ('glr_index', ['check', '--out', tmp_path])):
        r = _run(script, *argv)
        assert r.returncode == 2, (script, r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and 'no index.json' in r.stderr, r.stderr


def test_damaged_manifest_and_missing_flags(tmp_path):
    "A damaged manifest, and glr_predict without --index or photos, each exit 2 saying what to do"
    (tmp_path/'index.json').write_text(json.dumps({'format': 'other'}))
    cases = [('glr_index', ['check', '--out', tmp_path], 'not a glr_nb.index/1 manifest'),
             ('glr_predict', [tmp_path/'a.jpg'], 'pass --index'),
             ('glr_predict', ['--index', tmp_path], 'pass one or more photos')]
    for script, argv, says in cases:
        r = _run(script, *argv)
        assert r.returncode == 2 and says in r.stderr, (script, argv, r.stderr)
