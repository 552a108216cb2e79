"""The original stage-1 augmentation as a pure JAX function.

Reproduces the Keras 3 preprocessing layers of the original, in their order,
on images in the 0..255 range:

  RandomFlip('horizontal') -> RandomRotation(0.1) -> RandomZoom(0.01)
  -> RandomTranslation(0.05, 0.05) -> RandomBrightness(0.5, (0, 255))

Each geometric layer is its own bilinear resampling with Keras' default
``fill_mode='reflect'``, computed the way TensorFlow's
``ImageProjectiveTransformV3`` does (the kernel Keras calls): the inverse affine
map gives each output pixel a source coordinate, which is reflected into the
image (``d c b a | a b c d | d c b a``) and clamped before interpolation.
Brightness adds one random offset per image and clips to 0..255. Every example
gets its own random parameters from its own key (``vmap``), so the result does
not depend on how the batch is sharded. Returns float32.

Two resamplings (``config.aug.resampling``), drawing the same parameters from
the same keys, so the same distribution of rotations, zooms, shifts, flips and
brightness offsets:

* 'single' (the default): the three maps are composed into one affine map and
  the image is resampled once. The geometry is the chain's; the image is
  interpolated once instead of three times (a little sharper), and
  coordinates outside the image are reflected once, about the original
  image's edges, where the chain reflects after each layer. Three times
  cheaper, and equal to the chain wherever no layer reflected (tested).
* 'chain': the three resamplings of the Keras layers, pixel-exact with Keras
  (tested per layer against `keras.layers`).
"""

import functools
import math
from typing import Optional

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections

# Output pixel (x, y) samples the input at (a0 x + a1 y + a2, b0 x + b1 y + b2).
# An affine map is the tuple (a0, a1, a2, b0, b1, b2), as in Keras/TF.


def _reflect(coord: jnp.ndarray, size: int) -> jnp.ndarray:
  """TF's FILL_REFLECT coordinate map followed by its clamp to [0, size-1]."""
  if size <= 1:
    return jnp.zeros_like(coord)
  sz2 = 2.0 * size
  neg = coord + sz2 * jnp.trunc(-coord / sz2)
  neg = jnp.where(neg < -size, neg + sz2, -neg - 1.0)
  pos = coord - sz2 * jnp.trunc(coord / sz2)
  pos = jnp.where(pos >= size, sz2 - pos - 1.0, pos)
  out = jnp.where(coord < 0, neg, jnp.where(coord > size - 1, pos, coord))
  return jnp.clip(out, 0.0, size - 1.0)


def affine_transform(image: jnp.ndarray, transform) -> jnp.ndarray:
  """Bilinear resampling of one (H, W, C) image under an inverse affine map."""
  height, width, channels = image.shape
  a0, a1, a2, b0, b1, b2 = transform
  ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                        jnp.arange(width, dtype=jnp.float32), indexing='ij')
  x = _reflect(a0 * xs + a1 * ys + a2, width)
  y = _reflect(b0 * xs + b1 * ys + b2, height)
  x0, y0 = jnp.floor(x), jnp.floor(y)
  # Each output pixel reads its 2x2 neighbourhood with one gather (a quarter
  # of the index work of four). Neighbours past the last row/column read the
  # fill value 0 from the padding (their weight is 0 after the clamp, as in
  # TF).
  padded = jnp.pad(image, ((0, 1), (0, 1), (0, 0)))
  corners = lax.gather(
      padded, jnp.stack([y0, x0], axis=-1).astype(jnp.int32),
      lax.GatherDimensionNumbers(offset_dims=(2, 3, 4),
                                 collapsed_slice_dims=(),
                                 start_index_map=(0, 1)),
      slice_sizes=(2, 2, channels), mode='clip')   # (H, W, 2, 2, C)
  wx, wy = (x - x0)[..., None], (y - y0)[..., None]
  top = (1.0 - wx) * corners[:, :, 0, 0] + wx * corners[:, :, 0, 1]
  bottom = (1.0 - wx) * corners[:, :, 1, 0] + wx * corners[:, :, 1, 1]
  return (1.0 - wy) * top + wy * bottom


def rotation_transform(angle_degrees, height: int, width: int):
  """Keras RandomRotation's map: rotation about the image centre."""
  theta = angle_degrees * (math.pi / 180.0)
  cx, cy = 0.5 * (width - 1), 0.5 * (height - 1)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  a0, a1, b0, b1 = cos, -sin, sin, cos
  return (a0, a1, cx - cx * a0 - cy * a1, b0, b1, cy - cx * b0 - cy * b1)


def zoom_transform(zoom, height: int, width: int):
  """Keras RandomZoom's map (same zoom both axes); zoom > 1 zooms out."""
  return (zoom, 0.0, (width - 1) / 2.0 * (1.0 - zoom),
          0.0, zoom, (height - 1) / 2.0 * (1.0 - zoom))


def translation_transform(dy, dx):
  """Keras RandomTranslation's map: shift content by (dy, dx) pixels."""
  return (1.0, 0.0, -dx, 0.0, 1.0, -dy)


def compose(outer, inner):
  """The affine map of resampling by `outer`, then by `inner`.

  Resampling by `outer` gives out1(p) = image(outer(p)); resampling that by
  `inner` gives out2(p) = out1(inner(p)) = image(outer(inner(p))), so the
  composed map is p -> outer(inner(p)).
  """
  a0, a1, a2, b0, b1, b2 = outer
  c0, c1, c2, d0, d1, d2 = inner
  return (a0 * c0 + a1 * d0, a0 * c1 + a1 * d1, a0 * c2 + a1 * d2 + a2,
          b0 * c0 + b1 * d0, b0 * c1 + b1 * d1, b0 * c2 + b1 * d2 + b2)


RESAMPLINGS = ('single', 'chain')


def augment_image(key: jax.Array, image: jnp.ndarray, *, flip: bool = True,
                  rotation: float = 0.1, zoom: float = 0.01,
                  translation: float = 0.05, brightness: float = 0.5,
                  resampling: str = 'single') -> jnp.ndarray:
  """Augments one (H, W, 3) image in 0..255; a factor of 0 skips that layer.

  `resampling`: 'single' (one resampling of the composed map) or 'chain'
  (the Keras layers' three); both draw the same parameters from `key`.
  """
  if resampling not in RESAMPLINGS:
    raise ValueError(f'resampling must be one of {RESAMPLINGS}, got '
                     f'{resampling!r}')
  height, width, _ = image.shape
  k_flip, k_rot, k_zoom, k_ty, k_tx, k_bright = jax.random.split(key, 6)
  image = jnp.asarray(image, jnp.float32)
  if flip:
    # Keras flips when uniform() <= 0.5.
    image = jnp.where(jax.random.uniform(k_flip) <= 0.5, image[:, ::-1], image)
  maps = []
  if rotation:
    angle = jax.random.uniform(k_rot, minval=-rotation * 360.0,
                               maxval=rotation * 360.0)
    maps.append(rotation_transform(angle, height, width))
  if zoom:
    z = jax.random.uniform(k_zoom, minval=1.0 - zoom, maxval=1.0 + zoom)
    maps.append(zoom_transform(z, height, width))
  if translation:
    dy = jax.random.uniform(k_ty, minval=-translation,
                            maxval=translation) * height
    dx = jax.random.uniform(k_tx, minval=-translation,
                            maxval=translation) * width
    maps.append(translation_transform(dy, dx))
  if resampling == 'single' and maps:
    maps = [functools.reduce(compose, maps)]
  for transform in maps:
    image = affine_transform(image, transform)
  if brightness:
    delta = jax.random.uniform(k_bright, minval=-brightness,
                               maxval=brightness) * 255.0
    image = jnp.clip(image + delta, 0.0, 255.0)
  return image


def augment_batch(rng: jax.Array, images: jnp.ndarray,
                  aug: Optional[ml_collections.ConfigDict] = None) -> jnp.ndarray:
  """Augments (N, H, W, 3) images, one key per example; returns float32.

  ``aug`` holds the Keras factors and the resampling (``config.aug``: flip,
  rotation, zoom, translation, brightness, resampling); None uses the
  original's factors with the default 'single' resampling.
  """
  factors = {} if aug is None else dict(
      flip=bool(aug.flip), rotation=float(aug.rotation), zoom=float(aug.zoom),
      translation=float(aug.translation), brightness=float(aug.brightness),
      resampling=aug.get('resampling', 'single'))
  keys = jax.random.split(rng, images.shape[0])
  return jax.vmap(lambda k, x: augment_image(k, x, **factors))(keys, images)
