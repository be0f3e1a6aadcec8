"""Out-of-distribution score of a prediction: how far its pooled embedding lies from the training ones.

**Embeddings.** Each stream's (input x view) pooled embedding, the vector the task query makes of the
slice embeddings, is read at prediction through forward hooks on the model's pooling modules
(:class:`EmbeddingCapture`): no second pass and no change to the model's outputs. The hook also
keeps the plain mean of the slice embeddings (``slice_mean``), the alternative feature.

**Reference (stored in the plugin).** Per stream: the mean and a Ledoit-Wolf shrinkage covariance
(scikit-learn) of the training embeddings, stored as its top ``k`` eigenvectors and eigenvalues plus
one isotropic variance for the remaining directions (the mean of the remaining eigenvalues; the
shrinkage already pulls them towards one value). For EfficientNet-Lite0 (D = 1280) and k = 32 that is
about 170 kB per stream in float32, where the full covariance would be 6.5 MB.

**Score.** The squared Mahalanobis distance under that covariance divided by D (about 1 for a
training-like case), averaged over the streams a case has. The flag threshold is a percentile
(99th by default) of the validation cases' scores, which the plugin stores with the scores
themselves, so every answer also carries the score's percentile among validation cases.

The k-NN distance (:func:`knn_scores`) is kept as the comparison ``benchmarks/trust.py`` measures:
it needs the training embeddings themselves (6 MB per stream for 1188 cases), which is what the
compact reference avoids.
"""
from __future__ import annotations

import numpy as np
import torch

#: eigen-directions kept per stream
DEFAULT_K = 32
#: validation percentile above which a case is flagged
DEFAULT_PERCENTILE = 99.0
FEATURES = ("task_query", "slice_mean")


class EmbeddingCapture:
    """Within: every forward of ``model`` records each stream's pooled embedding (task query) and the
    mean of its slice embeddings; :meth:`take` returns them per stream as (N, D) arrays, in call order
    (NaN rows for a batch without that stream)."""

    def __init__(self, model) -> None:
        self.model = model
        self.handles: list = []
        self.rows: list[dict] = []
        self._open: dict = {}

    def __enter__(self) -> "EmbeddingCapture":
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
        slices as they are last (``Runtime.forward``); the embedding kept is that last pass's."""
        return 1 + len(getattr(self.model.spec, "test_flips", None) or [])

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


def predict_with_embeddings(runtime, cases, batch_size: int = 4) -> tuple[np.ndarray, list[dict], EmbeddingCapture]:
    """``runtime.predict`` plus the capture of every case's pooled embeddings."""
    with EmbeddingCapture(runtime.model) as cap:
        probs, outs = runtime.predict(cases, batch_size)
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


def combined_score(refs: dict[str, dict], emb: dict[str, np.ndarray]) -> np.ndarray:
    """Mean over a case's streams of the per-stream score (streams the case lacks are left out)."""
    per = np.stack([mahalanobis(refs[s], emb[s]) for s in refs], axis=1)
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.where(np.isfinite(per), per, np.nan), axis=1)


def knn_scores(train: np.ndarray, x: np.ndarray, k: int = 5) -> np.ndarray:
    """Mean cosine distance to the k nearest training embeddings (the comparison method)."""
    t = np.asarray(train, dtype=np.float64)
    t = t / np.linalg.norm(t, axis=1, keepdims=True).clip(1e-12)
    q = np.asarray(x, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
    d = 1.0 - q @ t.T
    k = min(k, t.shape[0])
    return np.sort(d, axis=1)[:, :k].mean(axis=1)


def percentile_of(val_scores: np.ndarray, s: float) -> float:
    """Percent of validation cases whose score is <= s."""
    v = np.asarray(val_scores, dtype=np.float64).ravel()
    return float(100.0 * np.mean(v <= s)) if len(v) else float("nan")


def ood_threshold(val_scores: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> float:
    return float(np.percentile(np.asarray(val_scores, dtype=np.float64), percentile))


def to_tensors(refs: dict[str, dict], prefix: str = "trust.ood.") -> dict[str, torch.Tensor]:
    return {f"{prefix}{s}.{k}": torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
            for s, r in refs.items() for k, v in r.items()}


def from_tensors(tensors: dict[str, torch.Tensor], streams: list[str], prefix: str = "trust.ood.") -> dict[str, dict]:
    refs = {}
    for s in streams:
        keys = ("mean", "basis", "eigvals", "resid")
        if all(f"{prefix}{s}.{k}" in tensors for k in keys):
            refs[s] = {k: tensors[f"{prefix}{s}.{k}"].float().numpy() for k in keys}
    return refs
