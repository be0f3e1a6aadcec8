#!/bin/bash
# Issue 18: TinyViT (LiteMedSAM) against EfficientNet-Lite0 on the synthetic `lesion_binary` task, one
# recipe for both: the shared-trunk plugin `plugin_lastk1` (LoRA on the last stage + task query, axial,
# 64² slices, no augmentation, 15 epochs, seed 0) trained by `anymc3d bench`, then its heatmaps scored
# by `anymc3d explain` (pointing game, energy in mask, voxel AUROC, and a random map) on the task's test
# positives, and the CNN's also on 80 held-out positives made like benchmarks/heatmaps/heldout.sh.
# TinyViT is trained twice: with its default slice-embedding normalisation (embed_norm auto =
# center_scale, docs/method.md) and without it (embed_norm=none: the plugin that did not learn), see
# docs/results.md. One thread per job; the TinyViT cells take ~40-60 min each on one CPU core.
#   R=runs/litemedsam_loc bash benchmarks/litemedsam/localization.sh
set -e
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
R=${R:-runs/litemedsam_loc}
P="--tasks lesion_binary --methods plugin_lastk1 --size 64 --epochs 15 --set augment=false --seeds 1 --quiet"
anymc3d bench synthetic $P --backbone efficientnet_lite0 --out $R/syn_efficientnet_lite0
anymc3d bench synthetic $P --backbone litemedsam_tinyvit --out $R/syn_litemedsam_tinyvit
anymc3d bench synthetic $P --backbone litemedsam_tinyvit --set embed_norm=none \
    --set trunk_cache=$R/syn_litemedsam_tinyvit/cache/trunk --out $R/syn_litemedsam_tinyvit_nonorm
M=$R/syn_litemedsam_tinyvit/data/lesion_binary/manifest.csv   # the same generated task in every bench folder
for p in syn_efficientnet_lite0 syn_litemedsam_tinyvit syn_litemedsam_tinyvit_nonorm; do
  anymc3d explain $R/$p/runs/lesion_binary/plugin_lastk1/s0 $M --split test --positives-only --no-figure \
      --out $R/loc_test_$p
done
[ -f $R/heldout101/manifest.csv ] || python -c "from anymc3d.synthetic import make_task, write_task; \
write_task(make_task('lesion_binary', 160, seed=101, size=32), '$R/heldout101', seed=101)"
for p in syn_efficientnet_lite0 syn_litemedsam_tinyvit; do
  anymc3d explain $R/$p/runs/lesion_binary/plugin_lastk1/s0 $R/heldout101/manifest.csv \
      --positives-only --no-figure --out $R/loc_heldout_$p
done
python - "$R" <<'PY'
import json, sys
from pathlib import Path
R = Path(sys.argv[1])
print("| plugin | positives | maps | pointing game | energy in mask | voxel AUROC | random: pointing / energy / AUROC |")
print("|---|---|---|---|---|---|---|")
for d in sorted(R.glob("loc_*")):
    loc = json.loads((d / "localization.json").read_text())
    m, r = loc["mean"], loc["random"]
    print(f"| {d.name[4:]} | {loc['n_scored']} | {loc['method']} | {m['pointing_game']:.3f} | {m['energy_in_mask']:.3f} | "
          f"{m['auroc']:.3f} | {r['pointing_game']:.3f} / {r['energy_in_mask']:.3f} / {r['auroc']:.3f} |")
PY
