#!/usr/bin/env python
"""`make gpu-check`: every CUDA path of glr_nb exercised in minutes, each check in its own process with a time limit.

    python tools/gpu_check.py [--device cuda|cpu] [--out gpu_check.jsonl] [--only train,knn] [--list]

On a GPU machine (the default when one is visible) it runs, in order: the CUDA test cells and pytest tests; one
training step of each seed architecture at 448 px with bf16 + channels_last + torch.compile beside the reference
recipe (fp32, NCHW, eager, the seed's batch), then a checkpoint reload; extraction of B7 at 800 px, reference recipe
beside ours; kNN of 20,000 queries against 1.58M x 512 (and 120k x 3.2M), checked against an exact fp32 search on a
subsample; SuperPoint + SuperGlue + homography on 64 pairs at 800 px, the reference's per-pair loop beside our
batched `verify_pairs`, fp16 against fp32; `torchrun --nproc_per_node <GPUs>` training with NCCL and SyncBN; and
`papermill nbs/90_train.ipynb` ending with its curves. `--device cpu` runs the same code paths at tiny sizes (bf16
autocast on CPU, channels_last, the inductor CPU backend, gloo DDP with 2 processes); `make test` runs that mode.

Each check writes one JSON line (to `gpu_check.jsonl`, or `--out`) with at least `check`, `ok`, `device`,
`seconds`, and for the timed ones the figure, the reference recipe's figure and their `ratio`; the script exits 1
when a check fails. It needs what `make install` installs (plus faiss-gpu where present); what is missing is named
in the first line, `env`, with the pip command that installs it.
"""
from __future__ import annotations
import os, sys, json, time, shlex, signal, argparse, tempfile, platform, subprocess, importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDED = {'fastai': 'fastai', 'fastcore': 'fastcore', 'timm': 'timm', 'cv2': 'opencv-python-headless',
          'papermill': 'papermill', 'nbdev': 'nbdev==2.4.14', 'execnb': 'execnb', 'ipykernel': 'ipykernel'}
OPTIONAL = {'faiss': 'faiss-cpu (or faiss-gpu)', 'pydegensac': 'pydegensac==0.3.0'}
SEED_ARCHES = {'b7': ('class_efficientnet_b7_gem_fc_arcface2_1head', 4),
               'b6': ('class_efficientnet_b6_gem_fc_arcface2_1head', 6),
               'b5': ('class_efficientnet_b5_gem_fc_arcface_1head', 8),
               'r152': ('class_resnet152_gem_fc_arcface_1head', 10)}
AGREE_SKIP = ('recipe', 'bench', 'device', 'size', 'max_keypoints', 'pairs', 'unique_images')
TINY_ARCHES = {'r152': ('test_resnet', 4)}   # the CPU stand-in: same code paths, few kernels to compile


def sizes(gpu:bool)->dict:
    "Problem sizes of the two modes"
    if gpu: return dict(arches=SEED_ARCHES, compile=('b7',), img=448, classes=81313, batch=32, steps=5, warmup=2,
                        ext_arch='b7', ext_img=800, ext_n=128, knn_db=1_580_470, knn_q=20_000,
                        knn_big=(3_200_000, 120_000), knn_check=256,
                        rr_queries=16, rr_nb=4, rr_size=800, rr_kp=1024, world=None, pm_gpus=None)
    return dict(arches=TINY_ARCHES, compile=('r152',), img=64, classes=1000, batch=8, steps=2, warmup=1,
                ext_arch='r152', ext_img=64, ext_n=8, knn_db=20_000, knn_q=500, knn_big=None, knn_check=64,
                rr_queries=2, rr_nb=2, rr_size=96, rr_kp=64, world=2, pm_gpus=2)


def emit(rec:dict):
    "Print a result record as the last JSON line of a check's output"
    print('GPU_CHECK ' + json.dumps(rec), flush=True)

def _gpu(dev): return dev == 'cuda'

def _dev_name(dev):
    import torch
    return torch.cuda.get_device_name(0) if _gpu(dev) else f'cpu ({platform.machine()}, {os.cpu_count()} threads)'


# ---------------------------------------------------------------------------------------------------- checks
def check_env(dev, z, tmp):
    "Versions, the device, and which packages are missing (with the command that installs them)"
    import torch
    miss = {m: p for m, p in NEEDED.items() if importlib.util.find_spec(m) is None}
    opt = {m: p for m, p in OPTIONAL.items() if importlib.util.find_spec(m) is None}
    ok = not miss and (not _gpu(dev) or torch.cuda.is_available())
    hint = f"pip install {' '.join(miss.values())}" if miss else ''
    return dict(ok=ok, torch=torch.__version__, cuda=torch.version.cuda, gpus=torch.cuda.device_count(),
                bf16=bool(_gpu(dev) and torch.cuda.is_bf16_supported()), missing=sorted(miss),
                optional_missing=sorted(opt), install=hint or None,
                optional_install=f"pip install {' '.join(opt.values())}" if opt else None,
                error=None if ok else (f"missing {sorted(miss)}: {hint}" if miss else 'no CUDA device visible'))

def check_cuda_tests(dev, z, tmp):
    "The notebook cells flagged `#| cuda` (nbdev_test --flags cuda) and the pytest tests with CUDA branches"
    if not _gpu(dev): return dict(ok=True, skipped='CPU mode: the CUDA cells need a GPU')
    nbs = sorted(str(p) for p in (ROOT/'nbs').glob('*.ipynb') if '#| cuda' in p.read_text())
    tests = [f"{p}::{f}" for p in sorted((ROOT/'tests').glob('test_*.py')) for f in _cuda_tests(p)]
    out, ok = {}, True
    for nb in nbs:
        r = subprocess.run([sys.executable, '-c', 'from nbdev.test import nbdev_test; nbdev_test()', '--flags', 'cuda',
                            '--path', nb], cwd=ROOT, capture_output=True, text=True)
        out[Path(nb).name] = True if r.returncode == 0 else _last_error(r.stdout + r.stderr)
        ok &= r.returncode == 0
        if r.returncode: print(r.stdout[-3000:], r.stderr[-3000:])
    if tests:
        r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', *tests], cwd=ROOT, capture_output=True,
                           text=True)
        out['pytest'] = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
        ok &= r.returncode == 0
        if r.returncode: print(r.stdout[-3000:], r.stderr[-2000:])
    return dict(ok=ok, notebooks=out, tests=[t.split('::')[-1] for t in tests])

def _cuda_tests(path):
    "Names of the test functions in `path` whose code has a CUDA branch"
    import ast
    src = Path(path).read_text()
    return [n.name for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name.startswith('test_')
            and 'cuda' in ast.get_source_segment(src, n)]

def check_train(dev, z, tmp, key):
    "Training steps of one seed architecture: reference recipe vs ours (bf16 + channels_last + compile), then reload"
    import torch
    from glr_nb.learner import bench_train
    arch, ref_bs = z['arches'][key]
    if _gpu(dev): torch.backends.cudnn.benchmark = True
    comp = key in z['compile']
    rows = bench_train(arch=arch, img=z['img'], steps=z['steps'], warmup=z['warmup'], batch=z['batch'],
                       num_classes=z['classes'], compile=comp, device=dev, ref_batch=ref_bs, bf16=True, eager=not comp)
    by = {r['config']: r for r in rows}
    ref, ours = by['reference'], by['ours+compile' if comp else 'ours']
    reload = _reload(arch, z, dev, tmp)
    return dict(ok=reload['max_abs_diff'] < 1e-3 and ours['img_per_s'] > 0, arch=arch, img=z['img'],
                img_per_s=ours['img_per_s'], batch=ours['batch'], ref_img_per_s=ref['img_per_s'],
                ref_batch=ref['batch'], ratio=round(ours['img_per_s'] / ref['img_per_s'], 2), compile=comp,
                peak_mem_mb=ours['peak_mem_mb'], compile_and_steps_s=ours['total_s'], **reload)

def _reload(arch, z, dev, tmp):
    "A bf16 + channels_last training step, a checkpoint of it, and the same embeddings after `load_model`"
    import torch
    from glr_nb.core import save_checkpoint
    from glr_nb.models import create_model, checkpoint_dict, load_model, LabelSmoothingLoss
    torch.manual_seed(0)
    model = create_model(arch, z['classes']).to(dev, memory_format=torch.channels_last)
    raw, opt = model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(z['batch'], 3, z['img'], z['img'], device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, z['classes'], (z['batch'],), device=dev)
    with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16):
        loss = LabelSmoothingLoss()(model(x, y)[0], y)
    loss.backward()
    opt.step()
    path = Path(tmp)/f'{arch}.pth'
    save_checkpoint(checkpoint_dict(raw, epoch=0.01), path)
    back = load_model(path, dev)
    raw.eval()
    with torch.no_grad():
        a, b = raw.extract_feature(x[:4].float()), back.extract_feature(x[:4].float().contiguous())
    return dict(loss=round(float(loss), 4), max_abs_diff=float((a - b).abs().max()))

def check_extract(dev, z, tmp):
    "Embedding extraction: the reference recipe (fp32, NCHW, batch 4) beside ours (bf16, channels_last, batched)"
    from glr_nb.retrieval import bench_extract
    arch = z['arches'][z['ext_arch']][0]
    rows = {r['recipe']: r for r in bench_extract(arch=arch, img=z['ext_img'], n=z['ext_n'], device=dev)}
    ref, ours = rows['reference'], rows['ours']
    cos = ours.get('cos_vs_reference')
    return dict(ok=ours['img_per_s'] > 0 and (cos is None or cos > 0.98), arch=arch, img=z['ext_img'], n=z['ext_n'],
                img_per_s=ours['img_per_s'], batch=ours['bs'], ref_img_per_s=ref['img_per_s'], ref_batch=ref['bs'],
                ratio=round(ours['img_per_s'] / ref['img_per_s'], 2), cos_vs_reference=cos)

def _unit(n, d, dev, seed):
    import torch
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(n, d, device=dev, generator=g)
    return (x / x.norm(dim=1, keepdim=True)).half()

def _sync(dev):
    import torch
    if _gpu(dev): torch.cuda.synchronize()

def check_knn(dev, z, tmp):
    "Exact inner-product kNN at GLDv2 size: seconds from host arrays and with the database resident on the device"
    import numpy as np, torch
    from glr_nb.retrieval import knn
    db, q = _unit(z['knn_db'], 512, dev, 0), _unit(z['knn_q'], 512, dev, 1)
    db_h, q_h = db.cpu().numpy(), q.cpu().numpy()
    backend = 'faiss' if _gpu(dev) and _has_faiss_gpu() else 'torch'
    knn(q_h[:64], db_h[:4096], 10, backend, device=dev)                      # warm-up (kernels, allocator)
    t = time.perf_counter()
    s, i = knn(q_h, db_h, 10, backend, device=dev)
    t_host = time.perf_counter() - t
    t_res = None
    if backend == 'torch':
        _sync(dev)
        t = time.perf_counter()
        knn(q, db, 10, 'torch', device=dev)
        _sync(dev)
        t_res = time.perf_counter() - t
    sub = np.random.default_rng(0).choice(len(q_h), z['knn_check'], replace=False)
    exact_i, how = _exact(q_h[sub], db_h, 10)
    same = float((i[sub] == exact_i).mean())
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i[sub], exact_i)]))
    rec = dict(ok=recall >= 0.99, backend=backend, n_db=len(db_h), n_query=len(q_h), dim=512, k=10,
               search_s=round(t_host, 3), resident_search_s=None if t_res is None else round(t_res, 3),
               target_s=1.0 if _gpu(dev) else None, same_ids=round(same, 4), recall_at_10=round(recall, 4),
               exact_by=how)
    del db, q, db_h, q_h
    if z['knn_big'] and backend == 'torch':
        n, nq = z['knn_big']
        db, q = _unit(n, 512, dev, 2), _unit(nq, 512, dev, 3)
        _sync(dev)
        t = time.perf_counter()
        knn(q, db, 10, 'torch', device=dev)
        _sync(dev)
        rec.update(big_n_db=n, big_n_query=nq, big_resident_search_s=round(time.perf_counter() - t, 3),
                   big_target_s=10.0)
    return rec

def _has_faiss_gpu():
    try:
        import faiss
        return hasattr(faiss, 'StandardGpuResources') and faiss.get_num_gpus() > 0
    except ImportError: return False

def _exact(q, db, k):
    "Exact fp32 top-k ids: faiss-cpu when importable, else NumPy in chunks"
    import numpy as np
    try:
        import faiss
        index = faiss.IndexFlatIP(db.shape[1])
        for s in range(0, len(db), 1 << 18): index.add(np.ascontiguousarray(db[s:s + (1 << 18)], dtype=np.float32))
        return index.search(np.ascontiguousarray(q, dtype=np.float32), k)[1], 'faiss-cpu'
    except ImportError:
        qf, best_s, best_i = q.astype(np.float32), None, None
        for s in range(0, len(db), 1 << 17):
            sc = qf @ db[s:s + (1 << 17)].astype(np.float32).T
            ix = np.argpartition(-sc, k - 1, axis=1)[:, :k] if sc.shape[1] > k else np.tile(np.arange(sc.shape[1]),
                                                                                            (len(q), 1))
            top = np.take_along_axis(sc, ix, 1)
            cs = top if best_s is None else np.concatenate([best_s, top], 1)
            ci = np.concatenate([best_i, ix + s], 1) if best_i is not None else ix + s
            o = np.argsort(-cs, 1, kind='stable')[:, :k]
            best_s, best_i = np.take_along_axis(cs, o, 1), np.take_along_axis(ci, o, 1)
        return best_i, 'numpy'

def check_rerank(dev, z, tmp):
    "SuperPoint + SuperGlue: the reference's per-pair loop beside our batched one, fp16 vs fp32; LightGlue and XFeat"
    from glr_nb.rerank import bench_rerank
    rows = bench_rerank(n_queries=z['rr_queries'], n_neighbours=z['rr_nb'], n_db=max(5, z['rr_queries'] * z['rr_nb']),
                        size=z['rr_size'], max_keypoints=z['rr_kp'], device=dev, sift=False, compare_fp32=_gpu(dev))
    by = {r['recipe']: r for r in rows}
    ref, ours = by['reference'], by['ours']
    agree = by.get('fp16_vs_fp32', {})
    learned = {n: by[n] for n in ('lightglue', 'xfeat')}                  # trained weights: real inliers expected
    ok = ours['pairs_per_s'] > 0 and (not _gpu(dev) or (agree.get('match_agreement') or 0) > 0.9)
    ok = ok and all(r['pairs_per_s'] > 0 and r['mean_inliers'] > 0 for r in learned.values())
    return dict(ok=ok, pairs=ours['pairs'], size=z['rr_size'], max_keypoints=z['rr_kp'],
                **{f'{n}_pairs_per_s': r['pairs_per_s'] for n, r in learned.items()},
                **{f'{n}_vs_reference': round(r['pairs_per_s'] / ref['pairs_per_s'], 2) for n, r in learned.items()},
                pairs_per_s=ours['pairs_per_s'], ref_pairs_per_s=ref['pairs_per_s'],
                ratio=round(ours['pairs_per_s'] / ref['pairs_per_s'], 2),
                estimator=ref.get('estimator'), fp16=ours.get('fp16'),
                **{k: v for k, v in agree.items() if k not in AGREE_SKIP})

def _demo_data(tmp):
    "A small demo dataset with its splits (built once per run)"
    d = Path(tmp)/'demo'
    if not (d/'split'/'v2c'/'random_valid_cv0.csv').is_file():
        from glr_nb.data import make_demo_dataset, make_splits
        make_demo_dataset(d, seed=0, n_landmarks=8, n_big=0, small_images=(4, 8), n_other=2, n_test=8, n_2019=0,
                          n_index=0)
        make_splits(d, seed=0, n_valid=8, min_images=4)
    return d

def check_ddp(dev, z, tmp):
    "torchrun --nproc_per_node N -m glr_nb.train: NCCL + SyncBN on GPUs (one rank per GPU), gloo on CPU"
    import torch
    n = torch.cuda.device_count() if _gpu(dev) else z['world']
    data = _demo_data(tmp)
    arch = z['arches']['r152'][0] if not _gpu(dev) else 'resnet18'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}', '-m', 'glr_nb.train',
           '--arch', arch, '--data_dir', str(data), '--result_dir', str(Path(tmp)/'ddp'), '--out_dir', 'ddp',
           '--epochs', '1', '--img_size', '64', '--eval_img_size', '64', '--batch_size', '4', '--save_every_epoch', '1',
           '--workers', '0', '--sync_bn', '--pretrained', 'none']
    r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    out = Path(tmp)/'ddp'/'models'/'ddp'
    ok = r.returncode == 0 and (out/'final.pth').is_file()
    if not ok: print(r.stdout[-3000:], r.stderr[-4000:])
    backend = 'nccl' if _gpu(dev) else 'gloo'
    return dict(ok=ok, world=n, backend=backend, sync_bn=_gpu(dev) and n > 1, arch=arch, command=shlex.join(cmd[2:]),
                error=None if ok else _last_error(r.stderr))

def _last_error(text):
    "The last line of `text` that names an error, else its last line with words"
    lines = [l.strip() for l in text.splitlines() if l.strip() and l.strip('=-* ')]
    return next((l for l in reversed(lines) if 'rror' in l), lines[-1] if lines else 'no output')[:300]

def check_papermill(dev, z, tmp):
    "papermill nbs/90_train.ipynb -p gpus N: the design card's path, ending with the loss and validation curves"
    import torch
    gpus = max(1, torch.cuda.device_count()) if _gpu(dev) else z['pm_gpus']
    out = Path(tmp)/'90_train_out.ipynb'
    params = ['-p', 'gpus', str(gpus), '-p', 'work_dir', str(Path(tmp)/'pm'), '-p', 'epochs', '1', '-p', 'img_size',
              '48', '-p', 'eval_img_size', '48', '-p', 'batch_size', '8']
    cmd = [sys.executable, '-m', 'papermill', str(ROOT/'nbs'/'90_train.ipynb'), str(out), '-k', 'python3', '--cwd',
           str(ROOT/'nbs'), *params]
    r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
    images = 0
    if out.is_file():
        nb = json.loads(out.read_text())
        images = sum('image/png' in o.get('data', {}) for c in nb['cells'] for o in c.get('outputs', []))
    ok = r.returncode == 0 and images >= 1
    if not ok: print(r.stdout[-2000:], r.stderr[-4000:])
    return dict(ok=ok, gpus=gpus, torchrun=gpus > 1, plots=images,
                error=None if ok else _last_error(r.stderr))


CHECKS = {'env': (check_env, 60), 'cuda_tests': (check_cuda_tests, 240)}
CHECKS |= {f'train_{k}': (lambda dev, z, tmp, k=k: check_train(dev, z, tmp, k), 300) for k in SEED_ARCHES}
CHECKS |= {'extract': (check_extract, 150), 'knn': (check_knn, 150), 'rerank': (check_rerank, 180),
           'ddp': (check_ddp, 180), 'papermill': (check_papermill, 240)}


# ---------------------------------------------------------------------------------------------------- running
def run_one(name, dev, tmp):
    "Run check `name` in this process and print its record"
    z = sizes(_gpu(dev))
    if name.startswith('train_') and name[6:] not in z['arches']:
        return emit(dict(check=name, ok=True, skipped=f'CPU mode times {len(z["arches"])} stand-in architectures'))
    t = time.perf_counter()
    try: rec = CHECKS[name][0](dev, z, tmp)
    except Exception as e:
        import traceback
        traceback.print_exc()
        rec = dict(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    emit(dict(check=name, device=_dev_name(dev), seconds=round(time.perf_counter() - t, 2), **rec))

def prewarm(names, dev, tmp):
    "Start compiling the training graphs to be timed (a process each, logged to tmp/prewarm_<arch>.log)"
    z = sizes(_gpu(dev))
    keys = [n[6:] for n in names if n.startswith('train_') and n[6:] in z['compile'] and n[6:] in z['arches']]
    if not _gpu(dev): return []
    code = ("import sys, torch; sys.path.insert(0, {root!r}); torch.backends.cudnn.benchmark = True\n"
            "from glr_nb.learner import bench_train\n"
            "bench_train(arch={arch!r}, img={img}, steps=1, warmup=1, batch={bs}, num_classes={nc}, "
            "compile=True, device='cuda', ref_batch={rb}, bf16=True, eager=False)")
    procs = []
    for k in keys:
        a, rb = z['arches'][k]
        log = open(Path(tmp)/f'prewarm_{k}.log', 'w')
        src = code.format(root=str(ROOT), arch=a, img=z['img'], bs=z['batch'], nc=z['classes'], rb=rb)
        procs.append(subprocess.Popen([sys.executable, '-c', src], cwd=tmp, stdout=log, stderr=log,
                                      start_new_session=True))
    return procs

def _wait(procs, limit):
    "Wait for the prewarm processes, at most `limit` seconds"
    t = time.perf_counter()
    for p in procs:
        try: p.wait(timeout=max(1, limit - (time.perf_counter() - t)))
        except subprocess.TimeoutExpired: os.killpg(p.pid, signal.SIGKILL)
    if procs: print(f"prewarm: compiled the training graphs ({time.perf_counter() - t:.0f}s waited, exit codes "
                    f"{[p.returncode for p in procs]})", flush=True)

def run_check(name, dev, out, tmp, limit):
    "Run one check in a fresh process with a time limit; append its record to `out` and return it"
    cmd = [sys.executable, __file__, '--one', name, '--device', dev, '--tmp', tmp]
    t = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try: so, se = p.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        so, se = p.communicate()
        se += f"\ntimed out after {limit:.0f}s"
    rec = next((json.loads(l[10:]) for l in reversed(so.splitlines()) if l.startswith('GPU_CHECK ')), None)
    if rec is None:
        rec = dict(check=name, ok=False, device=dev, seconds=round(time.perf_counter() - t, 2), error=_last_error(se))
    if not rec['ok']: sys.stderr.write(so[-3000:] + se[-3000:])
    with open(Path(out).with_suffix('.log'), 'a') as f: f.write(f"===== {name}\n{so}\n{se}\n")   # whole outputs
    with open(out, 'a') as f: f.write(json.dumps(rec) + '\n')
    keys = ('ratio', 'img_per_s', 'pairs_per_s', 'search_s', 'seconds', 'error', 'skipped')
    fig = {k: rec[k] for k in keys if rec.get(k) is not None}
    print(f"{'ok  ' if rec['ok'] else 'FAIL'} {name:12s} {json.dumps(fig)}", flush=True)
    return rec

UNTIMED = ('env', 'cuda_tests', 'ddp', 'papermill')   # run while the training graphs compile

def run_all(names, dev, out, tmp, budget):
    "Every check within `budget` seconds: untimed ones while training graphs compile, then the timed ones alone"
    t0, recs = time.perf_counter(), []
    left = lambda: budget - (time.perf_counter() - t0)
    warm = prewarm(names, dev, tmp)
    first = ['knn', 'extract', 'rerank', 'train_b7']                 # the figures with targets, before the other arches
    order = [n for n in names if n in UNTIMED] + [n for n in first if n in names] + \
            [n for n in names if n not in UNTIMED and n not in first]
    for name in order:
        if warm and name not in UNTIMED:
            _wait(warm, min(300, left() - 60))
            warm = []
        if left() < 20:
            rec = dict(check=name, ok=False, device=dev, seconds=0, error=f'not run: the {budget}s budget is spent')
            with open(out, 'a') as f: f.write(json.dumps(rec) + '\n')
            print(f"FAIL {name:12s} {rec['error']}", flush=True)
            recs.append(rec)
            continue
        slack = 1 if _gpu(dev) else 4          # CPU limits are hang guards on a possibly busy machine, far above idle
        recs.append(run_check(name, dev, out, tmp, min(CHECKS[name][1] * slack, left())))
    _wait(warm, 1)
    return recs

def main(argv=None):
    p = argparse.ArgumentParser(prog='gpu_check', description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default=None, help='cuda or cpu (default: cuda when visible)')
    p.add_argument('--out', default='gpu_check.jsonl', help='JSON-lines file to write (replaced)')
    p.add_argument('--only', default=None, help='comma-separated check names (see --list)')
    p.add_argument('--budget', type=float, default=None,
                   help='seconds for the whole run (default 480 on cuda, 2400 on cpu); checks past it are reported '
                        'as not run')
    p.add_argument('--list', action='store_true', help='list the checks and exit')
    p.add_argument('--one', default=None, help=argparse.SUPPRESS)
    p.add_argument('--tmp', default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.list: return print('\n'.join(f"{n:12s} {f.__doc__ or ''}" for n, (f, _) in CHECKS.items()))
    sys.path.insert(0, str(ROOT))
    dev = a.device
    if dev is None:
        import torch
        dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    if dev not in ('cuda', 'cpu'): p.error(f"--device {dev!r}: use cuda or cpu")
    if a.one: return run_one(a.one, dev, a.tmp or tempfile.mkdtemp(prefix='gpu_check_'))
    a.budget = a.budget or (480 if dev == 'cuda' else 2400)
    names = list(CHECKS) if not a.only else [n.strip() for n in a.only.split(',')]
    bad = [n for n in names if n not in CHECKS]
    if bad: p.error(f"unknown check(s) {bad}; see --list")
    out = Path(a.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text('')
    out.with_suffix('.log').write_text('')
    paths = [x for x in os.environ.get('PYTHONPATH', '').split(os.pathsep) if x]
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT)] + paths)}
    os.environ.update(env)
    with tempfile.TemporaryDirectory(prefix='gpu_check_') as tmp:
        for var, sub in (('TORCHINDUCTOR_CACHE_DIR', 'inductor'), ('TRITON_CACHE_DIR', 'triton')):
            os.environ.setdefault(var, str(Path(tmp)/sub))    # a fresh compile cache: nothing stale or half-written
        t = time.perf_counter()
        recs = run_all(names, dev, out, tmp, a.budget)
    failed = [r['check'] for r in recs if not r['ok']]
    print(f"{len(recs) - len(failed)}/{len(recs)} checks passed on {dev} in {time.perf_counter() - t:.0f}s -> {out}"
          + (f"; failed: {', '.join(failed)}" if failed else ''), flush=True)
    sys.exit(1 if failed else 0)

if __name__ == '__main__': main()
