"""Stage 2: fine-tune stage 1's best weights, no augmentation, output dropout.

Set `--config.init_from=<stage 1 workdir>`.
"""

from gender_jax import config_lib


def get_config():
  c = config_lib.load_sibling(__file__, 'stage1.py')
  c.augment = False
  c.dropout_rate = 0.3
  c.num_epochs = 10
  c.plateau_patience = 2
  c.early_stopping_patience = 3
  return c
