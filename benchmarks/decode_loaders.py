r"""Images/s of loaders decoding and framing JPEGs for the labeller.

Each loader yields batches of `image_io.decode(path, size, 'stretch')`, the
labeller's decode, over the same files:

  threads-N  `image_io.decode_batches` (what `Predictor.predict_files` runs):
             a ThreadPoolExecutor of N threads, batches decoded ahead
  tf.data    from_tensor_slices(paths).map(tf.numpy_function(decode),
             num_parallel_calls=AUTOTUNE).batch(B).prefetch(AUTOTUNE)
  grain-N    grain.MapDataset.source(paths).map(decode).batch(B)
             .to_iter_dataset(grain.ReadOptions(num_threads=N)) (needs
             `pip install grain`; skipped without it)

The files are read once first (page cache), every loader decodes a few
batches untimed (imports, thread start), then the loaders run interleaved,
--repeats full passes each; the median images/s is printed side by side:

  nice -n 10 python benchmarks/decode_loaders.py \
      [--images=/work/shared/data/gender-faces/Test] [--repeats=3]
"""

import argparse
import os
import statistics
import time

import numpy as np

from gender_jax import image_io

_DEFAULT_IMAGES = ('/work/shared/data/gender-faces/Test',
                   os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                os.pardir, os.pardir, 'shared', 'data',
                                'gender-faces', 'Test'))


def _decoder(image_size):
  """decode(path) -> uint8 (H, W, 3), zeros for an unreadable file."""
  def decode(path):
    if isinstance(path, bytes):
      path = os.fsdecode(path)
    image, _ = image_io.decode(path, image_size, 'stretch', None, 0.0)
    return np.zeros((*image_size, 3), np.uint8) if image is None else image
  return decode


def thread_pool(num_workers):
  def batches(paths, image_size, batch_size):
    return (images for images, _ in image_io.decode_batches(
        paths, image_size, batch_size, num_workers))
  return batches


def tf_data(paths, image_size, batch_size):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  decode = _decoder(image_size)

  def load(path):
    image = tf.numpy_function(decode, [path], tf.uint8, stateful=False)
    image.set_shape((*image_size, 3))
    return image

  return tf.data.Dataset.from_tensor_slices(paths).map(
      load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(
          tf.data.AUTOTUNE).as_numpy_iterator()


def grain_loader(num_threads):
  def batches(paths, image_size, batch_size):
    import grain  # pylint: disable=g-import-not-at-top
    return iter(grain.MapDataset.source(paths).map(_decoder(image_size))
                .batch(batch_size).to_iter_dataset(
                    grain.ReadOptions(num_threads=num_threads)))
  return batches


def loaders():
  """{name: fn(paths, image_size, batch_size) -> iterator of batches}."""
  found = {'threads-2': thread_pool(2), 'threads-4': thread_pool(4),
           'tf.data': tf_data}
  try:
    import grain  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    print('grain is not installed: skipped (pip install grain).')
    return found
  found.update({'grain-2': grain_loader(2), 'grain-4': grain_loader(4)})
  return found


def images_per_second(fn, paths, image_size, batch_size) -> float:
  start = time.perf_counter()
  count = sum(len(batch) for batch in fn(paths, image_size, batch_size))
  seconds = time.perf_counter() - start
  if count != len(paths):
    raise AssertionError(f'{count} images from {len(paths)} paths')
  return count / seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', default='',
                      help='Folder of images (default: gender-faces Test).')
  parser.add_argument('--image_size', default='112,96')
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--warmup_batches', type=int, default=2)
  args = parser.parse_args()
  folder = args.images or next(
      (d for d in _DEFAULT_IMAGES if os.path.isdir(d)), _DEFAULT_IMAGES[0])
  paths = [os.path.join(folder, p) for p in image_io.list_images(folder)]
  image_size = tuple(int(v) for v in args.image_size.split(','))
  for path in paths:
    with open(path, 'rb') as f:
      f.read()
  fns = loaders()
  warmup = paths[:args.warmup_batches * args.batch_size]
  for fn in fns.values():
    images_per_second(fn, warmup, image_size, args.batch_size)
  rates = {name: [] for name in fns}
  for _ in range(args.repeats):
    for name, fn in fns.items():
      rates[name].append(images_per_second(fn, paths, image_size,
                                           args.batch_size))
  print(f'{len(paths)} images under {folder} -> {image_size}, batch '
        f'{args.batch_size}, {os.cpu_count()} CPUs, load average '
        f'{os.getloadavg()}; images/s, median of {args.repeats}:')
  for name, values in rates.items():
    print(f'  {name:10s} {statistics.median(values):7.0f}   '
          f'({", ".join(f"{v:.0f}" for v in values)})')


if __name__ == '__main__':
  main()
