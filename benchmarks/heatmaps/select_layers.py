import sys, os, numpy as np, torch
torch.set_num_threads(1)
from anymc3d.predict import load
from anymc3d.data import load_manifest
from anymc3d.explain import Explainer, load_mask, localization_scores
pred = load(os.environ.get('PLUGIN', 'runs/demo1/plugin'))
if 'PLUGIN' not in os.environ:
    ck = torch.load('runs/explain4/cnn20/checkpoint.pt', map_location='cpu', weights_only=True)
    pred.model.load_trainable_state(ck['best_state']); print('epoch', ck['epoch'])
task = load_manifest('runs/demo1/data/manifest.csv')
cases = [c for c in task.cases if c.split == os.environ.get('SPLIT','val') and int(c.label[0]) == 1]
for layers in sys.argv[1:]:
    ex = Explainer(pred, cam_layers=layers); rows=[]
    for c in cases:
        hm = ex.explain(c); m = load_mask(c.mask, hm.record)
        sc = localization_scores(hm.maps['present'], m); rows.append([sc['pointing_game'], sc['energy_in_mask'], sc['auroc']])
    r = np.array(rows); print(f"{layers:28s}", 'PG %.3f EN %.3f AUC %.3f' % tuple(r.mean(0)), r[:,0].astype(int).tolist(), flush=True)
