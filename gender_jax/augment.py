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
not depend on how the batch is sharded. Runs on device inside the jitted train
step; returns float32.
"""

import math
from typing import Optional

import jax
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
  flat = image.reshape(height * width, channels)

  def read(yi, xi):
    # Neighbours past the last row/column read the fill value 0 (their weight
    # is 0 after the clamp, as in TF).
    inside = (yi < height) & (xi < width)
    index = (jnp.minimum(yi, height - 1) * width
             + jnp.minimum(xi, width - 1)).astype(jnp.int32)
    return jnp.where(inside[..., None], flat[index], 0.0)

  wx, wy = (x - x0)[..., None], (y - y0)[..., None]
  top = (1.0 - wx) * read(y0, x0) + wx * read(y0, x0 + 1)
  bottom = (1.0 - wx) * read(y0 + 1, x0) + wx * read(y0 + 1, x0 + 1)
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


def augment_image(key: jax.Array, image: jnp.ndarray, *, flip: bool = True,
                  rotation: float = 0.1, zoom: float = 0.01,
                  translation: float = 0.05,
                  brightness: float = 0.5) -> jnp.ndarray:
  """Augments one (H, W, 3) image in 0..255; a factor of 0 skips that layer."""
  height, width, _ = image.shape
  k_flip, k_rot, k_zoom, k_ty, k_tx, k_bright = jax.random.split(key, 6)
  image = jnp.asarray(image, jnp.float32)
  if flip:
    # Keras flips when uniform() <= 0.5.
    image = jnp.where(jax.random.uniform(k_flip) <= 0.5, image[:, ::-1], image)
  if rotation:
    angle = jax.random.uniform(k_rot, minval=-rotation * 360.0,
                               maxval=rotation * 360.0)
    image = affine_transform(image, rotation_transform(angle, height, width))
  if zoom:
    z = jax.random.uniform(k_zoom, minval=1.0 - zoom, maxval=1.0 + zoom)
    image = affine_transform(image, zoom_transform(z, height, width))
  if translation:
    dy = jax.random.uniform(k_ty, minval=-translation,
                            maxval=translation) * height
    dx = jax.random.uniform(k_tx, minval=-translation,
                            maxval=translation) * width
    image = affine_transform(image, translation_transform(dy, dx))
  if brightness:
    delta = jax.random.uniform(k_bright, minval=-brightness,
                               maxval=brightness) * 255.0
    image = jnp.clip(image + delta, 0.0, 255.0)
  return image


def augment_batch(rng: jax.Array, images: jnp.ndarray,
                  aug: Optional[ml_collections.ConfigDict] = None) -> jnp.ndarray:
  """Augments (N, H, W, 3) images, one key per example; returns float32.

  ``aug`` holds the Keras factors (``config.aug``: flip, rotation, zoom,
  translation, brightness); None uses the original's.
  """
  factors = {} if aug is None else dict(
      flip=bool(aug.flip), rotation=float(aug.rotation), zoom=float(aug.zoom),
      translation=float(aug.translation), brightness=float(aug.brightness))
  keys = jax.random.split(rng, images.shape[0])
  return jax.vmap(lambda k, x: augment_image(k, x, **factors))(keys, images)
