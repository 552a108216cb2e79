"""Accuracy and calibration of trained models on corrupted test faces.

Each corruption imitates a shift that one of `configs/robust.py`'s
augmentation parts is meant to cover (gender_jax/augment.py), at the edge of
that part's range or past it, applied the same way to every image of a test
split. Side by side for several workdirs (a model trained with one part and
one without), it shows what each part buys against the shift it imitates,
next to the clean accuracy a part may cost. The framing corruptions fill the
border by reflection, as the augmentation does; real loose crops show real
background there, which this does not imitate.

  python benchmarks/robustness.py --split=test_utkface W_without W_with ...

Prints one row per corruption: accuracy and ECE (after each workdir's
temperature, `calibration.json`) per workdir.
"""

import argparse
import functools

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

from gender_jax import augment
from gender_jax import calibration
from gender_jax import evaluate
from gender_jax import models
from gender_jax import predict


def _framing(scale: float):
  def corrupt(image):
    height, width, _ = image.shape
    return augment.affine_transform(
        image, augment.framing_transform(scale, 0.0, 0.0, height, width))
  return corrupt


def _colour(image):
  unit = dm_pix.adjust_contrast(image / 255.0, 0.7)
  unit = dm_pix.adjust_saturation(jnp.clip(unit, 0.0, 1.0), 0.7)
  return dm_pix.adjust_hue(unit, 0.05) * 255.0


def _grayscale(image):
  return dm_pix.rgb_to_grayscale(image, keep_dims=True) * jnp.ones(3)


# name -> (what it imitates, the part that covers it, one (H, W, 3) image in
# 0..255 -> the corrupted image). robust.py's ranges: face scale 0.8-1.25,
# down-up 0.35-1, blur sigma 0.1-1.5 px, contrast/saturation 0.7-1.3, hue
# +-0.05; the second level of each is past them.
CORRUPTIONS = {
    'clean': ('the test split as it is', '-', lambda image: image),
    'loose_0.8': ('face 0.8x, more border', 'framing', _framing(0.8)),
    'loose_0.65': ('face 0.65x, more border', 'framing', _framing(0.65)),
    'tight_1.25': ('face 1.25x, cut at the edges', 'framing',
                   _framing(1.25)),
    **{f'lowres_{s}': (f'down-sampled to {s}x and back', 'downscale',
                       functools.partial(augment.down_up, scale=s))
       for s in (0.5, 0.35, 0.25)},
    **{f'blur_{s}': (f'Gaussian blur, sigma {s} px', 'blur',
                     functools.partial(augment.gaussian_blur, sigma=s))
       for s in (1.5, 3.0)},
    'colour': ('contrast and saturation x0.7, hue +0.05', 'colour', _colour),
    'grayscale': ('grayscale', 'grayscale', _grayscale),
}


def corrupted_predict_fn(predict_fn, corrupt):
  """predict_fn(variables, corrupt(images), ids), images clipped to 0..255."""
  batched = jax.jit(jax.vmap(
      lambda image: jnp.clip(corrupt(image.astype(jnp.float32)), 0.0, 255.0)))

  def fn(variables, images, ids):
    return predict_fn(variables, batched(images), ids)
  return fn


def measure(workdir: str, split: str, names) -> dict:
  """{corruption: (accuracy, ECE after the workdir's temperature)}."""
  config, builder, mesh = evaluate.open_split(workdir, None, split)
  variables, meta = evaluate.load_variables(workdir, config, mesh)
  temperature = calibration.read_temperature(workdir, meta.get('step'))
  predict_fn = predict.make_predict_fn(models.create_model(config), mesh=mesh)
  results = {}
  for name in names:
    labels, logits, _ = evaluate.predict_split(
        config, builder, mesh,
        corrupted_predict_fn(predict_fn, CORRUPTIONS[name][2]), variables,
        split, max_wrong=0)
    accuracy = float(np.mean((logits >= 0) == (labels == 1)))
    ece = evaluate.calibration_errors(labels, logits / temperature)['ece']
    results[name] = (accuracy, ece)
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('workdirs', nargs='+')
  parser.add_argument('--split', default='test')
  parser.add_argument('--corruptions', default=','.join(CORRUPTIONS),
                      help='comma-separated, of: ' + ', '.join(CORRUPTIONS))
  args = parser.parse_args()
  names = args.corruptions.split(',')
  unknown = sorted(set(names) - set(CORRUPTIONS))
  if unknown:
    parser.error(f'unknown corruptions {unknown}; known: {list(CORRUPTIONS)}')
  table = {w: measure(w, args.split, names) for w in args.workdirs}
  print(f'split {args.split}: accuracy % / ECE % after temperature')
  print('| corruption | imitates | covered by | ' + ' | '.join(args.workdirs)
        + ' |')
  print('| --- ' * (3 + len(args.workdirs)) + '|')
  for name in names:
    cells = [f'{100 * table[w][name][0]:.2f} / {100 * table[w][name][1]:.2f}'
             for w in args.workdirs]
    print(f'| {name} | {CORRUPTIONS[name][0]} | {CORRUPTIONS[name][1]} | '
          + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
