"""Extraction and re-rank sharded over 2 gloo ranks on the CPU equal one process, also after a lost rank's part.

`cached_extract` and `verify_pairs` are what `glr_extract` and `run_submit` (`list_inliers`) call under torchrun.
The images are written by the test: random shapes, and for each a shifted crop, so SIFT finds real inliers."""
import numpy as np
import torch
import torch.multiprocessing as mp
from tiny_net import Net

N_IMG, CHUNK, KEY = 10, 3, dict(v=1)


def write_images(d):
    "N_IMG images of random shapes, then a shifted crop of each: paths, ids and (image, crop) pairs"
    import cv2
    rng = np.random.default_rng(0)
    ims = []
    for _ in range(N_IMG):
        im = np.full((200, 200, 3), 255, np.uint8)
        for _ in range(25):
            c = tuple(int(v) for v in rng.integers(0, 255, 3))
            x, y, r = (int(v) for v in rng.integers([10, 10, 3], [190, 190, 25]))
            if rng.random() < .5: cv2.circle(im, (x, y), r, c, -1)
            else: cv2.rectangle(im, (x, y), (x + r, y + 2*r), c, -1)
        ims.append(im)
    ims += [im[15:185, 10:190] for im in ims]
    ids = [f'{i:016x}' for i in range(2 * N_IMG)]
    paths = [str(d/f'{i}.png') for i in ids]
    for p, im in zip(paths, ims):
        cv2.imwrite(p, im)
    pairs = [(paths[i], paths[i + N_IMG]) for i in range(N_IMG)]                  # an image and its crop
    pairs += [(paths[i], paths[i + N_IMG + 1]) for i in range(N_IMG - 1)]         # an image and another's crop
    return paths, ids, pairs


def job(d, rank=None, world=None):
    "Embeddings and inlier counts of the test set with caches under `d` (rank/world: a manual shard)"
    from glr_nb.retrieval import cached_extract
    from glr_nb.rerank import verify_pairs
    paths, ids, pairs = write_images.cache
    emb = cached_extract(Net(), paths, ids, d/'emb.npy', KEY, img_size=32, bs=4, device='cpu', chunk=CHUNK,
                         rank=rank, world=world, progress=False)
    inl = verify_pairs(pairs, 'sift', cache=str(d/'rerank.sqlite'), size=200, workers=1, chunk=4,
                       rank=rank, world_size=world)
    return emb, inl


def worker(rank, d, shared):
    "One gloo rank: join the group, run `job`, rank 0 saves what every rank returned"
    torch.set_num_threads(1)
    write_images.cache = shared
    torch.distributed.init_process_group('gloo', init_method=f'file://{d}/pg', rank=rank, world_size=2)
    try:
        emb, inl = job(d)
        np.save(d/f'inliers{rank}.npy', inl)
        if rank == 0: np.save(d/'emb_group.npy', np.asarray(emb[0]))
    finally: torch.distributed.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path):
    from glr_nb.retrieval import load_embeddings, cache_state
    (tmp_path/'img').mkdir()
    write_images.cache = shared = write_images(tmp_path/'img')
    one = tmp_path/'one'
    emb1, inl1 = job(one)
    emb1 = np.asarray(emb1[0])
    assert (inl1[:N_IMG] >= 15).all(), f"an image and its crop should match well: {inl1}"
    assert emb1.shape == (2 * N_IMG, 8) and emb1.any(1).all(), "every image is embedded"

    two = tmp_path/'two'
    got = job(two, rank=0, world=2)                        # rank 0 alone: rank 1's part is lost
    assert got[0] is None, "a cache with rank 1's chunks missing is never returned"
    assert cache_state(two/'emb.npy', KEY, shared[1], 8, CHUNK)[1] == [0, 2, 4, 6], "rank 0 wrote its chunks"
    mp.spawn(worker, args=(two, shared), nprocs=2, join=True)   # the rerun of both ranks completes it

    want, ids = load_embeddings(two/'emb.npy', KEY, shared[1])
    np.testing.assert_array_equal(np.asarray(want), emb1, "merged embeddings equal one process's")
    np.testing.assert_array_equal(np.load(two/'emb_group.npy'), emb1, "rank 0 returns the complete cache")
    for r in range(2):
        np.testing.assert_array_equal(np.load(two/f'inliers{r}.npy'), inl1, f"rank {r}: counts equal one process's")
    assert not list(two.glob('rerank.sqlite.rank*')), "rank 0 merged and removed every shard file"
