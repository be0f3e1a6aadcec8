#!/bin/bash
# Paths are relative to the repository root; runs/demo1 comes from `anymc3d demo --out runs/demo1 --epochs 6`.
# Issue 4 measurements: localisation on the test-split positives of the 32^3 lesion_binary phantoms.
set -e
export OMP_NUM_THREADS=1
M=runs/demo1/data/manifest.csv
R=runs/explain4
anymc3d explain $R/cnn20 $M --split test --positives-only --out $R/loc_test_cnn
anymc3d explain $R/cnn20 $M --split test --positives-only --smooth-mm 2 --no-figure --out $R/loc_test_cnn_smooth2
anymc3d explain $R/cnn20 $M --split test --positives-only --cam-layers last --no-figure --out $R/loc_test_cnn_last
anymc3d explain runs/demo1/plugin $M --split test --positives-only --no-figure --out $R/loc_test_demo1
anymc3d explain $R/vitreg_random $M --weights random --split test --positives-only --out $R/loc_test_vit_attention
anymc3d explain $R/vitreg_random $M --weights random --split test --positives-only --method gradcam --no-figure --out $R/loc_test_vit_gradcam
