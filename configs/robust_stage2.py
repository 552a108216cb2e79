"""Stage 2 of the robust recipe: fine-tune `robust.py`'s best weights.

Set `--config.init_from=<robust.py workdir>` (after `stage1.py`, use
`stage2.py`). As `stage2.py`: no repeat, Dropout 0.3, plateau patience 2,
early-stopping patience 3, 10 epochs, `init_baseline`, precise BatchNorm.
Unlike it, flips, `robust.py`'s random framing (face 0.8-1.25x) and its
photometric ops (colour jitter, grayscale, blur, down-up scaling) stay on,
with a milder brightness and no rotation, zoom or shift, so the fine-tune
keeps what stage 1 learnt about loosely framed, off-colour and low-resolution
faces (without the framing, stage 2 lost much of stage 1's accuracy on
loosely framed faces: benchmarks/README.md, "Which augmentation parts help").
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
  return c
