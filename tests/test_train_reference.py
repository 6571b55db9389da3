"""Training pieces checked against the reference solution's own code: its augmentation ops, its retrieval
scorer, its EfficientNet / ResNet backbones (for the weight formats and the padding). The reference source is
read from `../shared/seed/reference` next to this checkout, or `$GLR_REFERENCE_DIR`; without it these tests skip."""
import os, ast, sys, types
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image

REF = Path(os.environ.get('GLR_REFERENCE_DIR') or Path(__file__).resolve().parents[2]/'shared'/'seed'/'reference')/'src'
pytestmark = pytest.mark.skipif(not REF.is_dir(), reason=f'the reference source is not at {REF} (set GLR_REFERENCE_DIR)')

def ref_namespace(relpath, names=None, **globs):
    "Execute the reference file `relpath` (only the top-level functions `names`, when given) in a fresh namespace"
    tree = ast.parse((REF/relpath).read_text())
    if names is not None: tree.body = [n for n in tree.body if getattr(n, 'name', None) in names]
    ns = dict(globs)
    exec(compile(tree, str(REF/relpath), 'exec'), ns)
    return ns

def photo(h=60, w=80, seed=0):
    "A smooth image with dark and bright areas (every op, Block_fade included, has something to do)"
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w, y / h, (x + y) / (w + h)], -1) * 255
    noise = np.random.default_rng(seed).normal(0, 20, (h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)

@pytest.mark.parametrize('name', ['Identity', 'AutoContrast', 'Block_fade', 'Brightness', 'Color', 'Contrast', 'Cutout',
                                  'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'])
def test_rand_ops_equal_the_reference(name):
    "Every RandAugment op at every magnitude: the same pixels as augment_rand.py given the same NumPy seed"
    from glr_nb.images import RAND_OPS, rand_op
    ref = ref_namespace('utilities/augment_rand.py')
    lo, hi = RAND_OPS[name]
    assert [t[1:] for t in ref['fast_randaugment_list']] == list(RAND_OPS.values())
    changed = 0
    for seed, img in enumerate([photo(), photo(61, 47, 1), photo(32, 32, 2)]):
        for m in range(1, 10):
            v = m / 10 * (hi - lo) + lo
            np.random.seed(seed * 10 + m)
            want = np.asarray(ref['apply_op'](img, name, v))
            got = np.asarray(rand_op(Image.fromarray(img), name, v, np.random.RandomState(seed * 10 + m)))
            assert got.shape == want.shape and np.array_equal(got, want), (name, m, seed, np.abs(got.astype(int) - want).max())
            changed += not np.array_equal(got, img)
    assert changed >= (0 if name == 'Identity' else 20), changed        # the ops did something to compare

def test_long_edge_crop_equals_the_reference():
    "The square crop along the long edge draws the same offset and cuts the same pixels as random_crop_long_edge"
    import cv2, torchvision
    from glr_nb.images import long_edge_crop
    ref = ref_namespace('utilities/augment_util.py', ['random_crop_long_edge'], np=np, cv2=cv2, Image=Image, torchvision=torchvision)
    for seed, img in enumerate([photo(40, 90), photo(90, 40, 1), photo(50, 50, 2)]):
        s = min(img.shape[:2])
        np.random.seed(seed)
        want = ref['random_crop_long_edge'](img, (s, s))
        got = np.asarray(long_edge_crop(Image.fromarray(img), np.random.RandomState(seed)))
        assert np.array_equal(got, want)
