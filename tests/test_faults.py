"""Fault injection: every refusal is one stderr line with exit 2 (130 for Ctrl-C), and nothing a user already has is
destroyed. Out-of-range numbers through the real console scripts, crafted checkpoints at every place one is loaded,
missing and unreadable images in training, a full disk and read-only folders (a patched writer; a real small tmpfs
where this process may mount one), wrong-kind paths, Ctrl-C, umask, EXIF and 16-bit photographs, and killed builds."""
import os, io, json, errno, shutil, contextlib, subprocess
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image
import glr_nb.core as core
from glr_nb.data import glr_split, make_demo_dataset, make_splits
from glr_nb.train import glr_train, run_complete
from glr_nb.submit import glr_extract
from glr_nb.submit import glr_submit
from glr_nb.metrics import glr_score
from glr_nb.bench import glr_bench
from glr_nb.demo import glr_demo

SMALL = dict(n_landmarks=6, n_big=1, big_images=(205, 205), small_images=(3, 6), n_other=3, n_test=12, n_2019=10,
             n_index=8)
TRAIN = ['--arch', 'test_resnet', '--pretrained', 'none', '--epochs', '1', '--img_size', '32', '--eval_img_size', '32',
         '--batch_size', '32', '--save_every_epoch', '1', '--workers', '0', '--max_valid', '20', '--select_by', 'gap',
         '--quiet']

@pytest.fixture(autouse=True)
def fresh_loggers():
    "Our loggers start each test without handlers (a stream handler would keep an earlier test's captured stderr)"
    import logging
    yield
    for name in [n for n in logging.root.manager.loggerDict if n.startswith('glr')]:
        for h in logging.getLogger(name).handlers[:]:
            logging.getLogger(name).removeHandler(h)
            h.close()

def refusal(f, argv, capsys):
    "(exit code, stderr lines) of console script `f` run with `argv` in this process"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e: f([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err.strip().splitlines()

def one_line(f, argv, capsys, code=2):
    "The single error line of a refusal with exit `code` (log lines before it are allowed, a traceback is not)"
    c, lines = refusal(f, argv, capsys)
    errs = [l for l in lines if l.startswith(f'{f.__name__}: ')]
    assert (c, len(errs)) == (code, 1) and not any('Traceback' in l for l in lines), (c, lines)
    return errs[0]

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "A small demo dataset with its splits (about 200 training images); tests copy it before damaging it"
    d = tmp_path_factory.mktemp('faults')/'data'
    make_demo_dataset(d, seed=0, **SMALL)
    make_splits(d, n_valid=20, valid_num=20, n_gallery=4)
    return d

@pytest.fixture
def own_data(data, tmp_path):
    "A private copy of `data` to damage"
    return Path(shutil.copytree(data, tmp_path/'data'))

# ---------------------------------------------------------------- numbers and names that cannot be right
NUMBERS = [
    (glr_train, ['--lr', 'nan'], 'lr = nan is not a finite number: allowed >0'),
    (glr_train, ['--lr', '0'], 'lr = 0.0 is out of range: allowed >0'),
    (glr_train, ['--lr', '-0.1'], 'allowed >0'),
    (glr_train, ['--batch_size', '0'], 'batch_size = 0 is out of range: allowed >=1'),
    (glr_train, ['--img_size', '0'], 'img_size = 0 is out of range: allowed >=16'),
    (glr_train, ['--workers', '-1'], 'workers = -1 is out of range: allowed >=0'),
    (glr_train, ['--accum', '0'], 'accum = 0 is out of range: allowed >=1'),
    (glr_train, ['--save_every_epoch', '0'], 'save_every_epoch = 0.0 is out of range: allowed 0<..1'),
    (glr_train, ['--epochs', '-1'], 'epochs = -1.0 is out of range: allowed >0'),
    (glr_train, ['--max_bad_frac', '1.5'], 'max_bad_frac = 1.5 is out of range: allowed 0..1'),
    (glr_train, ['--momentum', 'inf'], 'momentum = inf is not a finite number: allowed 0..1'),
    (glr_extract, ['--img_size', '0'], 'img_size = 0 is out of range: allowed >=16'),
    (glr_extract, ['--bs', '0'], 'bs = 0 is out of range: allowed >=1'),
    (glr_extract, ['--num_workers', '-2'], 'num_workers = -2 is out of range: allowed >=0'),
    (glr_extract, ['--device', 'tpu'], "unknown device 'tpu'"),
    (glr_submit, ['--k', '0'], 'k = 0 is out of range: allowed >=1'),
    (glr_submit, ['--top_k', '0'], 'top_k = 0 is out of range: allowed >=1'),
    (glr_submit, ['--workers', '-1'], 'workers = -1 is out of range: allowed >=0'),
    (glr_submit, ['--bs', '-4'], 'bs = -4 is out of range: allowed >=1'),
    (glr_submit, ['--device', 'gpu0'], "unknown device 'gpu0'"),
    (glr_submit, ['--checkpoints', 'm1=a.pth:0'], 'weight 0.0 is out of range: allowed >0'),
    (glr_submit, ['--checkpoints', 'm1=a.pth:1,m2=b.pth:-0.5'], 'm2: weight -0.5 is out of range: allowed >0'),
    (glr_submit, ['--checkpoints', 'm1=a.pth', '--ransac', 'lmeds'], "--ransac 'lmeds': use one of degensac"),
    (glr_submit, ['--checkpoints', 'm1=a.pth', '--matcher', 'orb'],
     "--matcher 'orb': use auto, lightglue, xfeat, superglue, sift"),
    (glr_split, ['--valid_num', '0'], 'valid_num = 0 is out of range: allowed >=1'),
    (glr_split, ['--n_valid', '-3'], 'n_valid = -3 is out of range: allowed >=1'),
    (glr_bench, ['knn', '--n', '0'], 'n = 0 is out of range: allowed >=1'),
    (glr_bench, ['extract', '--img', '4'], 'img = 4 is out of range: allowed >=16'),
    (glr_demo, ['--epochs', '0'], 'epochs = 0 is out of range: allowed >0'),
]

@pytest.mark.parametrize('f,argv,msg', NUMBERS, ids=[f"{f.__name__}{' '.join(a)}" for f, a, _ in NUMBERS])
def test_numbers_refused_where_they_enter(f, argv, msg, capsys):
    "Out-of-range, non-finite or unknown values stop the console script at once: one line naming the allowed range"
    assert msg in one_line(f, argv, capsys)

@pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is there')
@pytest.mark.parametrize('f', [glr_extract, glr_submit, glr_bench])
def test_cuda_without_gpu(f, capsys):
    "--device cuda on a machine without a GPU is refused before any work"
    assert '0 CUDA GPU(s) visible' in one_line(f, ['--device', 'cuda'], capsys)

def test_papermill_parameters_checked():
    "The settings a papermill notebook builds are checked by the same table as the flags"
    from glr_nb.train import TrainSettings
    from glr_nb.submit import SubmitSettings
    with pytest.raises(core.GLRError, match='lr = nan is not a finite number: allowed >0'):
        TrainSettings(lr=float('nan'))
    with pytest.raises(core.GLRError, match='top_k = 0 is out of range'): SubmitSettings.of(dict(top_k=0))
    with pytest.raises(core.GLRError, match="unknown setting"): SubmitSettings.of(dict(topk=3))

def test_usage_the_solution_lacks(tmp_path, capsys):
    "glr_score --usage with a value the solution does not contain is refused (it would score nothing)"
    s, p = tmp_path/'sol.csv', tmp_path/'sub.csv'
    s.write_text('id,landmarks,Usage\n000000000000000a,1,Public\n000000000000000b,,Private\n')
    p.write_text('id,landmarks\n000000000000000a,1 0.5\n')
    line = one_line(glr_score, ['--submission', p, '--solution', s, '--usage', 'public'], capsys)
    assert "--usage 'public'" in line and 'Private, Public' in line, line

def test_num_classes_below_the_labels(data, tmp_path, capsys):
    "--num_classes smaller than the split's classes is refused before training"
    line = one_line(glr_train, ['--data-dir', data, '--result-dir', tmp_path, '--out_dir', 'r', *TRAIN,
                                '--num_classes', '2'], capsys)
    assert '--num_classes 2 is smaller than the split' in line, line

# ---------------------------------------------------------------- crafted checkpoints
def _craft(path, kind):
    "Write a checkpoint that is wrong in one way"
    from glr_nb.models import create_model
    if kind == 'zero-byte': return path.write_bytes(b'')
    if kind == 'tensor-only': return torch.save(torch.zeros(3), path)
    if kind == 'list-shaped': return torch.save([torch.zeros(3)], path)
    net = create_model('test_efficientnet', 4, pretrained=None)
    ck = dict(state_dict=net.state_dict(), arch='test_resnet', num_classes=4, epoch=1.)   # weights of another arch
    if kind == 'epoch-less': ck = dict(state_dict=net.state_dict())
    torch.save(ck, path)

CRAFTED = {'zero-byte': 'cannot load as a weights-only checkpoint', 'tensor-only': 'holds a Tensor, not a checkpoint',
           'list-shaped': 'holds a list, not a checkpoint', 'epoch-less': 'not a glr_nb checkpoint (no',
           'wrong-arch': 'weights do not fit test_resnet'}

@pytest.mark.parametrize('kind', list(CRAFTED))
@pytest.mark.parametrize('where', ['train --resume', 'train --model_file', 'extract', 'submit'])
def test_crafted_checkpoints(kind, where, data, tmp_path, capsys):
    "Every place a checkpoint is loaded refuses a damaged or foreign one in one line naming the file"
    ck = tmp_path/f'{kind}.pth'
    _craft(ck, kind)
    common = ['--data-dir', data, '--result-dir', tmp_path/'res']
    if where.startswith('train'):
        line = one_line(glr_train, [*common, '--out_dir', 'r', *TRAIN, where.split()[1], ck], capsys)
    elif where == 'extract':
        line = one_line(glr_extract, [*common, '--checkpoint', ck, '--img_size', 32, '--num_workers', 0], capsys)
    else:
        line = one_line(glr_submit, [*common, '--checkpoints', f'm1={ck}', '--img_size', 32, '--workers', 0,
                                     '--no-rerank', '--no-stacking', '--device', 'cpu'], capsys)
    msg = CRAFTED[kind]
    if kind == 'epoch-less' and where in ('extract', 'submit'): msg = 'not a glr_nb checkpoint (no arch, num_classes)'
    if kind == 'epoch-less' and where == 'train --model_file': msg = CRAFTED['wrong-arch']   # weights alone are fine
    assert str(ck) in line and msg in line, line

# ---------------------------------------------------------------- missing and unreadable images, NaN loss
def _train_images(d):
    from glr_nb.data import image_paths
    import pandas as pd
    tr = pd.read_csv(d/'split'/'v2c'/'random_train_cv0.csv', dtype={'id': str})
    return [Path(p) for p in image_paths(d/'images'/'train', tr.id)]

def test_all_images_missing_refused(own_data, tmp_path, capsys):
    "A data folder whose images are all gone stops training with the count and three example paths"
    shutil.rmtree(own_data/'images'/'train')
    line = one_line(glr_train, ['--data-dir', own_data, '--result-dir', tmp_path, '--out_dir', 'r', *TRAIN], capsys)
    n = len(_train_images(own_data))
    assert f'{n} of {n} images missing or empty (100.0%, more than max_bad_frac 1.0%)' in line, line
    assert line.count(str(own_data/'images'/'train')) == 3 and 'raise --max_bad_frac' in line, line
    assert not (tmp_path/'models'/'r'/'final.pth').exists()

def test_unreadable_images_stop_training(own_data, tmp_path, capsys):
    "Images that are there but cannot be decoded stop the run once they pass the share"
    for p in _train_images(own_data)[::3]: p.write_bytes(b'not a jpeg')
    line = one_line(glr_train, ['--data-dir', own_data, '--result-dir', tmp_path, '--out_dir', 'r', *TRAIN], capsys)
    assert 'training images missing or unreadable' in line and 'more than max_bad_frac 1.0%' in line, line
    assert not run_complete(tmp_path/'models'/'r')

def test_few_bad_images_left_out_and_reported(own_data, tmp_path):
    "Below the share the run finishes; the missing and the unreadable are counted in train.log and run.json"
    ps = _train_images(own_data)
    ps[0].unlink()
    ps[1].write_bytes(b'')
    ps[2].write_bytes(ps[2].read_bytes()[:200])                    # a cut JPEG: there, but not decodable
    assert glr_train([str(a) for a in ['--data-dir', own_data, '--result-dir', tmp_path, '--out_dir', 'r', *TRAIN,
                                       '--max_bad_frac', '0.05']]) is None
    out = tmp_path/'models'/'r'
    assert run_complete(out)
    assert json.loads((out/'run.json').read_text())['bad_images'] == 3
    log = (out/'train.log').read_text()
    assert '2 training image(s) missing or empty: left out' in log, log
    assert '3 training image(s) missing or unreadable' in log and str(ps[2]) in log, log

def test_nan_loss_stops_without_final(data, tmp_path, capsys):
    "A learning rate that makes the loss NaN stops the run with one line; the run is not marked complete"
    line = one_line(glr_train, ['--data-dir', data, '--result-dir', tmp_path, '--out_dir', 'r', *TRAIN,
                                '--lr', '1e30', '--save_every_epoch', '0.5'], capsys)
    assert 'training loss is not finite' in line, line
    assert not run_complete(tmp_path/'models'/'r')

# ---------------------------------------------------------------- full disk, read-only folders, wrong-kind paths
def _failing_fsync(code):
    def fsync(fd): raise OSError(code, os.strerror(code))
    return fsync

@pytest.mark.parametrize('code,fix', [(errno.ENOSPC, 'no space left on the device'),
                                      (errno.EROFS, 'read-only file system'), (errno.EACCES, 'permission denied')])
def test_split_write_fails_whole(code, fix, own_data, monkeypatch, capsys):
    "A write that fails (disk full, read-only, no permission) is one line naming the file; the old split is intact"
    before = {p.relative_to(own_data): p.read_bytes() for p in (own_data/'split').rglob('*') if p.is_file()}
    monkeypatch.setattr(core.os, 'fsync', _failing_fsync(code))
    line = one_line(glr_split, ['--data-dir', own_data, '--seed', 1, '--n_valid', 20, '--valid_num', 20,
                                '--n_gallery', 4], capsys)
    assert fix in line and str(own_data) in line, line
    after = {p.relative_to(own_data): p.read_bytes() for p in (own_data/'split').rglob('*') if p.is_file()}
    assert after == before
    assert not [p for p in own_data.iterdir() if p.name.endswith('.tmp')]

def test_checkpoint_write_full_disk(tmp_path, monkeypatch):
    "torch.save on a full disk surfaces as ENOSPC naming the checkpoint, and no partial file is left"
    monkeypatch.setattr(core.os, 'fsync', _failing_fsync(errno.ENOSPC))
    with pytest.raises(OSError) as e: core.save_checkpoint(dict(epoch=1.), tmp_path/'1.00.pth')
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path/'1.00.pth')
    assert list(tmp_path.iterdir()) == []

def test_reserve_refuses_more_than_free(tmp_path):
    "reserve() raises ENOSPC before a memory map is made, instead of a SIGBUS when it is written"
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(OSError) as e: core.reserve(tmp_path/'big.npy', free + (1 << 30))
    assert e.value.errno == errno.ENOSPC and str(tmp_path/'big.npy') in str(e.value)

@contextlib.contextmanager
def tmpfs(path, size='1m', ro=False):
    "A real tmpfs at `path` (skips the test where this process may not mount one)"
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', f"size={size}{',ro' if ro else ''}", 'tmpfs', str(path)],
                       capture_output=True)
    if r.returncode: pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try: yield path
    finally: subprocess.run(['umount', '-l', str(path)], capture_output=True)

def test_real_full_disk_and_read_only(data, tmp_path, capsys):
    "On a real 1 MiB tmpfs a split does not fit: one line, nothing left; on a read-only one the same"
    raw = data/'raw'
    with tmpfs(tmp_path/'small') as d:
        shutil.copytree(raw, d/'raw', ignore=shutil.ignore_patterns('train.csv', 'index.csv'))
        shutil.copy(raw/'train.csv', d/'raw'/'train.csv')
        with open(d/'pad', 'wb', buffering=0) as f, contextlib.suppress(OSError):
            while True: f.write(b'\0' * 4096)                         # fill the disk, then free 16 KiB of it
        os.truncate(d/'pad', (d/'pad').stat().st_size - 16384)
        line = one_line(glr_split, ['--data-dir', d, '--n_valid', 20, '--valid_num', 20, '--n_gallery', 4], capsys)
        assert 'no space left on the device' in line, line
        assert sorted(p.name for p in d.iterdir()) == ['pad', 'raw']
    with tmpfs(tmp_path/'ro', ro=True) as d:
        line = one_line(glr_bench, ['knn', '--n', 10, '--out', d/'b.jsonl'], capsys)
        assert 'read-only file system' in line and str(d) in line, line

def test_wrong_kind_paths(tmp_path, capsys):
    "A file where a folder is needed, or a folder where a file is needed: one line naming the path"
    f = tmp_path/'afile'
    f.write_text('x')
    assert 'is a file, not a folder' in one_line(glr_train, ['--result-dir', f, *TRAIN], capsys)
    assert f"{tmp_path}: is a folder; pass a file name" in one_line(glr_bench, ['knn', '--n', 10, '--out', tmp_path],
                                                                   capsys)
    assert f"{tmp_path}: is a folder where a CSV file is needed" in one_line(
        glr_score, ['--submission', tmp_path, '--solution', f], capsys)
    line = one_line(glr_demo, ['--out', f/'sub'], capsys)
    assert 'a file is in the way where a folder is needed' in line and str(f) in line, line

# ---------------------------------------------------------------- Ctrl-C, umask, killed builds
def test_ctrl_c_exit_130_partial_files_removed(own_data, monkeypatch, capsys):
    "Ctrl-C in the middle of writing a split: one line, exit 130, no temporary file or folder left, old split kept"
    import pandas as pd
    before = (own_data/'split'/'split.json').read_bytes()
    calls, to_csv = [], pd.DataFrame.to_csv
    def cut(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3: raise KeyboardInterrupt
        return to_csv(self, *a, **kw)
    monkeypatch.setattr(pd.DataFrame, 'to_csv', cut)
    line = one_line(glr_split, ['--data-dir', own_data, '--seed', 2, '--n_valid', 20, '--valid_num', 20,
                                '--n_gallery', 4], capsys, code=130)
    assert 'interrupted; finished work is kept, partial files removed' in line, line
    assert (own_data/'split'/'split.json').read_bytes() == before
    assert not [p for p in own_data.rglob('*') if p.name.endswith('.tmp')]

def test_written_files_keep_the_umask(tmp_path):
    "Atomic writes give files the mode the user's umask allows (not mkstemp's 0600)"
    old = os.umask(0o027)
    try:
        core.save_json({}, tmp_path/'a.json')
        with core.atomic_dir(tmp_path/'d') as t: (t/'x').write_text('1')
    finally: os.umask(old)
    assert (tmp_path/'a.json').stat().st_mode & 0o777 == 0o640
    assert (tmp_path/'d').stat().st_mode & 0o777 == 0o750

def test_killed_demo_build_is_rebuilt(tmp_path, monkeypatch):
    "A demo build killed midway leaves nothing; glr_demo's data step rebuilds it, then reuses the finished one"
    import glr_nb.demo_data as dd
    from glr_nb.demo import demo_data
    calls, jpeg = [], dd.jpeg_bytes
    def cut(*a, **kw):
        calls.append(1)
        if len(calls) == 5: raise KeyboardInterrupt
        return jpeg(*a, **kw)
    monkeypatch.setattr(dd, 'jpeg_bytes', cut)
    with pytest.raises(KeyboardInterrupt): demo_data(tmp_path/'data', 0, SMALL, 20, 4)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(dd, 'jpeg_bytes', jpeg)
    d = demo_data(tmp_path/'data', 0, SMALL, 20, 4)
    stamp = (d/'demo_meta.json').stat().st_mtime_ns, (d/'split'/'split.json').stat().st_mtime_ns
    demo_data(tmp_path/'data', 0, SMALL, 20, 4)
    assert ((d/'demo_meta.json').stat().st_mtime_ns, (d/'split'/'split.json').stat().st_mtime_ns) == stamp
    demo_data(tmp_path/'data', 1, SMALL, 20, 4)                     # another seed: rebuilt, not reused
    assert json.loads((d/'demo_meta.json').read_text())['seed'] == 1

# ---------------------------------------------------------------- photographs: EXIF orientation and 16 bits
def test_exif_and_16_bit_photographs(tmp_path):
    "Training/extraction (PIL) and matching (OpenCV) see a sideways-stored photo upright; 16-bit is scaled, not clipped"
    import cv2, skimage.data
    from glr_nb.images import load_image
    from glr_nb.rerank import load_gray
    photo = skimage.data.coffee()                                  # 400 x 600
    exif = Image.Exif()
    exif[0x0112] = 8                                               # orientation 8: turn 90 degrees anticlockwise
    Image.fromarray(photo).transpose(Image.Transpose.ROTATE_270).save(tmp_path/'s.jpg', exif=exif, quality=95)
    up = np.asarray(load_image(tmp_path/'s.jpg'), np.float32)
    assert up.shape == photo.shape and np.abs(up - photo).mean() < 4
    g, _ = load_gray(tmp_path/'s.jpg', None)
    assert g.shape == photo.shape[:2]
    assert np.abs(g.astype(np.float32) - cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)).mean() < 4
    import matplotlib
    matplotlib.use('Agg')
    from glr_nb.rerank import draw_matches                         # the picture under the drawn matches is upright too
    assert draw_matches(tmp_path/'s.jpg', photo, np.zeros((2, 2)), np.zeros((2, 2))).get_images()[0].get_array().shape \
        == (400, 1200, 3)
    cam = skimage.data.camera()
    cv2.imwrite(str(tmp_path/'c16.png'), cam.astype(np.uint16) * 257)
    assert (np.asarray(load_image(tmp_path/'c16.png'))[..., 0] == cam).all()
    assert np.abs(load_gray(tmp_path/'c16.png', None)[0].astype(int) - cam).max() <= 1

# ---------------------------------------------------------------- errors name the right file and line
def test_bad_id_in_a_split_file_names_it(own_data, tmp_path, capsys):
    "A damaged id in a split file is reported with that file and its line, by training and by extraction alike"
    f = own_data/'split'/'v2c'/'random_train_cv0.csv'
    lines = f.read_text().splitlines()
    lines[5] = 'NOT-AN-ID' + lines[5][16:]
    f.write_text('\n'.join(lines) + '\n')
    line = one_line(glr_train, ['--data-dir', own_data, '--result-dir', tmp_path, '--out_dir', 'r', *TRAIN], capsys)
    assert f"{f}: line 6: invalid image id 'NOT-AN-ID'" in line, line
    g = own_data/'split'/'train2020.csv'
    g.write_text(g.read_text().replace(g.read_text().splitlines()[3][:16], 'deadbeef', 1))
    line = one_line(glr_extract, ['--data-dir', own_data, '--result-dir', tmp_path, '--checkpoint', 'x.pth',
                                  '--images', 'index'], capsys)
    assert f"{g}: line 4: invalid image id 'deadbeef'" in line, line
