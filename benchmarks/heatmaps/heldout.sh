#!/bin/bash
# Issue 4, a larger held-out check of the localisation target: 160 fresh lesion phantoms generated
# exactly like the demo's (32^3, lesion radius 3, noise 10) with another seed (101), never seen in
# training or in the layer/smoothing choice; all positives (~80) are scored.
#   R=runs/explain4 bash benchmarks/heatmaps/heldout.sh   (R holds the cnn20 plugin, see measure.sh)
set -e
export OMP_NUM_THREADS=1
R=${R:-runs/explain4}
python -c "from anymc3d.synthetic import make_task, write_task; \
write_task(make_task('lesion_binary', 160, seed=101, size=32), '$R/heldout101', seed=101)"
M=$R/heldout101/manifest.csv
anymc3d explain $R/cnn20 $M --positives-only --no-figure --out $R/heldout_default
anymc3d explain $R/cnn20 $M --positives-only --no-figure --smooth-mm 2 --out $R/heldout_smooth2
