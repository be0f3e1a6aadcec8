"""Time one heatmap for a 64-slice volume (64^3 lesion phantom), warm model, median of 3 runs."""
import statistics, sys, time
import torch
torch.set_num_threads(1)
import anymc3d
from anymc3d.explain import Explainer
from anymc3d.synthetic import make_task
from anymc3d.volume import Volume

ds = make_task("lesion_binary", 2, size=64, seed=1)
i = int(ds.labels.argmax())
vol = Volume(ds.images["image"][i], ds.affine, {"path": "phantom64.nii.gz"})
for plugin, weights, method in [a.split(",") for a in sys.argv[1:]]:
    pred = anymc3d.load(plugin, weights=weights or None)
    ex = Explainer(pred, method=method)
    pred.predict(vol)  # warm-up
    tp = []
    for _ in range(3):
        t = time.perf_counter(); pred.predict(vol); tp.append(time.perf_counter() - t)
    th = []
    for _ in range(3):
        hm = ex.explain(vol); th.append(hm.seconds)
    print(f"{plugin} ({pred.spec.backbone}, size {pred.spec.preprocess['image']['size']}, {ex.method}): "
          f"{len(hm.slice_weights['image:axial'])} slices, shape {hm.maps['present'].shape}; "
          f"heatmap {statistics.median(th):.2f} s (runs {', '.join(f'{t:.2f}' for t in th)}); "
          f"prediction alone {statistics.median(tp):.2f} s", flush=True)
