"""Every configuration field, with the original Keras project's values.

`stage1.py` and `stage2.py` override a few of these; any field can be set on
the command line with `--config.<field>=<value>`. Unknown fields and values of
the wrong type are rejected by ml_collections; `gender_jax.config_lib.validate`
rejects out-of-range values at start.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  c = ml_collections.ConfigDict()

  # Data (a TFDS dataset made by scripts/prepare_data.py).
  c.data_dir = 'data'                # TFDS data_dir holding <dataset>/<version>/.
  c.dataset = 'gender_faces'         # TFDS dataset name.
  c.train_split = 'train'            # On several sources: the union of train_*.
  c.source_weights = ''              # 'utkface:1,folders:1': draw training
                                     # examples by source with these weights;
                                     # '': the union (proportional to size).
  c.eval_split = 'validation'
  c.image_size = (218, 178)          # (H, W) the model sees; must match the data.
  c.batch_size = 128                 # Global batch, split over all devices/hosts.
  c.eval_batch_size = 128            # Global eval batch (last batch padded+masked);
                                     # 128: the fastest steady validation on CPU
                                     # here (benchmarks/README.md); raise on GPU/TPU.
  c.shuffle_buffer = 10_000
  c.repeat = 2                       # Training set repeated per epoch (original: 2).
  c.cache = False                    # Cache decoded examples in memory.
  c.prefetch = 2                     # Device batches prefetched ahead.

  # Model.
  c.model = 'cnn'                    # 'cnn' (the original) or 'tiny' (tests, demo).
  c.flatten_dropout_rate = 0.3
  c.dropout_rate = 0.0               # Stage-2 dropout before the output layer.
  c.compute_dtype = 'float32'        # 'float32' or 'bfloat16'.
  c.kernels = 'auto'                 # Conv blocks: 'plain' flax layers, 'cpu' kernels
                                     # (gender_jax/cpu_kernels.py), 'auto': cpu on CPU.

  # Augmentation (stage 1; Keras preprocessing-layer factors).
  c.augment = True
  c.aug = ml_collections.ConfigDict()
  c.aug.flip = True
  c.aug.rotation = 0.1               # Fraction of a full turn: +-36 degrees.
  c.aug.zoom = 0.01
  c.aug.translation = 0.05
  c.aug.brightness = 0.5             # Fraction of the 0..255 range.
  # 'single': the three geometric maps composed and resampled once (3x
  # cheaper, same parameters); 'chain': Keras' three resamplings, pixel-exact.
  # See gender_jax/augment.py.
  c.aug.resampling = 'single'
  # Beyond the original, for faces unlike CelebA's (configs/robust.py); the
  # defaults turn each off and keep the original's output bit for bit.
  # Random framing: the face magnified by a log-uniform scale in
  # [scale_min, scale_max] (< 1: smaller, looser; > 1: a tighter crop) at a
  # random place; one more affine map (composed into 'single'). 1, 1: off.
  c.aug.scale_min = 1.0
  c.aug.scale_max = 1.0
  c.aug.contrast = 0.0               # Contrast factor in [1-f, 1+f].
  c.aug.saturation = 0.0             # Saturation factor in [1-f, 1+f].
  c.aug.hue = 0.0                    # Hue shift in [-f, f] of the circle.
  c.aug.grayscale = 0.0              # Probability of a grayscale image.
  c.aug.blur = 0.0                   # Probability of a Gaussian blur, sigma
  c.aug.blur_sigma_min = 0.1         # uniform in [min, max] pixels.
  c.aug.blur_sigma_max = 1.5
  c.aug.downscale = 0.0              # Probability of a down-up scaling (a
  c.aug.downscale_min = 0.35         # low-resolution face), factor in [min, 1].

  # Optimisation.
  c.learning_rate = 1e-3             # Nadam.
  c.num_epochs = 25
  c.steps_per_epoch = config_dict.placeholder(int)   # Cap for smoke runs.
  c.eval_steps = config_dict.placeholder(int)        # Cap for smoke runs.
  c.plateau_factor = 0.5
  c.plateau_patience = 3
  c.plateau_min_delta = 1e-4
  c.min_learning_rate = 5e-4
  c.early_stopping_patience = 5
  c.early_stopping_min_delta = 1e-3
  # BatchNorm statistics recomputed for the current weights before every
  # validation, over this many training batches (0: off, the Keras running
  # averages only). See gender_jax/precise_bn.py.
  c.precise_bn_batches = 0
  # With init_from: evaluate the restored model before the first step and
  # keep it as epoch 0 / the first best model (gender_jax/train.py).
  c.init_baseline = False
  # After training: fit a temperature for p(male) on eval_split and write
  # <workdir>/calibration.json (gender_jax/calibration.py).
  c.calibrate = True

  # Run.
  c.init_from = ''                   # Stage 1 workdir to fine-tune from.
  c.seed = 42
  c.log_every_steps = 50
  c.checkpoint_every_steps = 0       # 0: checkpoint at the end of each epoch only.
  c.distributed = False              # Call jax.distributed.initialize() first.
  return c
