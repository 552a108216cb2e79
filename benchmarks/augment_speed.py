"""Time of the jitted augmentation call: configs/stage1.py against robust.py.

One process: `gender_jax.augment.augment_batch` jitted on a uint8 batch (as
`steps.augment_step` runs it), at 112x96 batch 64 and 218x178 batch 32, for
stage 1's factors, robust.py's, and stage 1 plus each robust op alone (what
each op costs). Calls are interleaved, warm-up excluded, each number the
median of --repeats. Prints ms per batch and `robust_ratio=` (robust /
stage 1) per size.

  python benchmarks/augment_speed.py
"""

import argparse
import os
import statistics
import time

from gender_jax import cpu  # pylint: disable=g-import-not-at-top

cpu.reexec_with_malloc_tunables()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from gender_jax import augment  # pylint: disable=g-import-not-at-top,wrong-import-position
from gender_jax import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'configs', 'x.py')
SIZES = (((112, 96), 64), ((218, 178), 32))
# Stage 1 plus one of robust.py's ops: (name, the fields it sets).
OPS = (('framing', ('scale_min', 'scale_max', 'translation')),
       ('contrast', ('contrast',)), ('saturation', ('saturation',)),
       ('hue', ('hue',)), ('grayscale', ('grayscale',)),
       ('blur', ('blur', 'blur_sigma_min', 'blur_sigma_max')),
       ('downscale', ('downscale', 'downscale_min')))


def variants():
  """{name: config.aug}: stage 1, robust.py, stage 1 plus each robust op."""
  stage1 = config_lib.load_sibling(CONFIGS, 'stage1.py').aug
  robust = config_lib.load_sibling(CONFIGS, 'robust.py').aug
  out = {'stage1': stage1, 'robust': robust}
  for name, fields in OPS:
    aug = stage1.copy_and_resolve_references()
    aug.update({field: robust[field] for field in fields})
    out['+' + name] = aug
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=20)
  args = parser.parse_args()
  print(f'{jax.devices()[0].device_kind}, jax {jax.__version__}')
  for (height, width), batch in SIZES:
    images = jax.device_put(np.random.default_rng(0).integers(
        0, 256, (batch, height, width, 3), dtype=np.uint8))
    fns = {name: jax.jit(lambda k, x, aug=aug: augment.augment_batch(k, x, aug))
           for name, aug in variants().items()}
    times = {name: [] for name in fns}
    for name, fn in fns.items():
      jax.block_until_ready(fn(jax.random.key(0), images))
    for i in range(args.repeats):
      for name, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(jax.random.key(i), images))
        times[name].append(1e3 * (time.perf_counter() - start))
    ms = {name: statistics.median(t) for name, t in times.items()}
    print(f'{height}x{width} batch {batch}: ' + ', '.join(
        f'{name} {value:.2f} ms' for name, value in ms.items()))
    print(f'robust_ratio_{height}x{width}={ms["robust"] / ms["stage1"]:.2f}')


if __name__ == '__main__':
  main()
