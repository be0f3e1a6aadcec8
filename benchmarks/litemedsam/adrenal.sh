#!/bin/bash
# Issue 18: TinyViT (LiteMedSAM) against EfficientNet-Lite0 on AdrenalMNIST3D, the cheapest cells a
# CPU session finishes: the stratified 300-case training subsets (make_train_subset.py; official val
# and test), 32² slices, seed 0, one thread per job.
#  * 28³: the shared-trunk three-view plugin `plugin_lastk1_3view`, no augmentation (every pass reads
#    the trunk cache), 8 epochs; TinyViT's slice embeddings get the backbone's default normalisation
#    (embed_norm auto = center_scale, docs/method.md). TinyViT ~1 h 45 min (trunk pass ~1 h), Lite0 ~5 min.
#  * 64³: the axial frozen `linear_probe` (64 slices per volume). TinyViT ~25 min, Lite0 ~2 min.
#  * 64³: `plugin_lastk1_3view` as at 28³ with each view's 64 slices resampled to 16 (max_slices=16,
#    the cheapest three-view cell: 48 slices per volume). TinyViT ~1 h, Lite0 ~10 min.
#   R=runs/litemedsam_adrenal bash benchmarks/litemedsam/adrenal.sh
set -e
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
R=${R:-runs/litemedsam_adrenal}
D=${D:-../shared/data/medmnist3d}
mkdir -p $R
[ -f $R/adrenalmnist3d_train300.npz ] || python benchmarks/litemedsam/make_train_subset.py $D/adrenalmnist3d.npz $R/adrenalmnist3d_train300.npz
[ -f $R/adrenalmnist3d_64_train300.npz ] || python benchmarks/litemedsam/make_train_subset.py $D/adrenalmnist3d_64.npz $R/adrenalmnist3d_64_train300.npz
for bb in litemedsam_tinyvit efficientnet_lite0; do
  anymc3d bench medmnist3d:$R/adrenalmnist3d_train300.npz --methods plugin_lastk1_3view --backbone $bb --size 32 \
      --epochs 8 --set augment=false --seeds 1 --quiet --out $R/adr300_$bb
  anymc3d bench medmnist3d:$R/adrenalmnist3d_64_train300.npz --methods linear_probe --backbone $bb --size 32 \
      --seeds 1 --quiet --out $R/adr64_300_$bb
  anymc3d bench medmnist3d:$R/adrenalmnist3d_64_train300.npz --methods plugin_lastk1_3view --backbone $bb --size 32 \
      --epochs 8 --set augment=false --set max_slices=16 --seeds 1 --quiet --out $R/adr64_300_3v_$bb
done
