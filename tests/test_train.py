"""Training tests that need several processes, the shell or the demo data: DDP equivalence (torchrun, 2 ranks,
gloo on CPU), kill-and-resume of `python -m glr_nb.train`, the README's commands, the offline error, and a
fine-tune at a new image size."""
import os, re, sys, json, time, shlex, signal, subprocess, textwrap
from pathlib import Path
import pytest, torch

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}

DDP_SCRIPT = textwrap.dedent('''
    import sys, json, torch, torch.distributed as dist
    from glr_nb.train import train
    from glr_nb.learner import ToyColours
    res, bs = sys.argv[1], int(sys.argv[2])
    learn = train(arch='test_resnet', result_dir=res, out_dir=f'ddp_bs{bs}', train_ds=ToyColours(64, flip=True),
                  valid_ds=ToyColours(16), num_classes=4, epochs=2, img_size=32, eval_img_size=32, batch_size=bs,
                  save_every_epoch=0.5, workers=0, log_every=1, lr=0.05, freeze_bn=True, pretrained='none', quiet=True)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.save(learn.raw.state_dict(), f'{res}/w_{world}_{rank}.pt')
    if rank == 0: json.dump(learn.loss_log.history, open(f'{res}/loss_{world}.json', 'w'))
    if dist.is_initialized(): dist.destroy_process_group()
''')

def test_ddp_two_ranks_match_one_process(tmp_path):
    "torchrun 2 x batch 4 (gloo) == 1 process x batch 8: identical rank weights, same losses and weights"
    script = tmp_path/'ddp_run.py'
    script.write_text(DDP_SCRIPT)
    r = subprocess.run([PY, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script),
                        str(tmp_path), '4'], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([PY, str(script), str(tmp_path), '8'], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1, w = [torch.load(tmp_path/f, weights_only=True) for f in ('w_2_0.pt', 'w_2_1.pt', 'w_1_0.pt')]
    for k in w0: assert torch.equal(w0[k], w1[k]), k                      # ranks stay in sync
    l2, l1 = json.load(open(tmp_path/'loss_2.json')), json.load(open(tmp_path/'loss_1.json'))
    assert len(l2) == len(l1) == 16
    for a, b in zip(l2, l1):
        assert a['epoch'] == pytest.approx(b['epoch'])
        assert a['train_loss'] == pytest.approx(b['train_loss'], rel=1e-4, abs=1e-4)
    for k in w:
        gap = (w0[k].float() - w[k].float()).abs().max()
        assert torch.allclose(w0[k].float(), w[k].float(), atol=1e-3, rtol=1e-2), (k, gap)
    # rank 0 alone wrote the checkpoints, named by fractional epoch, and marked the run complete
    out = tmp_path/'models'/'ddp_bs4'
    assert sorted(p.name for p in out.glob('[0-9]*.pth')) == ['0.50.pth', '1.00.pth', '1.50.pth', '2.00.pth']
    assert json.loads((out/'run.json').read_text())['complete'] is True

@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    from glr_nb.data import make_demo_dataset, make_splits
    d = tmp_path_factory.mktemp('demo')/'data'
    make_demo_dataset(d)
    make_splits(d)
    return d

def test_ddp_console_script_exits_cleanly_under_load(demo, tmp_path):
    "torchrun -m glr_nb.train, 2 gloo ranks beside a CPU-bound process: both exit 0 (no abort at exit), run complete"
    hog = subprocess.Popen([PY, '-c', 'while True: pass'])
    try:
        argv = ['--arch', 'test_resnet', '--pretrained', 'none', '--epochs', '1', '--img_size', '32', '--eval_img_size',
                '32', '--batch_size', '16', '--save_every_epoch', '0.5', '--workers', '1', '--max_valid', '16',
                '--data_dir', str(demo), '--result_dir', str(tmp_path), '--out_dir', 'ddp_cli']
        r = subprocess.run([PY, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m',
                            'glr_nb.train', *argv], env=ENV, capture_output=True, text=True, timeout=900)
    finally: hog.kill()
    assert r.returncode == 0, r.stderr[-3000:]
    for bad in ('terminate called', 'SIGABRT', 'Signal 6', 'Traceback'): assert bad not in r.stderr, r.stderr[-3000:]
    out = tmp_path/'models'/'ddp_cli'
    assert (out/'final.pth').is_file() and json.loads((out/'run.json').read_text())['complete'] is True

ARGS = ['--arch', 'test_resnet', '--pretrained', 'none', '--epochs', '2', '--img_size', '32', '--eval_img_size', '32',
        '--batch_size', '32', '--save_every_epoch', '0.25', '--aug_version', '3b', '--workers', '0',
        '--max_valid', '48', '--select_by', 'gap']

def _argv(demo, res, out, *extra):
    return ['--data-dir', str(demo), '--result-dir', str(res), '--out_dir', out, *ARGS, *extra]

@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # same kernels as the OMP_NUM_THREADS=1 subprocess
    yield
    torch.set_num_threads(n)

def test_kill_and_resume(demo, tmp_path, one_thread):
    "SIGKILL `python -m glr_nb.train` after its first checkpoint, resume with --resume latest: same final weights"
    from glr_nb.train import glr_train, run_complete
    from glr_nb.core import load_checkpoint
    assert glr_train(_argv(demo, tmp_path, 'full')) is None               # uninterrupted, in-process; exit code 0
    full = tmp_path/'models'/'full'
    out = tmp_path/'models'/'cut'
    p = subprocess.Popen([PY, '-m', 'glr_nb.train', *_argv(demo, tmp_path, 'cut')], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not list(out.glob('[0-9]*.pth')) and p.poll() is None and time.time() - t0 < 300: time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert list(out.glob('[0-9]*.pth')) and not (out/'2.00.pth').exists(), "the run was not interrupted"
    assert not run_complete(out)
    glr_train(_argv(demo, tmp_path, 'cut', '--resume', 'latest'))
    assert 'resume from' in (out/'train.log').read_text() and run_complete(out) and run_complete(full)
    a, b = load_checkpoint(full/'2.00.pth'), load_checkpoint(out/'2.00.pth')
    assert a['epoch'] == b['epoch'] == 2.0
    for k in a['state_dict']: assert torch.equal(a['state_dict'][k], b['state_dict'][k]), k
    la, lb = [open(o/'log.csv').read().splitlines() for o in (full, out)]
    assert [l.split(',')[:2] for l in la] == [l.split(',')[:2] for l in lb]   # the log continues seamlessly

def test_fine_tune_at_a_new_size(demo, tmp_path):
    "--model_file at 96 px from a 64 px run: epoch restarts, the weights come from the file, images are 96 px"
    from glr_nb.train import train, find_checkpoint
    from glr_nb.core import load_checkpoint
    kw = dict(arch='test_resnet', data_dir=demo, result_dir=tmp_path, pretrained='none', epochs=1, batch_size=32,
              save_every_epoch=1., workers=0, max_valid=48, quiet=True)
    train(out_dir='i64', img_size=64, eval_img_size=64, **kw)
    first = load_checkpoint(tmp_path/'models'/'i64'/'final.pth')
    assert first['metric'] == 'map100' and first['img_size'] == 64           # the demo has GLDv2's retrieval files
    learn = train(out_dir='i96', img_size=96, eval_img_size=96, model_file=tmp_path/'models'/'i64'/'final.pth',
                  lr=1e-12, freeze_bn=True, **{**kw, 'epochs': 0.2, 'save_every_epoch': 0.2})
    assert learn.dls.train.dataset[0][0].shape == (3, 96, 96)
    ck = load_checkpoint(find_checkpoint(tmp_path/'models'/'i96'))        # 32 batches an epoch: stops at 7/32
    assert 0.2 <= ck['epoch'] < 0.25 and ck['img_size'] == 96 and ck['settings']['model_file'].endswith('final.pth')
    for k, v in first['state_dict'].items():                                 # lr 1e-12, BN frozen: the file's weights
        assert torch.allclose(v.float(), ck['state_dict'][k].float(), atol=1e-6), k
    assert 'retrieval_map100' in open(tmp_path/'models'/'i96'/'log.csv').readline()

def _readme_commands():
    "The `torchrun ... -m glr_nb.train` commands of the README, as argument lists"
    text = (ROOT/'README.md').read_text().replace('\\\n', ' ')
    env = {'GLR_DATA_DIR': '/data', 'GLR_RESULT_DIR': '/results', 'E448': '24.00', 'E512': '25.00', 'E640': '26.00'}
    cmd = 'torchrun --nproc_per_node 4 -m glr_nb.train'
    lines = [l.strip() for l in text.splitlines() if l.strip().startswith(cmd)]
    return [shlex.split(re.sub(r'\$\{?(\w+)\}?', lambda m: env[m[1]], l))[5:] for l in lines]

def test_readme_commands_parse():
    "The README's torchrun commands (the reference's eight, then the 512/640/736 stages) parse into valid settings"
    from glr_nb.core import _parser
    from glr_nb.train import glr_train, TrainSettings
    p, _ = _parser(glr_train.__wrapped__)
    cmds = _readme_commands()
    assert len(cmds) >= 8, len(cmds)
    runs = [TrainSettings.of(vars(p.parse_args(c))) for c in cmds]
    assert [r.arch for r in runs[:8]] == ['class_efficientnet_b7_gem_fc_arcface2_1head'] * 2 + \
        ['class_efficientnet_b6_gem_fc_arcface2_1head'] * 2 + ['class_efficientnet_b5_gem_fc_arcface_1head'] * 2 + \
        ['class_resnet152_gem_fc_arcface_1head'] * 2
    assert [r.split_type for r in runs[:8]] == ['v2c', 'v2x'] * 4
    v2c = 'v2c_sgd_ls_aug1_norm1_0907_class_efficientnet_b7_gem_fc_arcface2_1head_i448'
    assert runs[1].model_file == f'/results/models/{v2c}/6.70.pth'
    assert all(r.pretrained == 'imagenet' and r.distributed == 1 and r.gpu_id == '0,1,2,3' for r in runs[:8])
    ends = {r.out_dir: r.epochs for r in runs if r.out_dir.endswith('_i736')}
    assert sorted(ends.values()) == [17.9, 19.3, 21.7, 26.8], ends          # config/en_config.py's predict_epoch

def test_cli_errors(demo, tmp_path, capsys):
    "A reference command with a missing --model_file, bad names: one line and exit code 2"
    from glr_nb.train import glr_train
    seed_flags = ['--arch', 'class_efficientnet_b7_gem_fc_arcface2_1head', '--save_every_epoch', '0.1', '--epochs', '7',
                  '--img_size', '448', '--eval_img_size', '512', '--scheduler', 'SGD', '--out_dir', 'x', '--loss',
                  'LabelSmoothingLossV1', '--aug_version', '1', '--split_type', 'v2c', '--num_classes', '81313',
                  '--gpu_id', '0', '--batch_size', '4', '--distributed', '1', '--preprocessing', '1',
                  '--model_file', str(tmp_path/'none.pth'), '--data_dir', str(demo), '--result_dir', str(tmp_path)]
    def _exit(argv):
        try:
            glr_train(argv)
            code = 0
        except SystemExit as e: code = e.code
        return code, capsys.readouterr().err
    code, err = _exit(seed_flags)
    assert code == 2 and 'none.pth: checkpoint not found' in err, err
    for bad, want in ((['--arch', 'nope'], 'unknown architecture'), (['--split_type', 'v9'], 'split file not found'),
                      (['--scheduler', 'adam'], 'unknown scheduler'), (['--select_by', 'mAP'], '--select_by')):
        code, err = _exit(['--data-dir', str(demo), '--result-dir', str(tmp_path), '--pretrained', 'none', *bad])
        assert code == 2 and want in err.strip().splitlines()[-1], err

def test_offline_default_weights(demo, tmp_path):
    "The README command offline (empty cache, no hub): exit 2, one line naming weights and ways out; nothing written"
    env = {k: v for k, v in ENV.items() if k != 'PYTHONWARNINGS'}          # warnings would be lines on stderr too
    env |= {'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': str(tmp_path/'hf')}
    argv = ['--data_dir', str(demo), '--result_dir', str(tmp_path), '--out_dir', 'b7']
    r = subprocess.run([PY, '-m', 'glr_nb.train', *argv], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for s in ('tf_efficientnet_b7.aa_in1k', '--pretrained PATH', '--pretrained none'): assert s in r.stderr, r.stderr
    assert not (tmp_path/'models'/'b7').exists()

def test_python_m_entry_point(tmp_path):
    "`python -m glr_nb.train --help` reaches the script (the __main__ guard fires outside notebooks)"
    r = subprocess.run([PY, '-m', 'glr_nb.train', '--help'], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and all(f in r.stdout for f in ('--save_every_epoch', '--model_file', '--overwrite'))
