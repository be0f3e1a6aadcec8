#!/bin/bash
# Issue 18: the frozen probes (axial `linear_probe` and `linear_probe_3view`, which share one feature
# cache) of TinyViT (LiteMedSAM) and EfficientNet-Lite0 on synthetic tasks, 32² slices, seed 0.
# TinyViT takes ~14 min per task on one CPU thread (fp32 features, 160 volumes x 96 slices).
# METHODS="plugin_lastk1_3view" runs the shared-trunk three-view plugin instead (8 epochs, no
# augmentation; TinyViT ~25-32 min per task, ~58 min for the two-input t2_only, most of it the trunk pass).
#   R=runs/litemedsam_syn TASKS="elongated lesion_small lesion_types" bash benchmarks/litemedsam/synthetic_probes.sh
set -e
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
R=${R:-runs/litemedsam_syn}
for t in ${TASKS:-elongated lesion_small lesion_types}; do
  for bb in efficientnet_lite0 litemedsam_tinyvit; do
    anymc3d bench synthetic --tasks $t --methods ${METHODS:-linear_probe,linear_probe_3view} --backbone $bb --size 32 \
        --epochs 8 --set augment=false --seeds 1 --quiet --out $R/synprobe_$bb
  done
done
