"""Fault injection, round 3 (issue 23): two processes on one folder, identities that must not go stale, parts that
do not belong together, empty and degenerate inputs, the user's own files, and papermill's parameters. Every
refusal is one stderr line with exit 2; nothing a user already has is destroyed."""
import os, sys, json, shutil, subprocess
from pathlib import Path
import pytest
import glr_nb.core as core
from glr_nb.train import glr_train
from glr_nb.submit import glr_extract, glr_submit
from glr_nb.predict import glr_index
from glr_nb.demo import glr_demo
from test_faults import SMALL, TRAIN, refusal, one_line
import test_faults as _tf

fresh_loggers, data, own_data = _tf.fresh_loggers, _tf.data, _tf.own_data   # the same fixtures

# ---------------------------------------------------------------- 1. one writer per folder
@pytest.fixture
def holder(tmp_path):
    "`hold(folder)`: another process that holds the folder's lock until the test ends; returns its pid"
    procs = []
    def hold(folder):
        code = (f"import glr_nb.core as c, time\nwith c.folder_lock({str(folder)!r}):\n"
                "    print('held', flush=True)\n    time.sleep(120)")
        env = dict(os.environ, GLR_LOCKS='', PYTHONPATH=os.pathsep.join(sys.path))
        p = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True, env=env)
        procs.append(p)
        assert p.stdout.readline().strip() == 'held'
        return p.pid
    yield hold
    for p in procs:
        p.kill()
        p.wait()

def test_a_held_folder_is_refused_by_every_writer(data, tmp_path, holder, capsys):
    "glr_train, glr_index, glr_submit, glr_extract and glr_demo refuse a folder another process holds, naming its pid"
    rd = tmp_path/'res'
    cases = [(glr_train, rd/'models'/'r', ['--data-dir', data, '--result-dir', rd, '--out_dir', 'r', *TRAIN]),
             (glr_index, tmp_path/'ix', ['build', '--out', tmp_path/'ix', '--checkpoints', 'm=x.pth']),
             (glr_submit, tmp_path/'sub', ['--data_dir', data, '--result_dir', rd, '--out_dir', tmp_path/'sub',
                                           '--checkpoints', 'm=x.pth']),
             (glr_extract, rd/'features', ['--data-dir', data, '--result-dir', rd, '--checkpoint', 'x.pth']),
             (glr_demo, tmp_path/'demo', ['--out', tmp_path/'demo'])]
    for f, folder, argv in cases:
        pid = holder(folder)
        line = one_line(f, argv, capsys)
        assert f'in use by another process (pid {pid})' in line and str(folder) in line, (f.__name__, line)
    assert not (rd/'models'/'r').exists() and not (tmp_path/'ix').exists() and not (tmp_path/'sub').exists()

def test_lock_is_dropped_when_its_holder_is_killed(tmp_path, holder):
    "kill -9 of the holder frees the folder at once (flock), and the next writer's pid is in the lock file"
    pid = holder(tmp_path/'run')
    with pytest.raises(core.GLRError, match=f'pid {pid}'):
        with core.folder_lock(tmp_path/'run'): pass
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    with core.folder_lock(tmp_path/'run') as lf: assert lf.read_text().strip() == str(os.getpid())
    assert not lf.exists() and 'GLR_LOCKS' in os.environ and str(lf) not in os.environ['GLR_LOCKS']

# ---------------------------------------------------------------- 5. the user's own files
def _mine(d):
    d.mkdir(parents=True)
    (d/'notes.txt').write_text('mine')
    (d/'photo.jpg').write_bytes(b'\xff\xd8 not ours')
    return d

def test_index_build_keeps_the_users_files(tmp_path, capsys):
    "glr_index build --out on a folder of the user's files is refused (rc 2), --overwrite moves it aside whole"
    d = _mine(tmp_path/'ix')
    line = one_line(glr_index, ['build', '--out', d, '--checkpoints', 'm=missing.pth'], capsys)
    assert 'holds files glr_nb did not write (notes.txt, photo.jpg)' in line and '--overwrite' in line, line
    assert sorted(p.name for p in d.iterdir()) == ['notes.txt', 'photo.jpg']
    one_line(glr_index, ['build', '--out', d, '--checkpoints', 'm=missing.pth', '--overwrite'], capsys)
    old = list(tmp_path.glob('ix.old-*'))
    assert len(old) == 1 and (old[0]/'notes.txt').read_text() == 'mine'

def test_train_and_submit_keep_the_users_files(data, tmp_path, capsys):
    "A run folder or a submission folder that holds the user's files is refused; nothing in it changes"
    rd = tmp_path/'res'
    run = _mine(rd/'models'/'r')
    line = one_line(glr_train, ['--data-dir', data, '--result-dir', rd, '--out_dir', 'r', *TRAIN], capsys)
    assert 'holds files glr_nb did not write (notes.txt' in line and '--overwrite' in line, line
    sub = _mine(tmp_path/'sub')
    line = one_line(glr_submit, ['--data_dir', data, '--result_dir', rd, '--out_dir', sub, '--checkpoints', 'm=x.pth'],
                    capsys)
    assert 'holds files glr_nb did not write (notes.txt' in line and 'a new or empty folder' in line, line
    for d in (run, sub): assert sorted(p.name for p in d.iterdir()) == ['notes.txt', 'photo.jpg']

# ---------------------------------------------------------------- 4. empty and degenerate inputs
def _rewrite(f, keep=None, edit=None):
    "Keep the header and data lines `keep` (a slice) of CSV `f`, then apply `edit(lines)`"
    lines = f.read_text().splitlines()
    lines = lines[:1] + (lines[1:][keep] if keep is not None else lines[1:])
    if edit: edit(lines)
    f.write_text('\n'.join(lines) + '\n')

def _label(i, v):
    def edit(lines):
        parts = lines[i].split(',')
        parts[1] = v
        lines[i] = ','.join(parts)
    return edit

SPLIT = 'split/v2c/random_{}_cv0.csv'
DEGENERATE = [('train', slice(0, 0), None, 'random_train_cv0.csv: 0 data rows (header only), 1 needed'),
              ('valid', slice(0, 0), None, 'random_valid_cv0.csv: 0 data rows (header only)'),
              ('train', None, _label(4, 'cathedral'), "line 5: landmark_id 'cathedral' is not an integer label"),
              ('train', None, _label(2, str(2**63)), f"line 3: landmark_id '{2**63}' is not an integer label"),
              ('valid', None, _label(1, '2.5'), "line 2: landmark_id '2.5' is not an integer label"),
              ('train', slice(0, 3), None, '3 usable training image(s), fewer than one step of --batch_size 32')]

@pytest.mark.parametrize('which,keep,edit,msg', DEGENERATE)
def test_degenerate_split_files_in_training(which, keep, edit, msg, own_data, tmp_path, capsys):
    "A header-only, non-numeric, past-int64 or too-small split is one line naming the file, line and fix"
    f = own_data/SPLIT.format(which)
    _rewrite(f, keep, edit)
    line = one_line(glr_train, ['--data-dir', own_data, '--result-dir', tmp_path, '--out_dir', 'r', *TRAIN], capsys)
    assert msg in line and (str(f) in line or 'usable' in msg), line
    assert 'glr_split' in line or 'batch_size' in line, line

def test_batch_size_one_refused_with_the_fix(data, tmp_path, capsys):
    "--batch_size 1 would end in BatchNorm's traceback: one line with the fix, before anything is written"
    argv = ['--data-dir', data, '--result-dir', tmp_path, '--out_dir', 'r', *TRAIN, '--batch_size', '1']
    assert 'use --batch_size 2 or more' in one_line(glr_train, argv, capsys)
    assert not (tmp_path/'models'/'r').exists()

def test_empty_image_sets_in_extraction_and_submission(own_data, tmp_path, capsys):
    "A header-only test.csv or gallery is refused by glr_extract / glr_submit in one line naming it"
    _rewrite(own_data/'raw'/'test.csv', slice(0, 0))
    line = one_line(glr_extract, ['--data-dir', own_data, '--result-dir', tmp_path, '--checkpoint', 'x.pth'], capsys)
    assert f"{own_data/'raw'/'test.csv'}: 0 data rows (header only)" in line, line
    line = one_line(glr_submit, ['--data_dir', own_data, '--result_dir', tmp_path, '--checkpoints', 'm=x.pth'], capsys)
    assert 'test.csv: 0 data rows' in line, line

def test_degenerate_solutions_and_submissions(tmp_path, capsys):
    "glr_score: a landmark id past int64, a header-only or all-Ignored solution: one line each, never GAP 0"
    from glr_nb.metrics import glr_score
    a, b = '000000000000000a', '000000000000000b'
    sol, sub = tmp_path/'sol.csv', tmp_path/'sub.csv'
    sub.write_text(f'id,landmarks\n{a},1 0.5\n{b},{10**20} 0.9\n')
    sol.write_text(f'id,landmarks,Usage\n{a},1,Public\n{b},2,Private\n')
    assert f"sub.csv: line 3: landmarks '{10**20} 0.9' is not" in one_line(glr_score, ['--submission', sub,
                                                                                      '--solution', sol], capsys)
    sub.write_text(f'id,landmarks\n{a},1 0.5\n')
    for text in ('id,landmarks,Usage\n', f'id,landmarks,Usage\n{a},1,Ignored\n{b},,Public\n'):
        sol.write_text(text)
        line = one_line(glr_score, ['--submission', sub, '--solution', sol], capsys)
        assert 'no landmark queries to score' in line or 'not in' in line, line
    sol.write_text(f'id,landmarks,Usage\n{a},{2**64},Public\n')
    assert f"line 2: landmark '{2**64}' is not an integer id" in one_line(glr_score, ['--submission', sub,
                                                                                     '--solution', sol], capsys)

# ---------------------------------------------------------------- 6. papermill
NBS = Path(__file__).resolve().parents[1]/'nbs'

@pytest.mark.parametrize('nb,argv,msg', [
    ('90_train.ipynb', ['-p', 'epoch', '0.1', '-p', 'gpu', '1'],
     "unknown parameter(s) 'epoch' (did you mean 'epochs'?), 'gpu' (did you mean 'gpus'?)"),
    ('91_submit.ipynb', ['-p', 'stackers', 'x', '-p', 'rerank', 'False'],
     "unknown parameter(s) 'stackers' (did you mean 'stacker'?)")])
def test_papermill_refuses_unknown_parameters(nb, argv, msg, tmp_path):
    "A misspelt -p name stops the notebook in the cell after the parameters; the terminal ends with the line"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, '-m', 'papermill', str(NBS/nb), str(tmp_path/'out.ipynb'), *argv],
                       capture_output=True, text=True, env=env, timeout=600)
    last = [l for l in r.stderr.splitlines() if l.strip()][-1]
    assert r.returncode != 0 and last.startswith('GLRError: ') and msg in last, r.stderr[-2000:]
    assert "'rerank'" not in last, last                           # a valid name is not flagged

def test_script_exit_carries_its_line(data, tmp_path, capsys):
    "A console script called in a notebook exits with code 2 and an exception whose text is the one line"
    with pytest.raises(SystemExit) as e:
        glr_train(['--data-dir', str(data), '--result-dir', str(tmp_path), '--lr', 'nan', *TRAIN])
    assert e.value.code == 2 and str(e.value) == 'glr_train: error: --lr = nan is not a finite number: allowed >0'
    with pytest.raises(SystemExit) as e: glr_train(['--no-such-flag'])
    assert e.value.code == 2 and 'unrecognized arguments: --no-such-flag' in str(e.value)

# ---------------------------------------------------------------- 2. identities that cannot go stale
def _checkpoint(path):
    "A valid tiny glr_nb checkpoint"
    import torch
    from glr_nb.models import create_model
    net = create_model('test_resnet', 4, pretrained=None)
    torch.save(dict(state_dict=net.state_dict(), arch='test_resnet', num_classes=4, epoch=1.), path)
    return path

def test_touched_image_is_not_served_from_the_cache(own_data, tmp_path, capsys):
    "A test image changed in place with its size and mtime kept (touch -r) makes its cache chunk stale"
    from glr_nb.retrieval import image_set, checkpoint_key, load_embeddings, file_stamps
    ck = _checkpoint(tmp_path/'m.pth')
    argv = ['--data-dir', own_data, '--result-dir', tmp_path/'res', '--checkpoint', ck, '--img_size', 32,
            '--num_workers', 0, '--device', 'cpu', '--chunk', 4]
    assert glr_extract([str(a) for a in argv]) is None
    df = image_set(own_data, 'test')
    key, paths = checkpoint_key(ck, 32), df['path'].tolist()
    cache = next((tmp_path/'res'/'features').glob('*/test.npy'))
    assert load_embeddings(cache, key, df['id'].tolist(), stamps=file_stamps(paths)) is not None
    f = Path(paths[5])
    st, b = f.stat(), bytearray(f.read_bytes())
    i = (len(b) - 4096) * 3 // 7 + 100                          # inside one of the sampled blocks, mid-file
    b[i] ^= 0xff
    f.write_bytes(bytes(b))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert load_embeddings(cache, key, df['id'].tolist(), missing_ok=True, stamps=file_stamps(paths)) is None

def test_finished_run_with_other_settings_is_refused_and_a_noop_resume_rewrites_nothing(data, tmp_path, capsys):
    "--resume on a run made with another seed or image size is one line; the same settings rewrite nothing"
    argv = ['--data-dir', data, '--result-dir', tmp_path, '--out_dir', 'r', *TRAIN]
    assert glr_train([str(a) for a in argv]) is None
    out = tmp_path/'models'/'r'
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    line = one_line(glr_train, [*argv, '--resume', 'latest', '--seed', '5', '--img_size', '48'], capsys)
    assert 'the run was made with other settings (seed 0 -> 5; img_size 32 -> 48)' in line, line
    assert glr_train([str(a) for a in [*argv, '--resume', 'latest']]) is None
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    assert after == before, [n for n in set(after) | set(before) if after.get(n) != before.get(n)]
    split = data/'split'/'v2c'/'random_valid_cv0.csv'
    text = split.read_text()
    try:
        split.write_text(text + text.splitlines()[1] + '\n')
        line = one_line(glr_train, [*argv, '--resume', 'latest'], capsys)
        assert 'split file random_valid_cv0.csv changed' in line, line
    finally: split.write_text(text)

# ---------------------------------------------------------------- 3. parts that do not belong together
def test_stacker_of_another_ensemble_is_refused(data, tmp_path, capsys):
    "glr_submit / glr_index --stacker made from other checkpoints is refused before any work, naming what differs"
    from glr_nb.submit import made_from
    a, b = _checkpoint(tmp_path/'a.pth'), tmp_path/'b.pth'
    b.write_bytes(a.read_bytes() + b'\0')                      # another file (another digest)
    st = tmp_path/'stacker'
    st.mkdir()
    (st/'stacker.json').write_text(json.dumps(dict(format='glr_nb.stacker/2', key=dict(
        made_from=made_from({'m1': (core.file_digest(a), 1.0)}, 3, True)))))
    common = ['--data_dir', data, '--result_dir', tmp_path/'res', '--stacker', st, '--img_size', 32, '--device', 'cpu']
    line = one_line(glr_submit, [*common, '--checkpoints', f'm1={b}', '--out_dir', tmp_path/'s1'], capsys)
    assert f'{st}: a stacker made for another ensemble (models differ' in line, line
    line = one_line(glr_submit, [*common, '--checkpoints', f'm1={a}', '--top_k', 2, '--out_dir', tmp_path/'s2'], capsys)
    assert '(top_k differ' in line, line
    assert not (tmp_path/'res'/'features').exists()            # refused before embedding anything
    line = one_line(glr_index, ['build', '--out', tmp_path/'ix', '--data-dir', data, '--checkpoints', f'm1={b}',
                                '--stacker', st, '--img_size', 32], capsys)
    assert 'a stacker made for another ensemble (models differ' in line, line

@pytest.mark.parametrize('spec,msg', [('m1=a.pth,m1=b.pth', "model name 'm1' is given twice"),
                                      ('x=a.pth:0.5,y=a.pth:0.5', 'x and y are the same checkpoint'),
                                      ('../m=a.pth', "model name '../m'")])
def test_repeated_or_conflicting_checkpoint_names(spec, msg, data, tmp_path, capsys):
    "A checkpoint list with a name twice, one file twice or a name that is a path is refused by glr_submit"
    line = one_line(glr_submit, ['--data_dir', data, '--result_dir', tmp_path, '--checkpoints', spec], capsys)
    assert msg in line, line

MANIFEST_FIELDS = [('weight', -1, 'weight -1: not > 0'), ('img_size', '800', "img_size '800'"),
                   ('file', None, 'file: not a string')]

@pytest.mark.parametrize('field,value,msg', MANIFEST_FIELDS)
def test_index_manifest_fields_checked(field, value, msg, tmp_path):
    "index.json fields of the wrong type or range are one line naming the field"
    from glr_nb.predict import read_manifest, INDEX_FORMAT
    m = dict(format=INDEX_FORMAT, models={'m1': dict(file='models/m1.pth', source_digest='ab', weight=1.0,
                                                     img_size=64)}, parts=[], gallery=None, stacker=None)
    m['models']['m1'][field] = value
    (tmp_path/'index.json').write_text(json.dumps(m))
    with pytest.raises(core.GLRError, match='index.json: models.m1.') as e: read_manifest(tmp_path)
    assert msg in str(e.value), e.value
