#!/bin/bash
# Issue 18: the frozen probes (axial `linear_probe` and `linear_probe_3view`, which share one feature
# cache) of TinyViT (LiteMedSAM) and EfficientNet-Lite0 on synthetic tasks, 32² slices, seed 0.
# TinyViT takes ~14 min per task on one CPU thread (fp32 features, 160 volumes x 96 slices).
#   R=runs/litemedsam_syn TASKS="elongated lesion_small lesion_types" bash benchmarks/litemedsam/synthetic_probes.sh
set -e
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
R=${R:-runs/litemedsam_syn}
for t in ${TASKS:-elongated lesion_small lesion_types}; do
  for bb in efficientnet_lite0 litemedsam_tinyvit; do
    anymc3d bench synthetic --tasks $t --methods linear_probe,linear_probe_3view --backbone $bb --size 32 --seeds 1 \
        --quiet --out $R/synprobe_$bb
  done
done
