"glr_eval as a process: scores ranks as JSON fractions, and bad input exits 2 with one line naming the fix"
import json, os, pickle, subprocess, sys
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'PYTHONPATH': str(ROOT)}


def _run(*argv):
    "Run glr_eval (as its entry point does) in a fresh interpreter"
    src = f"import sys\nfrom glr_nb.eval import glr_eval\nsys.argv[1:] = {list(map(str, argv))!r}\nglr_eval()"
    return subprocess.run([sys.executable, '-c', src], env=ENV, capture_output=True, text=True, timeout=120)


def test_ranks_json_fractions(tmp_path):
    "A perfect ranking scores 1 in every setting; the reversed one scores less; JSON has the issue's keys"
    n = 6
    gnd = [dict(easy=[0, 1], hard=[2], junk=[3], bbx=[0, 0, 1, 1]), dict(easy=[4], hard=[5], junk=[], bbx=[0, 0, 1, 1])]
    g = tmp_path/'gnd_rparis6k.pkl'
    g.write_bytes(pickle.dumps(dict(imlist=[f'i{k}' for k in range(n)], qimlist=['a', 'b'], gnd=gnd)))
    best = np.array([[0, 1, 2, 3, 4, 5], [4, 5, 0, 1, 2, 3]]).T
    np.save(tmp_path/'best.npy', best)
    np.save(tmp_path/'worst.npy', best[::-1].copy())
    out = {}
    for name in ('best', 'worst'):
        r = _run('revisitop', '--ranks', tmp_path/f'{name}.npy', '--gnd', g, '--json')
        assert r.returncode == 0, r.stderr
        out[name] = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x['setting'] for x in out['best']] == ['easy', 'medium', 'hard']
    for x in out['best']: assert [x[k] for k in ('map', 'mp@1', 'mp@5', 'mp@10')] == [1., 1., 1., 1.], x
    assert all(x['map'] < 1 and x['dataset'] == 'rparis6k' for x in out['worst']), out['worst']
    g.write_bytes(pickle.dumps(dict(imlist=[f'i{k}' for k in range(n)], gnd=[dict(easy=[0], hard=[], junk=[1])] * 2)))
    r = _run('revisitop', '--ranks', tmp_path/'best.npy', '--gnd', g, '--json')
    hard = [json.loads(line) for line in r.stdout.splitlines()][2]
    assert r.returncode == 0 and hard['map'] is None and hard['queries'] == 0, (r.stderr, hard)   # no hard positives
    r = _run('revisitop', '--ranks', tmp_path/'best.npy', '--gnd', g)
    assert r.returncode == 0 and 'NaN' in r.stdout.splitlines()[-1], r.stdout


def test_bad_input_exits_2_with_one_line(tmp_path):
    "Missing --gnd, a missing folder, a folders run without its folder: exit 2, one line saying what to pass"
    np.save(tmp_path/'r.npy', np.zeros((2, 1), np.int64))
    cases = [(['revisitop', '--ranks', tmp_path/'r.npy'], '--ranks needs --gnd'),
             (['revisitop', '--data', tmp_path], 'no gnd_roxford5k.pkl'),
             (['folders'], 'pass the folder of landmark folders'),
             (['revisitop', '--split', '2'], 'split = 2.0 is out of range')]
    for argv, says in cases:
        r = _run(*argv)
        assert r.returncode == 2 and says in r.stderr, (argv, r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
