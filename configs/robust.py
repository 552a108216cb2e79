"""Stage 1 for labelling faces unlike CelebA's crops (the recommended recipe).

Use it to train a labeller for other collections (other ages, ethnicities,
framings, cameras), on a dataset of several sources; keep `stage1.py` and
`stage2.py` for the original's recipe on CelebA-like crops. It is
`stage1.py` (optimiser, plateau, early stopping) with the robust
augmentation on top of the original's layers (gender_jax/augment.py): random
framing (the face 0.8-1.25x, placed at random), wider shifts, contrast,
saturation and hue jitter, some grayscale, blur and down-up scaling.
'train' and 'validation' name the union of every source's split
(gender_jax/dataset.py). Then fine-tune with `robust_stage2.py`. Blur sigmas
are pixels, chosen at 112x96: about double them at 218x178.
"""

from gender_jax import config_lib


def get_config():
  c = config_lib.load_sibling(__file__, 'stage1.py')
  c.train_split = 'train'
  c.eval_split = 'validation'
  c.aug.translation = 0.08
  c.aug.scale_min = 0.8
  c.aug.scale_max = 1.25
  c.aug.contrast = 0.3
  c.aug.saturation = 0.3
  c.aug.hue = 0.05
  c.aug.grayscale = 0.1
  c.aug.blur = 0.2
  c.aug.blur_sigma_min = 0.1
  c.aug.blur_sigma_max = 1.5
  c.aug.downscale = 0.25
  c.aug.downscale_min = 0.35
  return c
