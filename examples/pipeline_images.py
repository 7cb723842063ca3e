"""A three-stage image pipeline on shmipc.Pipeline, against the same code on
multiprocessing.Pool chained through imap.

What it shows: the stage functions below are plain numpy code that knows
nothing about processes. ``shmipc.Pipeline`` runs each stage in its own forked
workers and moves the images between them through shared-memory rings (the
array data is copied into the ring and out, never pickled; results come back
in source order). The standard-library version chains ``Pool.imap`` calls,
so every image travels worker -> parent -> worker through pipes, pickled, at
every stage. Both runs check their results against each other.

    decode     "encoded" image (row-delta coded uint8, 256x256x3) -> image
    transform  image -> grayscale float32, 2x2 downsampled, normalised
    reduce     -> (32-bin histogram, mean, std)

Run::

    .venv/bin/python examples/pipeline_images.py            # 2000 images
    .venv/bin/python examples/pipeline_images.py -n 500 --progress

With ``--progress`` the bar counts images done; after it, ``decode=91%`` is
how full the ring feeding the decode stage is (ring fill, not completion).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import time

import numpy as np

import shmipc

H, W = 256, 256
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# ---------------------------------------------------------------- the stages
def decode(encoded: np.ndarray) -> np.ndarray:
    """Undo the row-delta coding: each pixel was stored as its difference to
    the pixel on its left (mod 256)."""
    return np.cumsum(encoded, axis=1, dtype=np.uint8)


def transform(image: np.ndarray) -> np.ndarray:
    gray = image.astype(np.float32) @ LUMA                       # H x W
    small = gray.reshape(H // 2, 2, W // 2, 2).mean(axis=(1, 3))  # 2x2 blocks
    return (small - small.mean()) / (small.std() + 1e-6)


def reduce(features: np.ndarray) -> tuple[np.ndarray, float, float]:
    hist, _ = np.histogram(features, bins=32, range=(-4.0, 4.0))
    return hist, float(np.abs(features).mean()), float(features.max())


# ---------------------------------------------------------------- the data
def encoded_images(n: int, variety: int = 16):
    """n synthetic encoded images (a few distinct ones, each tagged with its
    index in its first byte so that order mistakes would show)."""
    rng = np.random.default_rng(0)
    base = []
    for _ in range(variety):
        yy, xx = np.mgrid[0:H, 0:W]
        img = np.stack([(xx * rng.uniform(0.2, 1) + yy * rng.uniform(0.2, 1)) % 256,
                        rng.integers(0, 256, size=(H, W)),
                        (xx ^ yy) % 256], axis=-1).astype(np.uint8)
        base.append(img)
    for i in range(n):
        img = base[i % variety].copy()
        img[0, 0, 0] = i % 256
        enc = np.diff(img, axis=1, prepend=np.zeros((H, 1, 3), np.uint8))   # uint8 wraps
        yield enc


# ---------------------------------------------------------------- the two runs
def run_shmipc(n: int, workers: int, progress: bool) -> tuple[float, list]:
    t0 = time.perf_counter()
    with shmipc.Pipeline(encoded_images(n)) as p:
        p.stage(decode, workers=workers)
        p.stage(transform, workers=workers)
        p.stage(reduce, workers=workers)
        results = list(p.results(progress=progress, desc="shmipc"))
    return time.perf_counter() - t0, results


def run_pool(n: int, workers: int) -> tuple[float, list]:
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(3 * workers) as pool:
        decoded = pool.imap(decode, encoded_images(n), chunksize=4)
        transformed = pool.imap(transform, decoded, chunksize=4)
        results = list(pool.imap(reduce, transformed, chunksize=4))
    return time.perf_counter() - t0, results


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x[0], y[0]) and x[1] == y[1] and x[2] == y[2] for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=2000, help="images")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="workers per stage (the Pool gets 3x this many)")
    ap.add_argument("--progress", action="store_true",
                    help="show the pipeline's progress bar (images done; after it, how full each "
                         "stage's input ring is)")
    args = ap.parse_args()

    size = H * W * 3
    print(f"{args.n} images of {H}x{W}x3 ({size >> 10} KiB), {args.workers} worker(s) per stage, "
          f"{os.cpu_count()} CPUs")
    t_pool, pool_results = run_pool(args.n, args.workers)
    print(f"multiprocessing.Pool, imap chained : {t_pool:6.2f} s  ({args.n / t_pool:8,.0f} images/s)")
    if args.progress:
        print("progress: images done of the total; 'decode=91%' after the bar is how full the ring "
              "feeding decode is (ring fill, not completion): a ring that stays full sits in front "
              "of the slowest stage")
    t_shm, shm_results = run_shmipc(args.n, args.workers, args.progress)
    print(f"shmipc.Pipeline                    : {t_shm:6.2f} s  ({args.n / t_shm:8,.0f} images/s)")
    if not same(pool_results, shm_results):
        raise SystemExit("results differ between the two runs!")
    print(f"results identical; speed-up {t_pool / t_shm:.1f}x")


if __name__ == "__main__":
    main()
