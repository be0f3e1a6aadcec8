import sys, os, numpy as np, torch
torch.set_num_threads(1)
from anymc3d.predict import load
from anymc3d.data import load_manifest
from anymc3d.explain import Explainer, load_mask, localization_scores
pred = load('runs/explain4/cnn20')
task = load_manifest('runs/demo1/data/manifest.csv')
cases = [c for c in task.cases if c.split == os.environ.get('SPLIT','val') and int(c.label[0]) == 1]
for arg in sys.argv[1:]:
    layers, sm = arg.split(',')
    ex = Explainer(pred, cam_layers=layers, smooth_mm=float(sm)); rows=[]
    for c in cases:
        hm = ex.explain(c); m = load_mask(c.mask, hm.record)
        sc = localization_scores(hm.maps['present'], m); sc2 = localization_scores(hm.maps['present'], m, 2.0, (1,1,1))
        rows.append([sc['pointing_game'], sc['energy_in_mask'], sc['auroc'], sc2['pointing_game']])
    r = np.array(rows); print(f"{arg:28s}", 'PG %.3f EN %.3f AUC %.3f PG@2mm %.3f' % tuple(r.mean(0)), r[:,0].astype(int).tolist(), flush=True)
