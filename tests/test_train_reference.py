"""Training pieces checked against the reference solution's own code: its augmentation ops, its retrieval
scorer, its EfficientNet / ResNet backbones (for the weight formats and the padding). The reference source is
read from `../shared/seed/reference` next to this checkout, or `$GLR_REFERENCE` (as in tests/test_reference_parity.py);
without it these tests skip."""
import os, ast, sys, types
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image

REF = Path(os.environ.get('GLR_REFERENCE') or Path(__file__).resolve().parents[2]/'shared'/'seed'/'reference')/'src'
pytestmark = pytest.mark.skipif(not REF.is_dir(), reason=f'no reference source at {REF} (set GLR_REFERENCE)')

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
            assert got.shape == want.shape, (name, m, seed)
            assert np.array_equal(got, want), (name, m, seed, np.abs(got.astype(int) - want).max())
            changed += not np.array_equal(got, img)
    assert changed >= (0 if name == 'Identity' else 20), changed        # the ops did something to compare

def test_long_edge_crop_equals_the_reference():
    "The square crop along the long edge draws the same offset and cuts the same pixels as random_crop_long_edge"
    import cv2, torchvision
    from glr_nb.images import long_edge_crop
    ref = ref_namespace('utilities/augment_util.py', ['random_crop_long_edge'], np=np, cv2=cv2, Image=Image,
                        torchvision=torchvision)
    for seed, img in enumerate([photo(40, 90), photo(90, 40, 1), photo(50, 50, 2)]):
        s = min(img.shape[:2])
        np.random.seed(seed)
        want = ref['random_crop_long_edge'](img, (s, s))
        got = np.asarray(long_edge_crop(Image.fromarray(img), np.random.RandomState(seed)))
        assert np.array_equal(got, want)

def _flags(path='train.py'):
    "`--name -> default` of the reference's argparse flags, read with ast"
    out = {}
    for node in ast.walk(ast.parse((REF/path).read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, 'attr', '') == 'add_argument':
            kw = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg == 'default'}
            out[node.args[0].value.lstrip('-')] = kw.get('default')
    return out

def test_every_reference_flag_is_a_setting_with_its_default():
    "Every flag of the reference's train.py is a TrainSettings field; defaults equal but the four 03_train explains"
    from glr_nb.train import TrainSettings
    flags, ours = _flags(), TrainSettings()
    assert len(flags) == 20 and set(flags) <= set(TrainSettings.names()), set(flags) - set(TrainSettings.names())
    differ = {k: (v, getattr(ours, k)) for k, v in flags.items() if v != getattr(ours, k)}
    want = {'num_classes': (81313, None), 'distributed': (1, None), 'local_rank': (0, None), 'gpu_id': ('0', None)}
    assert differ == want, differ

def test_map_equals_the_reference_scorer():
    "metrics.mean_average_precision == utilities/metric_util.MeanAveragePrecision on lists full of repeats"
    from glr_nb.metrics import mean_average_precision
    ref = ref_namespace('utilities/metric_util.py', ['MeanAveragePrecision'])['MeanAveragePrecision']
    rng = np.random.default_rng(0)
    for trial in range(300):
        ids = [f'{i:016x}' for i in range(int(rng.integers(5, 60)))]
        nq = int(rng.integers(1, 8))
        sol = {f'q{j}': list(rng.choice(ids, int(rng.integers(1, 5)), replace=False)) for j in range(nq)}
        pred = {q: list(rng.choice(ids, int(rng.integers(1, 150)))) for q in sol if rng.random() < .8}
        k = int(rng.choice([3, 100]))
        assert mean_average_precision(pred, sol, k) == pytest.approx(ref(pred, sol, max_predictions=k), abs=1e-12)

@pytest.fixture(scope='module')
def backbones():
    "The reference's backbone modules (EfficientNet, ResNet), imported from its source"
    sys.path.insert(0, str(REF))
    try:
        from layers.backbone import efficientnet_pytorch, resnet
        yield efficientnet_pytorch, resnet
    finally: sys.path.remove(str(REF))

def _randomise(model):
    with torch.no_grad():
        for n, t in model.state_dict().items():
            if not t.is_floating_point(): continue
            t.copy_(torch.rand_like(t) + .5 if 'running_var' in n else torch.randn_like(t) * .1)
    return model.eval()

def test_lukemelas_weights_give_the_reference_features(backbones, tmp_path):
    """The reference's EfficientNet-B0 with random weights, saved in its format, loads into timm's and computes the same
    features at every size divisible by 32 (TF 'same' padding: its static padding differs when a stride-2 input is
    odd)"""
    from glr_nb.models import create_model
    ref = _randomise(backbones[0].EfficientNet.from_name('efficientnet-b0'))
    torch.save(ref.state_dict(), tmp_path/'efficientnet-b0-355c32eb.pth')
    ours = create_model('tf_efficientnet_b0', 5, pretrained=tmp_path/'efficientnet-b0-355c32eb.pth').backbone.eval()
    with torch.no_grad():
        for size, same in ((64, True), (96, True), (224, True), (80, False)):
            x = torch.randn(2, 3, size, size)
            a, b = ref.extract_features(x), ours.forward_features(x)
            equal = a.shape == b.shape and torch.allclose(a, b, atol=1e-4)
            assert equal == same, (size, a.shape, b.shape)

@pytest.mark.parametrize('b', [5, 6, 7])
def test_seed_efficientnets_map_and_regularise_as_the_reference(backbones, b):
    "B5/B6/B7 on the meta device: lukemelas keys map to timm keys of equal shapes; drop connect and BN as the reference"
    from glr_nb.models import lukemelas_to_timm, create_model
    with torch.device('meta'):
        ref = backbones[0].EfficientNet.from_name(f'efficientnet-b{b}')
        ours = create_model(f'class_efficientnet_b{b}_gem_fc_arcface2_1head', 7).backbone
    mapped, own = lukemelas_to_timm(ref.state_dict(), ours), ours.state_dict()
    assert set(mapped) - set(own) == {'classifier.weight', 'classifier.bias'} and set(own) <= set(mapped)
    assert all(mapped[k].shape == own[k].shape for k in own)
    gp, blocks = ref._global_params, [blk for st in ours.blocks for blk in st]
    assert len(blocks) == len(ref._blocks)
    want = [gp.drop_connect_rate * i / len(ref._blocks) for i in range(len(blocks))]
    assert [getattr(blk.drop_path, 'drop_prob', 0.) for blk in blocks] == pytest.approx(want)
    ref_bn = {(round(m.momentum, 6), m.eps) for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    our_bn = {(round(m.momentum, 6), m.eps) for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert ref_bn == our_bn == {(0.01, 1e-3)}

def test_torchvision_resnet_weights(backbones, tmp_path):
    "The reference's ResNet (torchvision layout): ResNet152 keys and shapes are timm's; ResNet18 weights, its features"
    from glr_nb.models import create_model
    with torch.device('meta'):
        r152, ours152 = backbones[1].resnet152(), create_model('class_resnet152_gem_fc_arcface_1head', 7).backbone
    theirs = {k: v.shape for k, v in r152.state_dict().items() if not k.startswith('fc.')}
    assert theirs == {k: v.shape for k, v in ours152.state_dict().items()}
    r18 = _randomise(backbones[1].resnet18())
    torch.save(r18.state_dict(), tmp_path/'resnet18-5c106cde.pth')
    ours = create_model('class_resnet18_gem_fc_arcface_1head', 5, pretrained=tmp_path/'resnet18-5c106cde.pth')
    ours = ours.backbone.eval()
    x = torch.randn(2, 3, 64, 64)
    layers = [getattr(r18, f'layer{i}') for i in range(1, 5)]
    body = torch.nn.Sequential(r18.conv1, r18.bn1, r18.relu, r18.maxpool, *layers)
    with torch.no_grad(): assert torch.allclose(body(x), ours.forward_features(x), atol=1e-5)
