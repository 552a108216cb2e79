"""Stage 2 of the robust recipe: fine-tune `robust.py`'s best weights.

Set `--config.init_from=<robust.py workdir>` (after `stage1.py`, use
`stage2.py`). As `stage2.py`: no repeat, Dropout 0.3, plateau patience 2,
early-stopping patience 3, 10 epochs, `init_baseline`, precise BatchNorm.
Unlike it, flips and `robust.py`'s photometric ops (colour jitter, grayscale,
blur, down-up scaling) stay on, with a milder brightness and no geometric
resampling, so the fine-tune keeps what stage 1 learnt about off-colour and
low-resolution faces.
"""

from gender_jax import config_lib


def get_config():
  c = config_lib.load_sibling(__file__, 'stage2.py')
  robust = config_lib.load_sibling(__file__, 'robust.py')
  c.train_split = robust.train_split
  c.eval_split = robust.eval_split
  c.augment = True
  c.aug = robust.aug
  c.aug.brightness = 0.2
  c.aug.rotation = 0.0
  c.aug.zoom = 0.0
  c.aug.translation = 0.0
  c.aug.scale_min = 1.0
  c.aug.scale_max = 1.0
  return c
