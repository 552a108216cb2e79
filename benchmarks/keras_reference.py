"""Keras 3 (TensorFlow backend) reference of the original model and recipe.

Used two ways: `benchmarks/speed.py` times it side by side with the JAX port,
and the CLI trains it on the project's TFDS dataset so that the JAX trainer's
accuracy can be compared with the original recipe on the same data:

  python benchmarks/keras_reference.py --data_dir=/work/data/tfds \
      --image_size=112,96 --epochs=8 --batch_size=64

The architecture is the original's exactly (9,562,209 parameters at 218x178):
Rescaling(1/255), four Conv2D (no bias, he_normal, 'same') -> BatchNorm ->
swish -> MaxPooling2D(2) blocks, Flatten, Dropout 0.3, Dense 512 (no bias),
BatchNorm, swish, [Dropout], Dense 1 sigmoid. On a CPU-only machine Keras'
``jit_compile='auto'`` resolves to plain TensorFlow graphs (oneDNN kernels),
which is what the original ran.
"""

import argparse
import json
import os
import time
from typing import Optional

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import keras  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

FILTERS = (32, 64, 96, 128)
KERNEL_SIZES = (5, 3, 3, 3)


def set_threads(num_threads: int) -> None:
  """Gives TensorFlow `num_threads` intra-op threads (and 1 inter-op thread).

  Must run before TensorFlow executes its first op. speed.py gives TF the same
  cores JAX uses, so neither side is favoured.
  """
  tf.config.threading.set_intra_op_parallelism_threads(num_threads)
  tf.config.threading.set_inter_op_parallelism_threads(1)


def build_keras_model(image_size=(218, 178), dropout_rate: float = 0.0,
                      flatten_dropout_rate: float = 0.3) -> keras.Model:
  """The original classifier: uint8/float 0..255 images -> p(male)."""
  inputs = keras.Input((*image_size, 3))
  x = keras.layers.Rescaling(1.0 / 255)(inputs)
  for filters, kernel in zip(FILTERS, KERNEL_SIZES):
    x = keras.layers.Conv2D(filters, kernel, padding='same', use_bias=False,
                            kernel_initializer='he_normal')(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation('swish')(x)
    x = keras.layers.MaxPooling2D(2)(x)
  x = keras.layers.Flatten()(x)
  x = keras.layers.Dropout(flatten_dropout_rate)(x)
  x = keras.layers.Dense(512, use_bias=False)(x)
  x = keras.layers.BatchNormalization()(x)
  x = keras.layers.Activation('swish')(x)
  if dropout_rate:
    x = keras.layers.Dropout(dropout_rate)(x)
  outputs = keras.layers.Dense(1, activation='sigmoid')(x)
  return keras.Model(inputs, outputs, name='gender_cnn')


def build_augmentation(seed: int = 42) -> keras.Sequential:
  """The original stage-1 augmentation, on 0..255 images."""
  return keras.Sequential([
      keras.layers.RandomFlip('horizontal', seed=seed),
      keras.layers.RandomRotation(0.1, seed=seed),
      keras.layers.RandomZoom(0.01, seed=seed),
      keras.layers.RandomTranslation(0.05, 0.05, seed=seed),
      keras.layers.RandomBrightness(0.5, value_range=(0, 255), seed=seed),
  ], name='augmentation')


def compile_model(model: keras.Model, learning_rate: float = 1e-3) -> None:
  """Nadam + binary cross-entropy + accuracy, as the original."""
  model.compile(optimizer=keras.optimizers.Nadam(learning_rate),
                loss='binary_crossentropy', metrics=['accuracy'])


def _split(data_dir, split, image_size, batch_size, train, augment, seed,
           repeat):
  """A tf.data pipeline of (float 0..255 images, float labels) from TFDS."""
  from gender_jax import dataset  # pylint: disable=g-import-not-at-top
  builder = dataset.load_builder(data_dir)
  ds = builder.as_dataset(split=split, shuffle_files=train)

  def to_pair(ex):
    image = tf.cast(ex['images'], tf.float32)
    if tuple(image.shape[:2]) != tuple(image_size):
      image = tf.image.resize(image, image_size)
    return image, tf.cast(ex['label'], tf.float32)

  ds = ds.map(to_pair, num_parallel_calls=tf.data.AUTOTUNE)
  if train:
    ds = ds.cache().repeat(repeat).shuffle(10_000, seed=seed)
  ds = ds.batch(batch_size)
  if augment:
    aug = build_augmentation(seed)
    ds = ds.map(lambda x, y: (aug(x, training=True), y),
                num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE)


class EpochTimer(keras.callbacks.Callback):
  """Wall seconds of each epoch, from its first batch to after validation,
  and of each epoch's validation pass."""

  def __init__(self):
    super().__init__()
    self.seconds, self.validation_seconds = [], []
    self._start = self._test_start = 0.0

  def on_epoch_begin(self, epoch, logs=None):
    self._start = time.perf_counter()

  def on_test_begin(self, logs=None):
    self._test_start = time.perf_counter()

  def on_test_end(self, logs=None):
    self.validation_seconds.append(time.perf_counter() - self._test_start)

  def on_epoch_end(self, epoch, logs=None):
    self.seconds.append(time.perf_counter() - self._start)


def train_keras(data_dir: str, image_size=(218, 178), epochs: int = 25,
                batch_size: int = 128, augment: bool = True,
                dropout_rate: float = 0.0, plateau_patience: int = 3,
                early_stopping_patience: int = 5, seed: int = 42,
                repeat: int = 2, verbose: int = 2,
                steps_per_epoch: Optional[int] = None):
  """Trains the original model with the original recipe on the TFDS dataset.

  Returns (model, history dict, {'val_accuracy', 'test_accuracy', 'seconds',
  'epoch_seconds', 'validation_seconds'}); 'epoch_seconds' lists each
  epoch's wall time, training and validation (Keras calls `on_epoch_end`
  after validating), 'validation_seconds' each validation pass's. The 'test'
  split is evaluated only if the dataset has one. `steps_per_epoch` caps an
  epoch's batches (Keras then carries on from the same iterator).
  """
  keras.utils.set_random_seed(seed)
  model = build_keras_model(image_size, dropout_rate)
  compile_model(model)
  train = _split(data_dir, 'train', image_size, batch_size, True, augment,
                 seed, repeat)
  val = _split(data_dir, 'validation', image_size, batch_size, False, False,
               seed, 1)
  timer = EpochTimer()
  callbacks = [
      keras.callbacks.ReduceLROnPlateau(
          monitor='val_loss', factor=0.5, patience=plateau_patience,
          min_delta=1e-4, min_lr=5e-4),
      keras.callbacks.EarlyStopping(
          monitor='val_accuracy', min_delta=1e-3,
          patience=early_stopping_patience, mode='max',
          restore_best_weights=True),
      timer,
  ]
  start = time.perf_counter()
  history = model.fit(train, validation_data=val, epochs=epochs,
                      steps_per_epoch=steps_per_epoch, callbacks=callbacks,
                      verbose=verbose)
  seconds = time.perf_counter() - start
  results = {'seconds': seconds, 'epoch_seconds': timer.seconds,
             'validation_seconds': timer.validation_seconds,
             'val_accuracy': model.evaluate(val, verbose=0)[1]}
  from gender_jax import dataset  # pylint: disable=g-import-not-at-top
  if 'test' in dataset.load_builder(data_dir).info.splits:
    test = _split(data_dir, 'test', image_size, batch_size, False, False,
                  seed, 1)
    results['test_accuracy'] = model.evaluate(test, verbose=0)[1]
  return model, history.history, results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data_dir', required=True)
  parser.add_argument('--image_size', default='218,178',
                      help='H,W the model sees (data is resized if needed).')
  parser.add_argument('--epochs', type=int, default=25)
  parser.add_argument('--steps_per_epoch', type=int, default=None,
                      help='Cap on training batches per epoch.')
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--no_augment', action='store_true')
  parser.add_argument('--dropout_rate', type=float, default=0.0)
  parser.add_argument('--seed', type=int, default=42)
  parser.add_argument('--threads', type=int, default=0,
                      help='TF intra-op threads (0: TF default).')
  parser.add_argument('--results_json', default='',
                      help='Also write the results (with epoch_seconds) here.')
  parser.add_argument('--verbose', type=int, default=2)
  args = parser.parse_args()
  if args.threads:
    set_threads(args.threads)
  image_size = tuple(int(v) for v in args.image_size.split(','))
  _, _, results = train_keras(
      args.data_dir, image_size, epochs=args.epochs,
      batch_size=args.batch_size, augment=not args.no_augment,
      dropout_rate=args.dropout_rate, seed=args.seed,
      steps_per_epoch=args.steps_per_epoch, verbose=args.verbose)
  if args.results_json:
    with open(args.results_json, 'w') as f:
      json.dump(results, f, indent=2)
  for key, value in results.items():
    if not isinstance(value, list):
      print(f'{key}={value:.4f}')


if __name__ == '__main__':
  main()
