"""Out-of-distribution score of a prediction: how far its pooled embedding lies from the training ones.

**Embeddings.** Each stream's (input x view) pooled embedding, the vector the task query makes of the
slice embeddings, is read at prediction through forward hooks on the model's pooling modules
(:class:`EmbeddingCapture`): no second pass and no change to the model's outputs. The hook also
keeps the plain mean of the slice embeddings (``slice_mean``), the alternative feature.

**Reference (stored in the plugin).** Per stream, the method chosen on validation
(:data:`DEFAULT_METHOD`, docs/results.md "Trust in each answer"): ``knn_cosine``, the L2-normalised
training embeddings summarised by :data:`DEFAULT_REFERENCE_POINTS` k-means centroids (scikit-learn),
re-normalised and kept in float16. For EfficientNet-Lite0 (D = 1280) that is 160 kB per stream, where
the training embeddings themselves would be 6 MB for 1188 cases.

**Score.** The cosine distance to the nearest :data:`DEFAULT_NEIGHBOURS` reference points, averaged
over the streams a case has. It ignores an embedding's length, which is why it flags a case whose
embedding is short (a 4x larger field of view shrinks the gland; its pooled embedding lies near the
training mean, where a Mahalanobis distance calls it typical). The flag threshold is the split-conformal
99 % quantile (:func:`ood_threshold`) of the validation cases' scores together with the training cases'
cross-fitted scores (:func:`cross_fitted_scores`: each fold scored against the reference of the other
folds, so a training case is scored as a new case is). Validation alone is too few cases for the
tail the threshold sits in (98 on AdrenalMNIST3D: the largest score, whose false-flag rate exceeds 2 %
with probability 14 %); with the training cases it is 1286 (docs/results.md, "The OOD threshold on
the training cases too"). The plugin stores the validation scores, so every answer also carries the
score's percentile among validation cases.

The Ledoit-Wolf Mahalanobis reference (:func:`fit_reference`: mean, top ``k`` eigen-directions and
one residual variance) was the first stored method; plugins written with it still score with it
(:func:`stream_score` reads which one a stream holds), and ``benchmarks/trust.py`` measures both.
"""
from __future__ import annotations

import numpy as np
import torch

#: eigen-directions kept per stream
DEFAULT_K = 32
#: the stored OOD method (chosen on validation; see the module docstring)
DEFAULT_METHOD = "knn_cosine"
#: k-means centroids of the normalised training embeddings kept per stream
DEFAULT_REFERENCE_POINTS = 64
#: nearest reference points whose cosine distances are averaged
DEFAULT_NEIGHBOURS = 1
#: validation percentile above which a case is flagged
DEFAULT_PERCENTILE = 99.0
FEATURES = ("task_query", "slice_mean")


class EmbeddingCapture:
    """Within: every forward of ``model`` records each stream's pooled embedding (task query) and the
    mean of its slice embeddings; :meth:`take` returns them per stream as (N, D) arrays, in call order
    (NaN rows for a batch without that stream).

    The passes per batch are the plugin's test-time flips when the capture starts: a caller that turns
    the flips off for its passes (the OOD reference's pass over the training cases) and back on before
    :meth:`take` still gets every case's row."""

    def __init__(self, model) -> None:
        self.model = model
        self.handles: list = []
        self.rows: list[dict] = []
        self._open: dict = {}
        self._passes = self._spec_passes()

    def _spec_passes(self) -> int:
        return 1 + len(getattr(self.model.spec, "test_flips", None) or [])

    def __enter__(self) -> "EmbeddingCapture":
        self._passes = self._spec_passes()
        for s in self.model.streams:
            mod = self.model.slice_pool[s.replace(":", "__")]
            self.handles.append(mod.register_forward_hook(self._pool_hook(s)))
        self.handles.append(self.model.head.register_forward_pre_hook(self._close))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _pool_hook(self, stream: str):
        def hook(_mod, inputs, output):
            h = inputs[0].detach().float()
            mask = inputs[1] if len(inputs) > 1 else None
            if mask is None:
                mean = h.mean(dim=1)
            else:
                m = mask.to(h.device).float().unsqueeze(-1)
                mean = (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
            self._open[stream] = {"task_query": output[0].detach().float().cpu().numpy(),
                                  "slice_mean": mean.cpu().numpy()}
        return hook

    def _close(self, _mod, inputs):
        b = inputs[0].shape[0]
        self.rows.append({"n": b, **self._open})
        self._open = {}

    @property
    def passes(self) -> int:
        """Forward passes per batch: a plugin with test-time flips runs the flipped slices first and the
        slices as they are last (``Runtime.forward``); the embedding kept is that last pass's. Fixed when
        the capture starts (a later change of the spec's flips does not reinterpret the rows)."""
        return self._passes

    def batches(self) -> list[dict]:
        k = self.passes
        return self.rows[k - 1::k]

    def take(self, feature: str = "task_query") -> dict[str, np.ndarray]:
        out = {}
        for s in self.model.streams:
            parts = []
            for r in self.batches():
                if s in r:
                    parts.append(r[s][feature])
                else:
                    parts.append(np.full((r["n"], self.model.backbone.embed_dim), np.nan, dtype=np.float32))
            out[s] = np.concatenate(parts) if parts else np.zeros((0, self.model.backbone.embed_dim), np.float32)
        return out

    def clear(self) -> None:
        self.rows = []
        self._open = {}


def predict_with_embeddings(runtime, cases, batch_size: int = 4,
                            flips: bool = True) -> tuple[np.ndarray, list[dict], EmbeddingCapture]:
    """``runtime.predict`` plus the capture of every case's pooled embeddings. ``flips=False``: the
    plugin's test-time flips are off for this pass (the embeddings are those a prediction is scored by,
    its unflipped pass's, at a fraction of the cost; the probabilities are then the unflipped ones)."""
    spec = runtime.model.spec
    kept = spec.test_flips
    if not flips:
        spec.test_flips = []
    try:
        with EmbeddingCapture(runtime.model) as cap:
            probs, outs = runtime.predict(cases, batch_size)
    finally:
        spec.test_flips = kept
    for s in runtime.model.streams:  # a stream a case lacks has no embedding (NaN rows, skipped by the score)
        absent = np.array([not o["present"].get(s, False) for o in outs])
        for feat in FEATURES:
            _mask_rows(cap, s, feat, absent)
    return probs, outs, cap


def _mask_rows(cap: EmbeddingCapture, stream: str, feature: str, absent: np.ndarray) -> None:
    i = 0
    for r in cap.batches():
        n = r["n"]
        if stream in r and absent[i:i + n].any():
            r[stream][feature] = r[stream][feature].copy()
            r[stream][feature][absent[i:i + n]] = np.nan
        i += n


# --------------------------------------------------------------------------- reference and score
def fit_reference(x: np.ndarray, k: int = DEFAULT_K) -> dict[str, np.ndarray]:
    """Mean, top-k eigenvectors/eigenvalues and residual variance of the Ledoit-Wolf covariance of x (N, D)."""
    from sklearn.covariance import LedoitWolf

    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x).all(axis=1)]
    if len(x) < 3:
        raise ValueError(f"an OOD reference needs at least 3 embeddings, got {len(x)}")
    lw = LedoitWolf().fit(x)
    vals, vecs = np.linalg.eigh(lw.covariance_)
    vals, vecs = vals[::-1], vecs[:, ::-1]
    k = int(min(k, x.shape[1] - 1))
    resid = float(max(vals[k:].mean(), 1e-12))
    return {"mean": lw.location_.astype(np.float32), "basis": np.ascontiguousarray(vecs[:, :k].T).astype(np.float32),
            "eigvals": np.maximum(vals[:k], resid).astype(np.float32), "resid": np.array([resid], np.float32)}


def mahalanobis(ref: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance / D of each row of x under the low-rank + isotropic covariance (NaN rows -> NaN)."""
    x = np.asarray(x, dtype=np.float64)
    d = x - np.asarray(ref["mean"], dtype=np.float64)
    proj = d @ np.asarray(ref["basis"], dtype=np.float64).T
    resid = float(np.asarray(ref["resid"]).ravel()[0])
    inside = (proj ** 2 / np.asarray(ref["eigvals"], dtype=np.float64)).sum(axis=1)
    outside = np.maximum((d ** 2).sum(axis=1) - (proj ** 2).sum(axis=1), 0.0) / resid
    return (inside + outside) / x.shape[1]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def fit_knn_reference(x: np.ndarray, points: int = DEFAULT_REFERENCE_POINTS, neighbours: int = DEFAULT_NEIGHBOURS,
                      seed: int = 0) -> dict[str, np.ndarray]:
    """The ``knn_cosine`` reference of x (N, D): at most ``points`` unit vectors (k-means centroids of the
    normalised rows, re-normalised; the rows themselves when there are no more than ``points``), float16."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x).all(axis=1)]
    if len(x) < 3:
        raise ValueError(f"an OOD reference needs at least 3 embeddings, got {len(x)}")
    u = _unit(x)
    if len(u) > points:
        from sklearn.cluster import KMeans

        u = _unit(KMeans(n_clusters=int(points), n_init=3, random_state=seed).fit(u).cluster_centers_)
    return {"points": u.astype(np.float16), "neighbours": np.array([int(neighbours)], np.float32)}


def knn_distance(ref: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Mean cosine distance of each row of x to its nearest reference points (NaN rows -> NaN)."""
    t = np.asarray(ref["points"], dtype=np.float64)
    k = int(min(int(np.asarray(ref["neighbours"]).ravel()[0]), len(t)))
    d = 1.0 - _unit(x) @ _unit(t).T
    return np.sort(d, axis=1)[:, :k].mean(axis=1)


def stream_score(ref: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """One stream's score under whichever reference it stores (k-NN points or the Mahalanobis reference)."""
    return knn_distance(ref, x) if "points" in ref else mahalanobis(ref, x)


def combined_score(refs: dict[str, dict], emb: dict[str, np.ndarray]) -> np.ndarray:
    """Mean over a case's streams of the per-stream score (streams the case lacks are left out)."""
    per = np.stack([stream_score(refs[s], emb[s]) for s in refs], axis=1)
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.where(np.isfinite(per), per, np.nan), axis=1)


#: folds of the training embeddings' cross-fitted scores (the OOD threshold's training part)
DEFAULT_FOLDS = 5


def cross_fitted_scores(emb: dict[str, np.ndarray], points: int = DEFAULT_REFERENCE_POINTS,
                        neighbours: int = DEFAULT_NEIGHBOURS, folds: int = DEFAULT_FOLDS, seed: int = 0) -> np.ndarray:
    """Each training case's score as a new case's: the cases (rows of every stream's (N, D) embeddings)
    are split into ``folds`` random folds, and each fold is scored (:func:`combined_score`) against the
    ``knn_cosine`` reference fitted on the other folds. A stream with fewer than 3 finite rows outside a
    fold is left out of that fold's score; NaN where a case has no stream scored. Fewer than 4 cases:
    every score NaN (no fold has a reference)."""
    n = len(next(iter(emb.values()))) if emb else 0
    out = np.full(n, np.nan)
    k = min(int(folds), n)
    if n < 4 or k < 2:
        return out
    fold = np.random.default_rng(seed).permutation(n) % k
    for f in range(k):
        rest, held = fold != f, fold == f
        refs = {s: fit_knn_reference(x[rest], points, neighbours, seed) for s, x in emb.items()
                if np.isfinite(x[rest]).all(axis=1).sum() >= 3}
        if refs:
            out[held] = combined_score(refs, {s: emb[s][held] for s in refs})
    return out


def knn_scores(train: np.ndarray, x: np.ndarray, k: int = 5) -> np.ndarray:
    """Mean cosine distance to the k nearest of all the training embeddings given (the uncompressed comparison)."""
    return knn_distance({"points": _unit(train), "neighbours": np.array([k])}, x)


def percentile_of(val_scores: np.ndarray, s: float) -> float:
    """Percent of validation cases whose score is <= s."""
    v = np.asarray(val_scores, dtype=np.float64).ravel()
    return float(100.0 * np.mean(v <= s)) if len(v) else float("nan")


def ood_threshold(val_scores: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> float:
    """The split-conformal quantile of the held-out scores (validation, and the training cases' cross-fitted
    ones): the ceil((n + 1) p / 100)-th smallest (the largest when n is too small for it). A new case
    like the validation ones then scores above it with probability at most 1 - p / 100 (at most 1 / (n + 1) when the largest is used): the false-flag
    rate is bounded whatever the number of validation cases, which a plain percentile is not."""
    v = np.sort(np.asarray(val_scores, dtype=np.float64).ravel())
    v = v[np.isfinite(v)]
    if not len(v):
        raise ValueError("an OOD threshold needs at least one finite validation score")
    k = int(np.ceil((len(v) + 1) * float(percentile) / 100.0))
    return float(v[min(max(k, 1), len(v)) - 1])


#: the tensors each kind of stream reference stores
REFERENCE_KEYS = (("points", "neighbours"), ("mean", "basis", "eigvals", "resid"))


def to_tensors(refs: dict[str, dict], prefix: str = "trust.ood.") -> dict[str, torch.Tensor]:
    """float16 reference points stay float16 (half the bytes); everything else is float32."""
    return {f"{prefix}{s}.{k}": torch.from_numpy(np.ascontiguousarray(
                v, dtype=np.float16 if np.asarray(v).dtype == np.float16 else np.float32))
            for s, r in refs.items() for k, v in r.items()}


def from_tensors(tensors: dict[str, torch.Tensor], streams: list[str], prefix: str = "trust.ood.") -> dict[str, dict]:
    refs = {}
    for s in streams:
        for keys in REFERENCE_KEYS:
            if all(f"{prefix}{s}.{k}" in tensors for k in keys):
                refs[s] = {k: tensors[f"{prefix}{s}.{k}"].float().numpy() for k in keys}
                break
    return refs
