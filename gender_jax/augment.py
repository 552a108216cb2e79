"""The original stage-1 augmentation as a pure JAX function, and more.

`augment_batch` reproduces the Keras 3 preprocessing layers of the original,
in their order, on images in the 0..255 range, and returns float32:

  RandomFlip('horizontal') -> RandomRotation(0.1) -> RandomZoom(0.01)
  -> RandomTranslation(0.05, 0.05) -> RandomBrightness(0.5, (0, 255))

Geometric layers resample bilinearly with Keras' `fill_mode='reflect'`, as
TensorFlow's `ImageProjectiveTransformV3` does. Every example draws its own
parameters from its own key, so results do not depend on sharding.
`config.aug.resampling` picks 'single' (default: the three maps composed
into one resampling; equal to the chain wherever no layer reflected) or
'chain' (the three Keras resamplings, pixel-exact with `keras.layers`).

For faces unlike CelebA's crops (`configs/robust.py`) it adds, each off by
default (the program is then the original's): random framing
(`scale_min`..`scale_max`), contrast, saturation and hue (`dm_pix`),
grayscale, Gaussian blur and down-up scaling (per-axis matrices, as
matmuls). Their keys are folded apart from the original's, so turning them on
never changes the original layers' draws.
"""

import functools
import inspect
import math
from typing import Optional

import dm_pix
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


def framing_transform(scale, dy, dx, height: int, width: int):
  """Random scale/crop's map: content magnified by `scale` about the centre
  (< 1: a smaller, looser face; > 1: a tighter crop), and the sampled window's
  centre moved by (dy, dx) input pixels."""
  return compose(translation_transform(-dy, -dx),
                 zoom_transform(1.0 / scale, height, width))


def random_framing(key: jax.Array, scale_min: float, scale_max: float,
                   height: int, width: int):
  """`framing_transform` with a log-uniform scale and a random placement.

  The shift keeps a zoomed-in window inside the image, and a zoomed-out image
  inside the frame (the rest is filled by reflection).
  """
  u_scale, u_y, u_x = jax.random.uniform(key, (3,))
  log_min, log_max = math.log(scale_min), math.log(scale_max)
  scale = jnp.exp(log_min + (log_max - log_min) * u_scale)
  reach = 0.5 * jnp.abs(1.0 / scale - 1.0)
  return framing_transform(scale, (2.0 * u_y - 1.0) * reach * height,
                           (2.0 * u_x - 1.0) * reach * width, height, width)


_matmul = functools.partial(jnp.matmul, precision=lax.Precision.HIGHEST)


def separable(image: jnp.ndarray, rows: jnp.ndarray,
              cols: jnp.ndarray) -> jnp.ndarray:
  """(H, W, C) `image` filtered by the (H, H) matrix `rows` along its height
  and the (W, W) matrix `cols` along its width (two matmuls)."""
  return jnp.einsum('ij,jwc,vw->ivc', rows, image, cols,
                    precision=lax.Precision.HIGHEST)


def blur_matrix(size: int, sigma) -> jnp.ndarray:
  """The (size, size) matrix of a Gaussian blur (`sigma` pixels) of one axis.

  Weights past the image's edges are left out and the rest renormalised, so
  the edges do not darken (`dm_pix.gaussian_blur` pads with zeros).
  """
  offsets = jnp.arange(size, dtype=jnp.float32)
  weights = jnp.exp(-0.5 * ((offsets[:, None] - offsets) / sigma) ** 2)
  return weights / weights.sum(axis=1, keepdims=True)


def down_up_matrix(size: int, scale) -> jnp.ndarray:
  """The (size, size) matrix of down-sampling one axis by `scale` (traced,
  in (0, 1]) with antialiasing, then linearly up-sampling it back.

  Both are `jax.image.scale_and_translate` at the static size: the small
  axis fills its first round(scale * size) pixels, and its last pixel is
  repeated over the rest, so the up-sampling blends no empty pixels in.
  """
  resize = functools.partial(
      jax.image.scale_and_translate, shape=(size, size), spatial_dims=(0,),
      translation=jnp.zeros(1), method='linear', antialias=True)
  down = resize(jnp.eye(size), scale=scale[None])
  kept = jnp.floor(scale * size + 0.5).astype(jnp.int32)
  return resize(down[jnp.minimum(jnp.arange(size), kept - 1)],
                scale=1.0 / scale[None])


def gaussian_blur(image: jnp.ndarray, sigma) -> jnp.ndarray:
  """One (H, W, C) image blurred by a Gaussian of `sigma` pixels."""
  height, width, _ = image.shape
  return separable(image, blur_matrix(height, sigma), blur_matrix(width, sigma))


def down_up(image: jnp.ndarray, scale) -> jnp.ndarray:
  """One (H, W, C) image down-sampled by `scale` and up-sampled back to
  (H, W): a low-resolution face at the same size."""
  scale = jnp.asarray(scale, jnp.float32)
  height, width, _ = image.shape
  return separable(image, down_up_matrix(height, scale),
                   down_up_matrix(width, scale))


def _where(key: jax.Array, probability: float, changed, image):
  """`changed` with `probability`, else `image`."""
  return jnp.where(jax.random.uniform(key) < probability, changed, image)


def robust_photometric(key: jax.Array, image: jnp.ndarray, *,
                       contrast: float = 0.0, saturation: float = 0.0,
                       hue: float = 0.0, grayscale: float = 0.0,
                       blur: float = 0.0, blur_sigma_min: float = 0.1,
                       blur_sigma_max: float = 1.5, downscale: float = 0.0,
                       downscale_min: float = 0.35) -> jnp.ndarray:
  """Colour jitter, grayscale, blur and down-up scaling of one (H, W, 3)
  image in 0..255, in that order; a factor of 0 skips that op.

  `contrast`, `saturation`: factors drawn in [1 - f, 1 + f]; `hue`: a shift
  in [-hue, hue] of the hue circle; `grayscale`, `blur`, `downscale`: the
  probability of each; the blur's sigma (pixels) is uniform in
  [blur_sigma_min, blur_sigma_max], the down-scaling factor in
  [downscale_min, 1].
  """
  k_contrast, k_saturation, k_hue, k_gray, k_blur, k_down = (
      jax.random.split(key, 6))
  if contrast:
    # Linear, so it works on 0..255 as on 0..1.
    image = jnp.clip(dm_pix.random_contrast(
        k_contrast, image, 1.0 - contrast, 1.0 + contrast), 0.0, 255.0)
  if saturation or hue:
    unit = image / 255.0
    if saturation:
      unit = dm_pix.random_saturation(k_saturation, unit, 1.0 - saturation,
                                      1.0 + saturation)
    if hue:
      unit = dm_pix.random_hue(k_hue, unit, hue)
    image = unit * 255.0
  if grayscale:
    image = _where(k_gray, grayscale,
                   dm_pix.rgb_to_grayscale(image, keep_dims=True), image)
  filters = []   # (key, probability, per-axis matrix of a size)
  if blur:
    k_blur, k_sigma = jax.random.split(k_blur)
    sigma = jax.random.uniform(k_sigma, minval=blur_sigma_min,
                               maxval=blur_sigma_max)
    filters.append((k_blur, blur, lambda size: blur_matrix(size, sigma)))
  if downscale:
    k_down, k_scale = jax.random.split(k_down)
    scale = jax.random.uniform(k_scale, minval=downscale_min, maxval=1.0)
    filters.append((k_down, downscale,
                    lambda size: down_up_matrix(size, scale)))
  if filters:
    # Blur, then down-up scaling, as one separable filter: per axis, the
    # product of the drawn ops' matrices.
    sizes = image.shape[:2]
    axes = None
    for k_apply, probability, matrix in filters:
      drawn = [_where(k_apply, probability, matrix(size), jnp.eye(size))
               for size in sizes]
      axes = drawn if axes is None else list(map(_matmul, drawn, axes))
    image = separable(image, *axes)
  return jnp.clip(image, 0.0, 255.0)


RESAMPLINGS = ('single', 'chain')
# `robust_photometric`'s ops, each off at 0.
PHOTOMETRIC_OPS = ('contrast', 'saturation', 'hue', 'grayscale', 'blur',
                   'downscale')

# `fold_in` data of the keys of the ops beyond the original's: apart from the
# six-way split of its layers' keys.
_FRAMING_KEY, _PHOTOMETRIC_KEY = 0x5CA1E, 0xC0104


def _draw(key: jax.Array, height: int, width: int, *, flip, rotation, zoom,
          translation, brightness, resampling, scale_min, scale_max):
  """One example's random flip, affine maps (in resampling order) and
  brightness offset, drawn from `key` as `augment_image` documents.

  Returns {'flip', 'maps', 'delta'}; None (or no maps) where a layer is off.
  """
  if resampling not in RESAMPLINGS:
    raise ValueError(f'resampling must be one of {RESAMPLINGS}, got '
                     f'{resampling!r}')
  k_flip, k_rot, k_zoom, k_ty, k_tx, k_bright = jax.random.split(key, 6)
  drawn = {'flip': None, 'maps': [], 'delta': None}
  if flip:
    # Keras flips when uniform() <= 0.5.
    drawn['flip'] = jax.random.uniform(k_flip) <= 0.5
  maps = drawn['maps']
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
  if _framing_on(scale_min, scale_max):
    maps.append(random_framing(jax.random.fold_in(key, _FRAMING_KEY),
                               scale_min, scale_max, height, width))
  if resampling == 'single' and maps:
    drawn['maps'] = [functools.reduce(compose, maps)]
  if brightness:
    drawn['delta'] = jax.random.uniform(k_bright, minval=-brightness,
                                        maxval=brightness) * 255.0
  return drawn


def _transform(image: jnp.ndarray, drawn) -> jnp.ndarray:
  """`image` (float32) flipped, resampled and offset as `_draw` drew."""
  image = jnp.asarray(image, jnp.float32)
  if drawn['flip'] is not None:
    image = jnp.where(drawn['flip'], image[:, ::-1], image)
  for transform in drawn['maps']:
    image = affine_transform(image, transform)
  if drawn['delta'] is not None:
    image = jnp.clip(image + drawn['delta'], 0.0, 255.0)
  return image


def augment_image(key: jax.Array, image: jnp.ndarray, *, flip: bool = True,
                  rotation: float = 0.1, zoom: float = 0.01,
                  translation: float = 0.05, brightness: float = 0.5,
                  resampling: str = 'single', scale_min: float = 1.0,
                  scale_max: float = 1.0, **photometric) -> jnp.ndarray:
  """Augments one (H, W, 3) image in 0..255; a factor of 0 skips that layer.

  `resampling`: 'single' (one resampling of the composed map) or 'chain'
  (the Keras layers' three); both draw the same parameters from `key`.
  `scale_min`, `scale_max`: the range of `random_framing`'s scale (both 1:
  off), its map after the Keras layers'. `photometric`:
  `robust_photometric`'s factors, applied after the brightness offset (all
  0: off).
  """
  height, width, _ = image.shape
  drawn = _draw(key, height, width, flip=flip, rotation=rotation, zoom=zoom,
                translation=translation, brightness=brightness,
                resampling=resampling, scale_min=scale_min,
                scale_max=scale_max)
  return _photometric_stage(key, _transform(image, drawn), photometric)


def _framing_on(scale_min: float, scale_max: float) -> bool:
  return (scale_min, scale_max) != (1.0, 1.0)


def _photometric_on(photometric) -> bool:
  return any(photometric.get(op) for op in PHOTOMETRIC_OPS)


def _photometric_stage(key: jax.Array, image: jnp.ndarray, photometric):
  """`robust_photometric` of `image` with its own key, when any op is on."""
  inspect.signature(robust_photometric).bind(key, image, **photometric)
  if not _photometric_on(photometric):
    return image
  return robust_photometric(jax.random.fold_in(key, _PHOTOMETRIC_KEY), image,
                            **photometric)


def _computed_first(rng: jax.Array, values):
  """`values` (a pytree), computed into buffers before any consumer runs.

  Otherwise XLA:CPU fuses each producer into every consumer and recomputes
  it per element there: the draws' cos/sin/exp for every pixel, the
  resampling once per photometric op reading its output; several times the
  augmentation's time. Its optimization barrier is removed before fusion; a
  conditional is kept, on a predicate that is always true but that XLA does
  not fold (the taken branch returns `values`).
  """
  first = jax.random.key_data(rng).ravel()[0]
  return lax.cond((first >> 1) < jnp.uint32(1 << 31), lambda x: x,
                  functools.partial(jax.tree.map, jnp.zeros_like), values)


def _keyword_only(fn):
  return {name: param.default
          for name, param in inspect.signature(fn).parameters.items()
          if param.kind is inspect.Parameter.KEYWORD_ONLY}


_PHOTOMETRIC_FIELDS = _keyword_only(robust_photometric)
# Every `config.aug` field `augment_batch` reads, with its default: the
# keyword arguments of `augment_image` and `robust_photometric`.
FIELDS = {**_keyword_only(augment_image), **_PHOTOMETRIC_FIELDS}


def augment_batch(rng: jax.Array, images: jnp.ndarray,
                  aug: Optional[ml_collections.ConfigDict] = None) -> jnp.ndarray:
  """Augments (N, H, W, 3) images, one key per example; returns float32.

  ``aug`` (``config.aug``) holds every field of `FIELDS`: the Keras
  factors, the resampling and the robust ops' factors; None uses the
  original's factors with the 'single' resampling and the robust ops off.
  Example i is `augment_image` of its image with key i of `rng`'s split.
  """
  factors = dict(FIELDS) if aug is None else {
      name: type(default)(aug[name]) for name, default in FIELDS.items()}
  photometric = {name: factors.pop(name) for name in _PHOTOMETRIC_FIELDS}
  keys = jax.random.split(rng, images.shape[0])
  if not (_framing_on(factors['scale_min'], factors['scale_max'])
          or _photometric_on(photometric)):
    # The original's program, unchanged.
    return jax.vmap(lambda k, x: augment_image(k, x, **factors))(keys, images)
  # The same computation in stages, each stage's values computed before the
  # next one reads them.
  height, width = images.shape[1:3]
  drawn = _computed_first(rng, jax.vmap(
      lambda k: _draw(k, height, width, **factors))(keys))
  images = jax.vmap(_transform)(images, drawn)
  if _photometric_on(photometric):
    images = jax.vmap(lambda k, x: _photometric_stage(k, x, photometric))(
        keys, _computed_first(rng, images))
  return images
