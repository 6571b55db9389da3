"Tests of glr_nb.data that the notebooks cannot hold well: the default demo dataset end to end and the installed CLI."
import sys, subprocess, json
from pathlib import Path
import numpy as np, pandas as pd, pytest
from PIL import Image
from glr_nb.data import make_demo_dataset, make_splits, read_train, read_train_clean, read_ids, image_paths
from glr_nb.images import ImageDataset

GLR_SPLIT = str(Path(sys.executable).parent/'glr_split')


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp('demo')/'data'
    make_demo_dataset(d, seed=0)
    return d


def test_default_demo_shape(demo):
    d = demo
    files = [p for p in d.rglob('*') if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 50*2**20
    tc = read_train_clean(d/'raw'/'train_clean.csv')
    tr = read_train(d/'raw'/'train.csv')
    n = tc.images.str.split().str.len()
    assert len(tc) >= 40 and n.min() <= 5 and n.max() >= 200
    test_ids = read_ids(d/'raw'/'test.csv').id
    sol = pd.read_csv(d/'raw'/'recognition_solution_v2.1.csv', keep_default_na=False).set_index('id')
    assert sorted(sol.index) == sorted(test_ids) and sol.index.is_unique   # outside checks score against it as is
    assert set(sol.Usage) == {'Public', 'Private'}
    lm = (sol.landmarks[test_ids] != '').mean()
    assert 0.15 < lm < 0.25                                           # ~1:4
    assert sum(1 for _ in (d/'images'/'test').rglob('*.jpg')) == len(test_ids)
    for sub in ('train', 'test', 'index'):
        jpgs = list((d/'images'/sub).rglob('*.jpg'))
        assert jpgs and all(p.parent.name == p.stem[2] and p.parent.parent.name == p.stem[1] for p in jpgs)
    sizes = [max(Image.open(p).size) for p in image_paths(d/'images'/'train', tr.id[:50])]
    assert 128 <= min(sizes) and max(sizes) <= 160


def test_demo_split_reference_rule(demo):
    d = demo
    c = make_splits(d, seed=0, valid_num=250, n_gallery=80)          # the reference thresholds; the demo's set sizes
    assert c['v2c/random_valid_cv0.csv'] == 200
    val = pd.read_csv(d/'split'/'v2c'/'random_valid_cv0.csv')
    t20 = pd.read_csv(d/'split'/'train2020.csv')
    n = t20.landmark_id.value_counts()
    assert (n[val.landmark_id] >= 200).all()
    q = pd.read_csv(d/'split'/'val'/'query.csv', keep_default_na=False, dtype={'id': str})
    assert ((q.landmark_id >= 0).sum(), (q.landmark_id < 0).sum()) == (50, 200)   # main()'s 20% / 80%
    gal = pd.read_csv(d/'split'/'nonlandmark.csv', dtype={'id': str})
    assert len(gal) == 80 and gal.id.is_unique and q.id.is_unique
    test_ids = set(read_ids(d/'raw'/'test.csv').id)
    assert not set(gal.id) & set(q.id) and not set(gal.id) & test_ids and not set(q.id) & test_ids
    for df in (q, gal):                                              # subset = the images/ folder holding the id
        assert all((d/'images'/r.subset/r.id[0]/r.id[1]/r.id[2]/f'{r.id}.jpg').is_file() for r in df.itertuples())
    tr, tc = read_train(d/'raw'/'train.csv'), read_train_clean(d/'raw'/'train_clean.csv')
    absent = set(tr.id[~tr.landmark_id.isin(tc.landmark_id)])
    assert set(gal.id) <= absent and set(q.id[q.landmark_id < 0]) <= absent   # the pool: landmarks outside train_clean
    meta = json.loads((d/'demo_meta.json').read_text())['nonlandmark_kinds']
    assert {meta[i] for i in gal.id} == {'noise', 'indoor', 'face', 'photo', 'facade'}   # like non-landmark queries


def test_demo_split_no_leakage(demo):
    "Validation queries (v2x-only images among them) are in no training split"
    d = demo
    c = make_splits(d, seed=0, valid_num=250, n_gallery=80)
    q = pd.read_csv(d/'split'/'val'/'query.csv', keep_default_na=False, dtype={'id': str})
    tr, tc = read_train(d/'raw'/'train.csv'), read_train_clean(d/'raw'/'train_clean.csv')
    val = pd.read_csv(d/'split'/'v2c'/'random_valid_cv0.csv', dtype={'id': str})
    lq = set(q.id[q.landmark_id >= 0])
    v2x_all = set(tr.id[tr.landmark_id.isin(tc.landmark_id)]) - set(val.id)
    assert lq and lq <= v2x_all                                      # without the fix they would be in v2x train
    for f in ('v2x/random_train_cv0.csv', 'v2c/random_train_cv0.csv', 'train2020.csv'):
        assert not set(pd.read_csv(d/'split'/f, dtype={'id': str}).id) & set(q.id), f
    x = pd.read_csv(d/'split'/'v2x'/'random_train_cv0.csv', dtype={'id': str})
    assert set(x.id) == v2x_all - lq and c['v2x/random_train_cv0.csv'] == len(x)


def test_dataset_batches(demo):
    import torch
    d = demo
    t = pd.read_csv(d/'split'/'v2c'/'random_train_cv0.csv')
    ds = ImageDataset(image_paths(d/'images'/'train', t.id[:16]), t.landmark_id[:16], size=64, aug='v3b', train=True)
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)))
    assert xb.shape == (8, 3, 64, 64) and yb.dtype == torch.int64 and (yb.numpy() == t.landmark_id[:8].to_numpy()).all()


def test_cli(demo, tmp_path):
    d = demo
    p = subprocess.run([GLR_SPLIT, '--data-dir', str(d), '--seed', '1'], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    (tmp_path/'raw').mkdir()
    (tmp_path/'raw'/'train_clean.csv').write_text('landmark_id,images\nx,0123456789abcdef\n')
    p = subprocess.run([GLR_SPLIT, '--data_dir', str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count('\n') == 1 and "line 2: landmark_id 'x' is not an integer" in p.stderr
    p = subprocess.run([GLR_SPLIT], capture_output=True, text=True, env={'PATH': '/usr/bin:/bin'})
    assert p.returncode == 2 and 'GLR_DATA_DIR' in p.stderr
