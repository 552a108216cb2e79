"""Stage 1: train from scratch with augmentation (the original recipe)."""

from gender_jax import config_lib


def get_config():
  c = config_lib.load_sibling(__file__, 'default.py')
  c.augment = True
  c.repeat = 2
  c.dropout_rate = 0.0
  c.num_epochs = 25
  c.plateau_patience = 3
  c.early_stopping_patience = 5
  # Keras' running averages: precise BN gave equal accuracy here
  # (benchmarks/README.md, 'Two-stage recipe and precise BatchNorm').
  c.precise_bn_batches = 0
  return c
