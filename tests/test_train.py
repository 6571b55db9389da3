"""Training tests that need several processes: DDP equivalence (torchrun, 2 ranks, gloo on CPU) and
kill-and-resume of `python -m glr_nb.train` on the demo dataset."""
import os, sys, json, time, signal, subprocess, textwrap
from pathlib import Path
import pytest, torch

PY = sys.executable
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}

DDP_SCRIPT = textwrap.dedent('''
    import sys, json, torch, torch.distributed as dist
    from torch.utils.data import Dataset
    from glr_nb.train import train
    class Toy(Dataset):
        def __init__(self, n=64, k=4, s=32):
            g = torch.Generator().manual_seed(0)
            self.y, self.base, self.noise = torch.arange(n) % k, torch.randn(k, 3, 1, 1, generator=g), torch.randn(n, 3, s, s, generator=g)
        def __len__(self): return len(self.y)
        def __getitem__(self, i):
            x = self.base[self.y[i]] + self.noise[i]
            return (x.flip(-1) if torch.rand(()) < .5 else x), self.y[i]
    res, bs = sys.argv[1], int(sys.argv[2])
    learn = train(arch='test_resnet', result_dir=res, out_dir=f'ddp_bs{bs}', train_ds=Toy(), valid_ds=Toy(16),
                  num_classes=4, epochs=2, img_size=32, eval_img_size=32, batch_size=bs, save_every_epoch=0.5,
                  num_workers=0, log_every=1, lr=0.05, freeze_bn=True, quiet=True)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.save(learn.raw.state_dict(), f'{res}/w_{world}_{rank}.pt')
    if rank == 0: json.dump(learn.checkpointer.history, open(f'{res}/loss_{world}.json', 'w'))
    if dist.is_initialized(): dist.destroy_process_group()
''')

def test_ddp_two_ranks_match_one_process(tmp_path):
    "torchrun 2 x batch 4 (gloo) == 1 process x batch 8: identical rank weights, same losses and weights"
    script = tmp_path/'ddp_run.py'; script.write_text(DDP_SCRIPT)
    r = subprocess.run([PY, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script), str(tmp_path), '4'],
                       env=ENV, capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([PY, str(script), str(tmp_path), '8'], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1, w = [torch.load(tmp_path/f, weights_only=True) for f in ('w_2_0.pt', 'w_2_1.pt', 'w_1_0.pt')]
    for k in w0: assert torch.equal(w0[k], w1[k]), k                      # ranks stay in sync
    l2, l1 = json.load(open(tmp_path/'loss_2.json')), json.load(open(tmp_path/'loss_1.json'))
    assert len(l2) == len(l1) == 16
    for a, b in zip(l2, l1):
        assert a['epoch'] == pytest.approx(b['epoch']) and a['train_loss'] == pytest.approx(b['train_loss'], rel=1e-4, abs=1e-4)
    for k in w: assert torch.allclose(w0[k].float(), w[k].float(), atol=1e-3, rtol=1e-2), (k, (w0[k].float() - w[k].float()).abs().max().item())
    # rank 0 alone wrote the checkpoints, named by fractional epoch
    assert sorted(p.name for p in (tmp_path/'models'/'ddp_bs4').glob('[0-9]*.pth')) == ['0.50.pth', '1.00.pth', '1.50.pth', '2.00.pth']

@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    from glr_nb.data import make_demo_dataset, make_splits
    d = tmp_path_factory.mktemp('demo')/'data'
    make_demo_dataset(d); make_splits(d)
    return d

ARGS = ['--arch', 'test_resnet', '--epochs', '2', '--img_size', '32', '--eval_img_size', '32', '--batch_size', '32',
        '--save_every_epoch', '0.25', '--aug_version', '3b', '--num_workers', '0', '--max_valid', '48']

def _argv(demo, res, out, *extra):
    return ['--data-dir', str(demo), '--result-dir', str(res), '--out_dir', out, *ARGS, *extra]

@pytest.fixture
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)   # same kernels as the OMP_NUM_THREADS=1 subprocess
    yield
    torch.set_num_threads(n)

def test_kill_and_resume(demo, tmp_path, one_thread):
    "SIGKILL `python -m glr_nb.train` after its first checkpoint, resume with --resume latest: same final weights"
    from glr_nb.train import glr_train
    from glr_nb.core import load_checkpoint
    assert glr_train(_argv(demo, tmp_path, 'full')) is None               # uninterrupted, in-process; exit code 0
    full = tmp_path/'models'/'full'
    out = tmp_path/'models'/'cut'
    p = subprocess.Popen([PY, '-m', 'glr_nb.train', *_argv(demo, tmp_path, 'cut')], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not list(out.glob('[0-9]*.pth')) and p.poll() is None and time.time() - t0 < 150: time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    assert list(out.glob('[0-9]*.pth')) and not (out/'2.00.pth').exists(), "the run was not interrupted"
    glr_train(_argv(demo, tmp_path, 'cut', '--resume', 'latest'))
    assert 'resume from' in (out/'train.log').read_text()
    a, b = load_checkpoint(full/'2.00.pth'), load_checkpoint(out/'2.00.pth')
    assert a['epoch'] == b['epoch'] == 2.0
    for k in a['state_dict']: assert torch.equal(a['state_dict'][k], b['state_dict'][k]), k
    la, lb = [open(o/'log.csv').read().splitlines() for o in (full, out)]
    assert [l.split(',')[:2] for l in la] == [l.split(',')[:2] for l in lb]   # the log continues seamlessly

def _exit(f, argv, capsys):
    try: f(argv); code = 0
    except SystemExit as e: code = e.code
    return code, capsys.readouterr().err

def test_cli_flags_and_errors(demo, tmp_path, capsys):
    "Every seed flag parses; bad values give one line and exit code 2"
    from glr_nb.train import glr_train
    seed_flags = ['--arch', 'class_efficientnet_b7_gem_fc_arcface2_1head', '--save_every_epoch', '0.1', '--epochs', '7',
                  '--img_size', '448', '--eval_img_size', '512', '--scheduler', 'SGD', '--out_dir', 'x', '--loss',
                  'LabelSmoothingLossV1', '--aug_version', '1', '--split_type', 'v2c', '--num_classes', '81313',
                  '--gpu_id', '0', '--batch_size', '4', '--distributed', '1', '--preprocessing', '1',
                  '--model_file', str(tmp_path/'none.pth'), '--data_dir', str(demo), '--result_dir', str(tmp_path)]
    code, err = _exit(glr_train, seed_flags, capsys)
    assert code == 2 and 'none.pth: checkpoint not found' in err, err
    code, err = _exit(glr_train, ['--data-dir', str(demo), '--result-dir', str(tmp_path), '--arch', 'nope'], capsys)
    assert code == 2 and 'unknown architecture' in err.splitlines()[-1]
    code, err = _exit(glr_train, ['--data-dir', str(demo), '--result-dir', str(tmp_path), '--split_type', 'v9'], capsys)
    assert code == 2 and 'split file not found' in err
    code, err = _exit(glr_train, ['--data-dir', str(demo), '--result-dir', str(tmp_path), '--scheduler', 'adam'], capsys)
    assert code == 2 and 'unknown scheduler' in err

def test_python_m_entry_point(tmp_path):
    "`python -m glr_nb.train --help` reaches the script (the __main__ guard fires outside notebooks)"
    r = subprocess.run([PY, '-m', 'glr_nb.train', '--help'], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and '--save_every_epoch' in r.stdout and '--model_file' in r.stdout
