"""Parity with the reference: for each function we ported, the reference's own source (taken with `ast` from the
cells of `generate_submissions.ipynb` and from `src/`) runs beside ours on random inputs, and the numbers must agree.

The reference is looked up at `$GLR_REFERENCE`, else `<repo>/../shared/seed/reference`; without it the tests skip.
Only pure functions are executed (numpy, pandas, scikit-learn, LightGBM, pydegensac; no faiss, TensorFlow or torch).
The reference was written for pandas 1 and LightGBM 3: its code runs under `future.infer_string = False` (object
strings, as pandas 1 read them) and with a two-line `lgb.train` adapter for LightGBM 4's signature."""
import ast, contextlib, copy, functools, json, operator, os, pickle, types, warnings
from argparse import Namespace
from collections import Counter
from pathlib import Path
import numpy as np, pandas as pd, pytest
import lightgbm as lgb, pydegensac, cv2
from sklearn.model_selection import KFold
from glr_nb.retrieval import CandList, vote, merge_lists, ensemble
from glr_nb.rerank import rerank_score, homography_inliers, matched_points, load_gray
from glr_nb.postprocess import (make_synthetic_stack, stack_features, stack_targets, stack_predict, train_stacker,
                                lgb_params, fold_split, gap_vector, _first_true)
from glr_nb.metrics import global_average_precision
from glr_nb.submit import rerank_lists
from glr_nb.data import validation_set, nonlandmark_pool

ROOT = Path(__file__).resolve().parents[1]
REF = Path(os.environ.get('GLR_REFERENCE') or ROOT.parent/'shared'/'seed'/'reference')
NB = REF/'generate_submissions.ipynb'
pytestmark = pytest.mark.skipif(not NB.is_file(),
                                reason=f"reference not found at {REF}: set GLR_REFERENCE to the folder "
                                       "holding generate_submissions.ipynb and src/")


@functools.lru_cache(None)
def _defs():
    "name -> source of each top-level function of the notebook (first definition wins), and the constant assignments"
    out, consts = {}, []
    for c in json.loads(NB.read_text())['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] != 'code': continue
        try: tree = ast.parse(src)
        except SyntaxError: continue
        for n in tree.body:
            if isinstance(n, ast.FunctionDef): out.setdefault(n.name, ast.get_source_segment(src, n))
            elif (isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
                  and all(isinstance(t, ast.Name) and t.id.isupper() for t in n.targets)):
                consts.append(ast.get_source_segment(src, n))
    return out, tuple(consts)


class _LGB:
    "The reference's LightGBM 3 call `lgb.train(..., early_stopping_rounds=, verbose_eval=, evals_result=)`, on LGBM 4"
    Dataset = lgb.Dataset
    @staticmethod
    def train(params, train_set, valid_sets=None, valid_names=None, evals_result=None, num_boost_round=100,
              early_stopping_rounds=None, verbose_eval=None, feval=None):
        return lgb.train(params, train_set, num_boost_round, valid_sets=valid_sets, valid_names=valid_names,
                         feval=feval)


def ref(*names, **extra):
    "A namespace with the reference's functions `names`, executed from their source, and the names they use"
    defs, consts = _defs()
    ns = dict(np=np, pd=pd, Counter=Counter, KFold=KFold, operator=operator, copy=copy, os=os, pickle=pickle, lgb=_LGB,
              pydegensac=pydegensac, ID='id', TARGET='landmark_id', CTARGET='landmarks', EPS=1e-12, ope=os.path.exists)
    for c in consts: exec(c, ns)
    for n in names: exec(defs[n], ns)
    ns.update(extra)
    return ns


@contextlib.contextmanager
def _pandas1():
    "pandas 1's string handling (object columns; `astype(str)` gives 'nan'), which the reference relies on; quiet"
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pd.option_context('future.infer_string', False): yield


def _tuples(cl, ids, label=str):
    "A CandList as the reference's list of lists of (id, label, score) tuples"
    return [[(ids[i], label(l), s) for i, l, s in zip(I, L, S)] for I, L, S in zip(cl.idx, cl.label, cl.score)]


def test_vote_is_get_prediction_map():
    R, rng = ref('get_prediction_map'), np.random.default_rng(0)
    cl = CandList(np.zeros((500, 10), np.int64), rng.integers(0, 5, (500, 10)),
                  rng.choice([.1, .25, .5, .7], (500, 10)).astype(np.float32))
    for top_k in (1, 3, 10):                                   # few labels and scores: many ties, on purpose
        want = R['get_prediction_map'](list(range(500)), _tuples(cl, ['x'], int), top_k)
        lab, sc = vote(cl, top_k)
        assert lab.tolist() == [want[q]['class'] for q in range(500)]
        assert sc.tolist() == [want[q]['score'] for q in range(500)]


def _model_lists(rng, n, n_models, k=10, pool=30):
    "Per-model lists over a small shared database (so they overlap), faiss-sorted, float32 scores with ties"
    out = []
    for _ in range(n_models):
        idx = np.stack([rng.choice(pool, k, replace=False) for _ in range(n)])
        s = rng.choice(np.linspace(.2, .9, 8), (n, k)).astype(np.float32)
        o = np.argsort(-s, 1, kind='stable')
        out.append(CandList(np.take_along_axis(idx, o, 1), np.take_along_axis(idx, o, 1) % 7,
                            np.take_along_axis(s, o, 1)))
    return out


def test_merge_lists_is_merge_retrieval():
    R, rng = ref('merge_retrieval'), np.random.default_rng(1)
    ids = [f'{j:016x}' for j in range(30)]
    for n_models, w in ((1, [.6]), (2, [.6, .4]), (4, [.6, .2, .1, .1])):
        ls, en = _model_lists(rng, 200, n_models), None
        for l, wt in zip(ls, w): en = R['merge_retrieval'](en, _tuples(l, ids, str), weight=wt)
        en = [e[:10] for e in en]
        got = merge_lists(ls, w, 10)
        assert [[ids[i] for i in r] for r in got.idx] == [[t[0] for t in e] for e in en]
        assert got.score.tolist() == [[t[2] for t in e] for e in en]
        assert got.label.tolist() == [[t[1] for t in e] for e in en]


def test_rerank_score_is_get_total_score():
    R, rng = ref('get_total_score'), np.random.default_rng(2)
    n, g = rng.integers(0, 200, 1000), rng.uniform(-.2, 1, 1000)
    assert rerank_score(0., n, 70).tolist() == [R['get_total_score'](int(a), 0.) for a in n]
    want = [R['get_total_score'](int(a), b, weight=1.0, max_inlier_score=90) for a, b in zip(n, g)]
    assert rerank_score(g, n, 90).tolist() == want


def _features_and_matches(rng, ids, n_kp=60):
    "SuperPoint-like keypoints (integer pixels of an image resized to 800) and scales per image; matches0 per pair"
    feats = {i: dict(kp=rng.integers(0, 800, (n_kp, 2)).astype(np.float32),
                     scale=np.array(rng.uniform(.5, 3, 2))) for i in ids}
    return feats


def _pair_matches(rng, f0, f1, frac):
    "matches0 of image 0 into image 1: a `frac` share follow a homography (in original pixels), the rest at random"
    H = np.array([[1.05, .03, 12], [-.02, .97, -8], [1e-5, 2e-5, 1.]])
    p0 = f0['kp'] * f0['scale']
    q = np.c_[p0, np.ones(len(p0))] @ H.T
    target = q[:, :2] / q[:, 2:] / f1['scale']                                 # where image 1's keypoints should be
    m0 = np.full(len(p0), -1)
    good = rng.random(len(p0)) < frac
    f1['kp'][:good.sum()] = np.round(target[good]).astype(np.float32)          # plant the true matches
    m0[np.flatnonzero(good)] = np.arange(good.sum())
    bad = np.flatnonzero(~good & (rng.random(len(p0)) < .5))
    m0[bad] = rng.integers(good.sum(), len(f1['kp']), len(bad))
    return m0


def test_rerank_lists_are_rescore_and_rerank_by_num_inliers():
    rng = np.random.default_rng(3)
    q_ids, d_ids = [f'{j:016x}' for j in range(6)], [f'{100 + j:016x}' for j in range(12)]
    feats = _features_and_matches(rng, q_ids + d_ids)
    m0 = {}
    for q in q_ids:
        for d in d_ids:
            f1 = {'kp': feats[d]['kp'].copy(), 'scale': feats[d]['scale']}
            m0[(q, d)] = _pair_matches(rng, feats[q], f1, rng.choice([0., .02, .08, .3, .7]))
            feats[(q, d)] = f1                                                 # image 1's keypoints for this pair
    # pydegensac's default seed is new on every call (the reference's call uses it); both sides get seed 0 here
    R = ref('get_total_score', 'compute_num_inliers', 'rescore_and_rerank_by_num_inliers',
            pydegensac=types.SimpleNamespace(findHomography=lambda *a: pydegensac.findHomography(*a, seed=0)))
    R.update(get_ransac_cache_dir=lambda args: ('none', 'none'), get_cached_num_inliers=lambda d, a, b: (None, None),
             load_cached_matches=lambda d, q, i: {'matches0': [m0[(q, i)]]})
    cur = {}
    R['load_cached_keypoints'] = lambda d, i: {'keypoints': cur[i]['kp'], 'scales': tuple(cur[i]['scale'])}
    args = Namespace(kaggle=1, ransac_type='ssp', ransac_weight=1.0)
    for q in q_ids:
        idx = rng.choice(12, 10, replace=False)
        g = np.sort(rng.choice(np.linspace(.3, .9, 4), 10))[::-1]
        lst = [(d_ids[i], str(i % 4), float(s)) for i, s in zip(idx, g)]
        inl = []
        for i in idx:
            d = d_ids[i]
            cur.clear()
            cur.update({q: feats[q], d: feats[(q, d)]})
            local = R['rescore_and_rerank_by_num_inliers'](args, 't', 'i', q, [(d, '0', 0.)], ignore_global_score=True,
                                                           do_sort=False)
            mt = np.flatnonzero(m0[(q, d)] > -1)
            pts = matched_points(feats[q], feats[(q, d)], np.stack([mt, m0[(q, d)][mt]], 1))
            inl.append(homography_inliers(*pts)[0])
            assert local[0][2] == min(inl[-1], 70) / 70                        # same count through both paths
            assert inl[-1] == R['compute_num_inliers'](*[pts[0], None, pts[1], None], do_kdtree=False)
        inl = np.array([inl])
        m0_cl = CandList(idx[None], (idx % 4)[None], g[None])
        ransac, rr = rerank_lists(m0_cl, m0_cl, inl, inl)
        feat_of = lambda i: feats[q] if i == q else feats[(q, i)]
        R['rescore_and_rerank_by_num_inliers'].__globals__['load_cached_keypoints'] = lambda d, i: {
            'keypoints': feat_of(i)['kp'], 'scales': tuple(feat_of(i)['scale'])}
        want_local = R['rescore_and_rerank_by_num_inliers'](args, 't', 'i', q, copy.deepcopy(lst),
                                                            ignore_global_score=True, do_sort=False)
        want = R['rescore_and_rerank_by_num_inliers'](args, 't', 'i', q, copy.deepcopy(lst), ignore_global_score=False,
                                                      do_sort=True)
        assert ransac.score[0].tolist() == [t[2] for t in want_local] and ransac.idx[0].tolist() == idx.tolist()
        assert [d_ids[i] for i in rr.idx[0]] == [t[0] for t in want] and rr.score[0].tolist() == [t[2] for t in want]
    assert len({int(n) for n in inl[0]}) > 2                                   # counts of several sizes were compared


def _reference_lists(syn, ids):
    "The synthetic lists in the reference's formats: numpy string arrays of (id, label, score) tuples"
    arr = lambda cl, label, score: np.array([[(ids[0], label(l), score(s)) for l, s in zip(L, S)]
                                             for L, S in zip(cl.label, cl.score)])
    en = arr(syn['merged'], int, float)
    lists = [arr(syn['lists'][m], str, np.float32) for m in syn['lists']]
    nl = [arr(syn['nl_lists'][m], int, np.float32) for m in syn['nl_lists']]
    ransac = arr(syn['ransac'], str, float)
    return en, lists, nl, ransac


def _truth_column(truth):
    return [t[0] if t else 'nan' for t in truth]


def test_stack_features_and_targets_are_the_reference():
    names = ('generate_Xy', 'add_topn_features', 'add_features', 'add_multi_models_features', 'add_nl_features')
    R = ref(*names)
    syn = make_synthetic_stack(400, n_labels=30, n_models=3, seed=4)
    ids = [f'{j:016x}' for j in range(400)]
    en, lists, nl, ransac = _reference_lists(syn, ids)
    test_df = pd.DataFrame({'id': ids, 'landmarks': _truth_column(syn['truth'])})
    args = Namespace(top_k=3, num_to_rerank=10)
    with _pandas1():
        f, topn = R['generate_Xy'](test_df, en[:, :, 1].astype('int32'), en[:, :, 2].astype('float32'), topk=3)
        for i in range(len(lists)):
            if i == 0: f = R['add_topn_features'](f, topn, ransac, 'ransac', 3, i)
            f = R['add_topn_features'](f, topn, lists[i], 'retrieval', 3, i)
            f = R['add_nl_features'](f, nl[i], i)
            f = R['add_features'](args, f, topn, lists[i], None, nl[i], i)
        f = R['add_multi_models_features'](f, None, model_num=len(lists), topk=3)
    ours, lab = stack_features(syn['merged'], syn['lists'], syn['nl_lists'], syn['ransac'], ids)
    cols = [c for c in f.columns if c not in ('id', 'landmarks', 'y')]
    assert list(ours.columns) == ['id'] + cols                                  # the same names, in the same order
    np.testing.assert_array_equal(ours[cols].to_numpy(np.float64), f[cols].to_numpy(np.float64))   # the same bits
    assert (lab == topn).all()
    assert stack_targets(lab, syn['truth']).tolist() == f['y'].tolist()
    assert set(f['y']) == {0, 1, 2, 4}


def test_stacker_is_do_lgbm(tmp_path):
    names = ('generate_Xy', 'add_topn_features', 'add_features', 'add_multi_models_features', 'add_nl_features',
             'get_lgb_params', 'get_split_ix', 'get_train_val_data', 'train_model', 'get_lgbm_prediction_map',
             'save_model', 'do_metric', 'GAP_vector', 'do_lgbm')
    R = ref(*names, RESULT_DIR=str(tmp_path))
    base = R['get_lgb_params']
    fast = dict(num_threads=1, num_boost_round=80, early_stopping_rounds=20)   # same overrides on both sides (time)
    R['get_lgb_params'] = lambda num_class=5: {**base(num_class), **fast}
    syn = make_synthetic_stack(600, n_labels=40, n_models=2, seed=5)
    ids = [f'{j:016x}' for j in range(600)]
    en, lists, nl, ransac = _reference_lists(syn, ids)
    test_df = pd.DataFrame({'id': ids, 'landmarks': _truth_column(syn['truth'])})
    args = Namespace(kaggle=0, out_dir='t', top_k=3, num_to_rerank=10, valid_num=600, do_train=1, do_valid=1, do_test=0)
    with _pandas1():
        probs, got_ids, labels = R['do_lgbm'](args, test_df, en.tolist(), [l.tolist() for l in lists],
                                               [n.tolist() for n in nl], [ransac.tolist()] + [None] * (len(lists) - 1))
        want = R['get_lgbm_prediction_map'](probs, got_ids, labels, topk=3, show=False)
    f, lab = stack_features(syn['merged'], syn['lists'], syn['nl_lists'], syn['ransac'], ids)
    st = train_stacker(f, lab, syn['truth'], params=fast)
    assert (lab == labels).all()
    assert st.info['kept'] == np.load(tmp_path/'models'/'lgbm'/'t'/'selected_indices.npy').tolist()
    np.testing.assert_array_equal(st.oof, probs)
    l, s = stack_predict(st.oof, lab)
    assert l.tolist() == [want[i]['class'] for i in ids] and s.tolist() == [want[i]['score'] for i in ids]


def test_lgb_params_and_folds():
    R = ref('get_lgb_params', 'get_split_ix')
    assert lgb_params(6) == R['get_lgb_params'](num_class=6)
    df = pd.DataFrame({'id': np.arange(137)})
    for fold in range(5):
        for a, b in zip(fold_split(137, 5, fold, 4321), R['get_split_ix'](df, 5, fold, random_state=4321)):
            assert (a == b).all()


def test_gap_vector_is_gap_vector_and_our_gap():
    R, rng = ref('GAP_vector'), np.random.default_rng(6)
    pred, conf = rng.integers(0, 20, 300).astype(float), rng.random(300)
    true = np.where(rng.random(300) < .6, np.nan,
                    np.where(rng.random(300) < .5, pred, rng.integers(0, 20, 300))).astype(float)
    want = R['GAP_vector'](pred, conf, true)
    assert gap_vector(pred, conf, true) == want
    sol = {i: ([] if np.isnan(t) else [int(t)]) for i, t in enumerate(true)}
    preds = {i: (int(p), c) for i, (p, c) in enumerate(zip(pred, conf))}
    assert abs(global_average_precision(preds, sol) - want) < 1e-12
    assert (_first_true([[3], [], [5, 6]])[[0, 2]] == [3, 5]).all() and np.isnan(_first_true([[]])[0])


def test_ensemble_is_norm_of_weighted_concat():
    R, rng = ref('norm'), np.random.default_rng(7)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    embs = {m: unit(rng.standard_normal((50, 16)).astype(np.float32)) for m in 'abcd'}
    w = dict(a=.6, b=.2, c=.1, d=.1)
    want = R['norm'](np.concatenate([embs[m] * w[m] for m in 'abcd'], axis=1))
    np.testing.assert_allclose(ensemble(embs, w).astype(np.float32), want, atol=1e-3)   # ours is stored in float16


def test_load_gray_is_read_image(tmp_path):
    "The reference's SuperGlue image reading: OpenCV grayscale, process_resize([800]), OpenCV bilinear resize"
    src = (REF/'src'/'utilities'/'superpointglue_util.py').read_text()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == 'process_resize')
    ns = {}
    exec(ast.get_source_segment(src, fn), ns)
    import skimage.data
    for i, (h, w) in enumerate([(512, 400), (300, 1200), (801, 799), (1600, 1067)]):
        im = cv2.resize(skimage.data.astronaut(), (w, h))
        p = tmp_path/f'{i}.jpg'
        cv2.imwrite(str(p), im)
        g, sc = load_gray(p, 800)
        nw, nh = ns['process_resize'](w, h, [800])
        want = cv2.resize(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), (nw, nh))
        assert (g == want).all() and sc == (w / nw, h / nh)


def _main_validation_source():
    "main()'s local branch that builds the validation set, index and gallery, as a function of (args, DATA_DIR)"
    tree = ast.parse(_defs()[0]['main'])
    body = tree.body[0].body
    ifs = [n for n in body if isinstance(n, ast.If) and ast.unparse(n.test) == 'args.kaggle']
    sample = next(n for n in body if isinstance(n, ast.Assign) and 'nolandmark_df.sample' in ast.unparse(n))
    stmts = ifs[0].orelse + ifs[1].orelse + [sample, ast.parse('result = (test_df, train_df, nolandmark_df)').body[0]]
    return ast.unparse(ast.Module(body=stmts, type_ignores=[]))


def _gld(rng, d):
    "A small GLDv2-like data set in the reference's file layout (and ours in DataFrames)"
    h = lambda i: f'{i:016x}'
    n_cls = 120
    t20 = pd.DataFrame(dict(id=[h(10**6 + i) for i in range(3600)], landmark_id=rng.integers(0, n_cls, 3600)))
    t20['landmarks'] = 1000 + 3*t20.landmark_id
    trn = t20.iloc[200:].reset_index(drop=True)                                 # v2c train: all but 200
    xo = pd.DataFrame(dict(id=[h(2*10**6 + i) for i in range(900)], landmark_id=rng.integers(0, n_cls, 900)))
    xo['landmarks'] = 1000 + 3*xo.landmark_id
    v2x = pd.concat([trn, xo]).sample(frac=1, random_state=2).reset_index(drop=True)
    n_sol = 700
    lm = np.where(rng.random(n_sol) < .08, (1000 + 3*rng.integers(0, n_cls, n_sol)).astype(str), '')
    lm[:6] = ['1003 1006', '99', '1003', '5', '1009 1012', '1030']             # multi-landmark and non-v2c rows too
    usage = rng.choice(['Public', 'Private', 'Ignored'], n_sol)
    sol = pd.DataFrame(dict(id=[h(3*10**6 + i) for i in range(n_sol)], landmarks=lm, Usage=usage))
    for sub in ('raw', 'split/v2c', 'split/v2xc', 'input'): (d/sub).mkdir(parents=True, exist_ok=True)
    sol.to_csv(d/'raw'/'recognition_solution_v2.1.csv', index=False)
    t20.to_csv(d/'split'/'train2020.csv', index=False)
    trn[['id', 'landmark_id']].to_csv(d/'split'/'v2c'/'random_train_cv0.csv', index=False)
    v2x[['id', 'landmark_id']].to_csv(d/'split'/'v2xc'/'random_train_cv0.csv', index=False)
    return t20, trn, v2x, sol


def test_validation_set_is_main(tmp_path):
    rng = np.random.default_rng(8)
    t20, trn, v2x, sol = _gld(rng, tmp_path)
    pool = nonlandmark_pool(sol, [], pd.DataFrame(dict(id=[], landmark_id=np.int32([]))),
                            pd.DataFrame(dict(landmark_id=[])))
    pool.to_csv(tmp_path/'split'/'nolandmark_v1.csv', index=False)             # the reference's gallery file: our pool
    ns = dict(pd=pd, np=np, ID='id', TARGET='landmark_id', CTARGET='landmarks', DATA_DIR=str(tmp_path),
              args=Namespace(debug=0, valid_num=300, nolandmark_num=100))
    with _pandas1():
        exec(_main_validation_source(), ns)
    test_df, index_df, gal_df = ns['result']
    q, ix, gal = validation_set(t20, trn, v2x, sol, [], pool, valid_num=300, n_gallery=100)
    assert q.id.tolist() == test_df.id.tolist()                                 # the same queries, in the same order
    assert q.landmarks.tolist() == [str(v) if v != 'nan' else '' for v in test_df.landmarks]
    assert ix.id.tolist() == index_df.id.tolist()
    assert (ix.landmarks.to_numpy() == index_df.landmark_id.to_numpy()).all()   # its labels are the GLDv2 ids
    assert gal.id.tolist() == gal_df.id.tolist()
    assert (q.landmark_id >= 0).sum() == 60 and (q.subset == 'test').sum() > 60  # 20% landmark; 2019 rows among them
