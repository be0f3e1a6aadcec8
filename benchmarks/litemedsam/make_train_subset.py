"""The stratified 300-case training subset of AdrenalMNIST3D 28³ used in docs/results.md (issue 18).

    python benchmarks/litemedsam/make_train_subset.py ../shared/data/medmnist3d/adrenalmnist3d.npz \
        runs/bench-medsam/adrenalmnist3d_train300.npz

Keeps val and test untouched; draws round(300 * class share) training cases per class with
``numpy.random.default_rng(0)`` (235 negatives, 65 positives), in their original order.
"""
import sys

import numpy as np


def main(src: str, dst: str, n: int = 300, seed: int = 0) -> None:
    d = np.load(src)
    y = d["train_labels"][:, 0]
    rng = np.random.default_rng(seed)
    idx = []
    for c in (0, 1):
        ii = np.flatnonzero(y == c)
        idx += list(rng.choice(ii, round(n * len(ii) / len(y)), replace=False))
    idx = np.sort(np.array(idx))
    out = {k: d[k] for k in d.files}
    out["train_images"], out["train_labels"] = d["train_images"][idx], d["train_labels"][idx]
    np.savez_compressed(dst, **out)
    print(f"{dst}: {len(idx)} training cases, per class {np.bincount(y[idx]).tolist()}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
