"""Stage 2: fine-tune stage 1's best weights as the original does.

Set `--config.init_from=<stage 1 workdir>`. As the original's README: no
augmentation, no repeat of the training set, Dropout 0.3 before the output,
plateau patience 2, early-stopping patience 3, 10 epochs, a fresh Nadam.
Beyond Keras: the restored model is evaluated first and kept as epoch 0
(`init_baseline`), and BatchNorm statistics are recomputed for the weights
before each validation (`precise_bn_batches`); see gender_jax/train.py.
"""

from gender_jax import config_lib


def get_config():
  c = config_lib.load_sibling(__file__, 'stage1.py')
  c.augment = False
  c.repeat = 1
  c.dropout_rate = 0.3
  c.num_epochs = 10
  c.plateau_patience = 2
  c.early_stopping_patience = 3
  c.init_baseline = True
  c.precise_bn_batches = 50
  return c
