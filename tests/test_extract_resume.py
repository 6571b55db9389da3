"A real kill (SIGKILL) in the middle of `cached_extract`: the rerun redoes only unfinished chunks, as a clean run."
import os, signal, subprocess, sys, time, textwrap
from pathlib import Path
import numpy as np

SCRIPT = textwrap.dedent('''
    import sys, time, torch
    from torch.utils.data import Dataset
    from glr_nb.retrieval import cached_extract
    from tiny_net import Net

    class Slow(Dataset):
        "Deterministic images; slow after `fast` items so the parent can kill us mid-run"
        def __init__(self, n, fast, log): self.n, self.fast, self.log = n, fast, log
        def __len__(self): return self.n
        def __getitem__(self, i):
            if self.log: open(self.log, 'a').write(f'{i}\\n')
            if i >= self.fast: time.sleep(0.2)
            g = torch.Generator().manual_seed(i)
            return torch.randn(3, 12, 12, generator=g), 0

    path, fast, log = sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None
    ids = [f'{i:016x}' for i in range(40)]
    cached_extract(Net(), Slow(40, fast, log), ids, path, dict(v=1), bs=4, device='cpu', chunk=10, progress=False)
''')


def run(tmp, *args, wait=True):
    f = tmp/'job.py'
    f.write_text(SCRIPT)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(Path(__file__).parent), os.environ.get('PYTHONPATH', '')])}
    p = subprocess.Popen([sys.executable, str(f), *map(str, args)], env=env)
    if wait: assert p.wait(120) == 0
    return p


def test_kill_and_resume(tmp_path):
    from glr_nb.retrieval import load_embeddings, cache_state
    ids = [f'{i:016x}' for i in range(40)]
    ref = tmp_path/'ref'/'x.npy'
    run(tmp_path, ref, 10**6)                                  # a clean, uninterrupted run
    want, _ = load_embeddings(ref)

    p_ = tmp_path/'killed'/'x.npy'
    proc = run(tmp_path, p_, 20, wait=False)                   # chunks 0-1 fast, then slow
    parts = p_.with_suffix('.parts')
    t0 = time.time()
    while not (parts/'00001.json').exists():
        assert time.time() - t0 < 120 and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_embeddings(p_, missing_ok=True) is None       # incomplete: never served
    done = cache_state(p_, dict(v=1), ids, 8, 10)[1]
    assert done[:2] == [0, 1] and len(done) < 4

    log = tmp_path/'seen.txt'
    run(tmp_path, p_, 10**6, log)                               # resume
    seen = [int(l) for l in log.read_text().split()]
    assert min(i for i in seen if i > 0) >= 10 * len(done)     # finished chunks not redone (item 0 = the probe)
    got, _ = load_embeddings(p_, dict(v=1), ids)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
