"""Tests of gender_jax.augment against the Keras layers of the original."""

import os

os.environ.setdefault('KERAS_BACKEND', 'tensorflow')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import pytest

from gender_jax import augment

H, W = 24, 20


def _images(n=4, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3)).astype(
      np.uint8)


def test_shapes_dtype_and_range():
  out = augment.augment_batch(jax.random.key(0), jnp.asarray(_images(8)))
  assert out.shape == (8, H, W, 3)
  assert out.dtype == jnp.float32
  assert float(out.min()) >= 0.0 and float(out.max()) <= 255.0


def test_same_key_same_output_and_keys_differ():
  images = jnp.asarray(_images(4))
  a = augment.augment_batch(jax.random.key(1), images)
  b = augment.augment_batch(jax.random.key(1), images)
  c = augment.augment_batch(jax.random.key(2), images)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  # Per-example keys: each example gets different parameters.
  same = jnp.asarray(np.repeat(_images(1), 4, axis=0))
  out = np.asarray(augment.augment_batch(jax.random.key(3), same))
  assert not np.allclose(out[0], out[1])


def test_flip_really_flips():
  image = jnp.asarray(_images(1)[0])
  flips = 0
  for seed in range(20):
    out = np.asarray(augment.augment_image(
        jax.random.key(seed), image, flip=True, rotation=0.0, zoom=0.0,
        translation=0.0, brightness=0.0))
    if np.array_equal(out, np.asarray(image)[:, ::-1].astype(np.float32)):
      flips += 1
    else:
      np.testing.assert_array_equal(out, np.asarray(image, np.float32))
  assert 3 <= flips <= 17


def test_all_factors_zero_is_identity():
  images = _images(2)
  out = augment.augment_batch(jax.random.key(0), jnp.asarray(images), _aug(
      flip=False, rotation=0.0, zoom=0.0, translation=0.0, brightness=0.0))
  np.testing.assert_array_equal(np.asarray(out), images.astype(np.float32))


def _aug(**kw):
  """A full `config.aug`: the fields' defaults (`augment.FIELDS`), then kw."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict({**augment.FIELDS, **kw})


@pytest.mark.parametrize('angle', [-36.0, -7.5, 0.0, 12.25, 36.0])
def test_rotation_matches_keras(angle):
  import keras  # pylint: disable=g-import-not-at-top
  images = _images(1).astype(np.float32)
  layer = keras.layers.RandomRotation(0.1)
  matrix = layer._compute_affine_matrix(  # pylint: disable=protected-access
      center_x=0.5, center_y=0.5, angle=np.array([angle], np.float32),
      translate_x=np.zeros(1, np.float32), translate_y=np.zeros(1, np.float32),
      scale=np.ones(1, np.float32), shear_x=np.zeros(1, np.float32),
      shear_y=np.zeros(1, np.float32), height=H, width=W)
  want = layer.transform_images(images, {'rotation_matrix': matrix})
  got = augment.affine_transform(
      jnp.asarray(images[0]), augment.rotation_transform(angle, H, W))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want)[0], atol=2e-3)


@pytest.mark.parametrize('zoom', [0.99, 1.0, 1.007])
def test_zoom_matches_keras(zoom):
  import keras  # pylint: disable=g-import-not-at-top
  images = _images(1).astype(np.float32)
  z = np.array([[zoom]], np.float32)
  want = keras.layers.RandomZoom(0.01).transform_images(
      images, {'height_zoom': z, 'width_zoom': z})
  got = augment.affine_transform(
      jnp.asarray(images[0]), augment.zoom_transform(zoom, H, W))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want)[0], atol=2e-3)


@pytest.mark.parametrize('dy,dx', [(1.2, -0.9), (-1.1, 0.4), (0.0, 0.0)])
def test_translation_matches_keras(dy, dx):
  import keras  # pylint: disable=g-import-not-at-top
  images = _images(1).astype(np.float32)
  want = keras.layers.RandomTranslation(0.05, 0.05).transform_images(
      images, {'translations': np.array([[dx, dy]], np.float32),
               'input_shape': images.shape})
  got = augment.affine_transform(
      jnp.asarray(images[0]), augment.translation_transform(dy, dx))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want)[0], atol=2e-3)


def test_brightness_matches_keras_and_clips():
  import keras  # pylint: disable=g-import-not-at-top
  images = _images(1).astype(np.float32)
  layer = keras.layers.RandomBrightness(0.5, value_range=(0, 255))
  key = jax.random.key(5)
  got = augment.augment_image(key, jnp.asarray(images[0]), flip=False,
                              rotation=0.0, zoom=0.0, translation=0.0,
                              brightness=0.5)
  # Recover the offset from an unclipped pixel.
  diff = np.asarray(got) - images[0]
  unclipped = (np.asarray(got) > 0) & (np.asarray(got) < 255)
  delta = float(np.median(diff[unclipped]))
  np.testing.assert_allclose(diff[unclipped], delta, atol=1e-3)
  assert 0 < abs(delta) <= 127.5
  want = layer.transform_images(
      images, {'rgb_delta': np.full((1, 1, 1, 1), delta, np.float32)})
  np.testing.assert_allclose(np.asarray(got), np.asarray(want)[0], atol=1e-3)
  assert float(got.min()) >= 0.0 and float(got.max()) <= 255.0


def _ramp(height=H, width=W):
  """An image affine in (x, y): bilinear interpolation of it is exact."""
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  return np.stack([60 + 3 * x + 2 * y + 10 * c for c in range(3)], -1)


def test_compose_equals_resampling_twice():
  image = jnp.asarray(_ramp())
  first = augment.rotation_transform(3.0, H, W)
  second = augment.translation_transform(0.5, -0.7)
  twice = augment.affine_transform(augment.affine_transform(image, first),
                                   second)
  once = augment.affine_transform(image,
                                  augment.compose(first, second))
  # Away from the borders no coordinate is reflected at either stage.
  np.testing.assert_allclose(np.asarray(once)[4:-4, 4:-4],
                             np.asarray(twice)[4:-4, 4:-4], atol=1e-3)
  assert not np.allclose(np.asarray(once), np.asarray(image))


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_single_resampling_draws_the_chains_parameters(seed):
  """Same key, same flip/rotation/zoom/shift/brightness: on an image where
  interpolation is exact the two agree wherever no layer reflected."""
  images = jnp.asarray(np.repeat(_ramp(40, 36)[None], 8, axis=0))
  factors = dict(flip=True, rotation=0.01, zoom=0.01, translation=0.02,
                 brightness=0.3)
  single = augment.augment_batch(jax.random.key(seed), images,
                                 _aug(**factors, resampling='single'))
  chain = augment.augment_batch(jax.random.key(seed), images,
                                _aug(**factors, resampling='chain'))
  np.testing.assert_allclose(np.asarray(single)[:, 6:-6, 6:-6],
                             np.asarray(chain)[:, 6:-6, 6:-6], atol=2e-3)
  # The examples did get different parameters.
  assert not np.allclose(np.asarray(single)[0], np.asarray(single)[1])


def test_single_resamples_once_and_chain_three_times():
  image = jnp.asarray(_images(1))

  def gathers(resampling):
    jaxpr = jax.make_jaxpr(lambda x: augment.augment_batch(
        jax.random.key(0), x, _aug(flip=True, rotation=0.1, zoom=0.01,
                                   translation=0.05, brightness=0.5,
                                   resampling=resampling)))(image)
    return str(jaxpr).count(' gather[')

  # One gather of the 2x2 bilinear neighbourhood per resampling.
  assert gathers('single') == 1
  assert gathers('chain') == 3


def test_unknown_resampling_is_refused():
  with pytest.raises(ValueError, match='resampling'):
    augment.augment_image(jax.random.key(0), jnp.asarray(_images(1)[0]),
                          resampling='bicubic')


# sha256 (first 16 hex digits) of the jitted `augment_batch` output of
# `_images(4)` under the original's factors, computed by the code before the
# robust ops existed (JAX 0.10.2, CPU): defaults must keep it bit for bit.
ORIGINAL_DIGESTS = {
    ('single', 0): 'a18ae3306153b3b7', ('single', 1): 'b5a671c5d24054ee',
    ('single', 2): '0f571e830888d00c', ('chain', 0): '1926112bee28d437',
    ('chain', 1): '9fad20733dbeef97', ('chain', 2): 'bb9b037304eaa739',
}


@pytest.mark.parametrize('resampling', augment.RESAMPLINGS)
def test_robust_defaults_keep_the_original_output_bit_for_bit(resampling):
  import hashlib  # pylint: disable=g-import-not-at-top
  images = jnp.asarray(_images(4))
  for aug in (_aug(resampling=resampling),
              _aug(flip=True, rotation=0.1, zoom=0.01, translation=0.05,
                   brightness=0.5, resampling=resampling)):
    run = jax.jit(lambda k, x, aug=aug: augment.augment_batch(k, x, aug))
    for seed in range(3):
      out = np.asarray(run(jax.random.key(seed), images))
      assert hashlib.sha256(out.tobytes()).hexdigest()[:16] == (
          ORIGINAL_DIGESTS[resampling, seed])


def test_robust_ops_off_trace_nothing_new():
  def jaxpr(**robust):
    return str(jax.make_jaxpr(lambda x: augment.augment_batch(
        jax.random.key(0), x, _aug(**robust)))(
            jnp.asarray(_images(2))))
  off = jaxpr()
  assert 'random_fold_in' not in off and 'dot_general' not in off
  assert 'random_fold_in' in jaxpr(grayscale=0.5)
  assert 'dot_general' in jaxpr(blur=0.5)


def _robust(image, seed=0, **factors):
  """augment_image with the original layers off and `factors` on."""
  base = dict(flip=False, rotation=0.0, zoom=0.0, translation=0.0,
              brightness=0.0)
  return np.asarray(augment.augment_image(
      jax.random.key(seed), jnp.asarray(image), **{**base, **factors}))


def _high_frequency(image):
  """Mean squared difference of neighbouring pixels."""
  image = np.asarray(image, np.float64)
  return (np.mean(np.diff(image, axis=0) ** 2)
          + np.mean(np.diff(image, axis=1) ** 2))


def test_robust_ops_at_zero_are_identity():
  image = _images(1)[0]
  zeros = {op: 0.0 for op in augment.PHOTOMETRIC_OPS}
  out = _robust(image, scale_min=1.0, scale_max=1.0, blur_sigma_min=1.0,
                blur_sigma_max=2.0, downscale_min=0.2, **zeros)
  np.testing.assert_array_equal(out, image.astype(np.float32))


def test_grayscale_makes_channels_equal():
  image = _images(1)[0]
  out = _robust(image, grayscale=1.0)
  np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-3)
  np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-3)
  np.testing.assert_allclose(
      out[..., 0], image.astype(np.float32) @ [0.2989, 0.587, 0.114],
      atol=1e-2)


@pytest.mark.parametrize('op,factors', [
    ('blur', dict(blur=1.0, blur_sigma_min=1.0, blur_sigma_max=1.5)),
    ('downscale', dict(downscale=1.0, downscale_min=0.3))])
def test_blur_and_down_up_lose_detail_and_keep_shape(op, factors):
  image = _images(1, seed=3)[0]
  for seed in range(3):
    out = _robust(image, seed=seed, **factors)
    assert out.shape == image.shape and out.dtype == np.float32, op
    assert _high_frequency(out) < 0.5 * _high_frequency(image), op
    assert 0.0 <= out.min() and out.max() <= 255.0
    # Flat regions stay flat: no darkened borders.
    flat = _robust(np.full_like(image, 90), seed=seed, **factors)
    np.testing.assert_allclose(flat, 90.0, atol=1e-3)


def test_blur_is_dm_pix_gaussian_blur_inside_the_image():
  import dm_pix  # pylint: disable=g-import-not-at-top
  image = jnp.asarray(_images(1, seed=4)[0], jnp.float32)
  for sigma in (0.5, 1.5):
    want = dm_pix.gaussian_blur(image, sigma, 13)
    got = augment.gaussian_blur(image, sigma)
    np.testing.assert_allclose(np.asarray(got)[6:-6, 6:-6],
                               np.asarray(want)[6:-6, 6:-6], atol=1e-2)


def test_down_up_of_scale_one_is_identity_and_small_scales_lose_more():
  image = jnp.asarray(_images(1, seed=4)[0], jnp.float32)
  np.testing.assert_allclose(np.asarray(augment.down_up(image, 1.0)),
                             np.asarray(image), atol=1e-3)
  energy = [_high_frequency(augment.down_up(image, s)) for s in (0.8, 0.5, 0.3)]
  assert energy[0] > energy[1] > energy[2]


def _mid_range_image(seed=0):
  """Colourful pixels away from 0 and 255, so no op clips."""
  rng = np.random.default_rng(seed)
  return rng.integers(70, 186, (H, W, 3)).astype(np.float32)


def test_contrast_keeps_channel_means_and_scales_spread():
  image = _mid_range_image()
  out = _robust(image, contrast=0.3)
  np.testing.assert_allclose(out.mean((0, 1)), image.mean((0, 1)), atol=1e-2)
  ratio = out.std((0, 1)) / image.std((0, 1))
  assert not np.allclose(ratio, 1.0, atol=1e-3)
  assert np.all((0.7 - 1e-4 <= ratio) & (ratio <= 1.3 + 1e-4))
  np.testing.assert_allclose(ratio, ratio[0], atol=1e-4)


def test_saturation_and_hue_keep_gray_and_value():
  image = _mid_range_image(1)
  gray = np.repeat(image[..., :1], 3, axis=-1)
  for seed in range(3):
    for factors in (dict(saturation=0.3), dict(hue=0.05)):
      out = _robust(image, seed=seed, **factors)
      assert not np.allclose(out, image, atol=0.5), factors
      assert 0.0 <= out.min() and out.max() <= 255.0
      # HSV's value (the largest channel) is kept; gray has no hue or
      # saturation to change.
      np.testing.assert_allclose(out.max(-1), image.max(-1), atol=1e-2)
      np.testing.assert_allclose(_robust(gray, seed=seed, **factors), gray,
                                 atol=1e-2)
    # Hue rotates the colour: each pixel keeps its smallest channel too.
    np.testing.assert_allclose(_robust(image, seed=seed, hue=0.05).min(-1),
                               image.min(-1), atol=1e-2)


def _disk(size=40, radius=8):
  y, x = np.mgrid[0:size, 0:size] - (size - 1) / 2.0
  return np.repeat(np.where(x ** 2 + y ** 2 <= radius ** 2, 220.0, 20.0)[
      ..., None], 3, axis=-1).astype(np.float32)


@pytest.mark.parametrize('resampling', augment.RESAMPLINGS)
@pytest.mark.parametrize('scale', [0.8, 1.25])
def test_framing_scales_the_face_and_moves_it(scale, resampling):
  image = _disk()
  area = np.sum(image[..., 0] > 120)
  centres = []
  for seed in range(4):
    out = _robust(image, seed=seed, scale_min=scale, scale_max=scale,
                  resampling=resampling)[..., 0] > 120
    assert abs(out.sum() / area - scale ** 2) < 0.12 * scale ** 2
    centres.append(tuple(np.argwhere(out).mean(0).round(1)))
  assert len(set(centres)) > 1   # Random placement.


def test_framing_draws_log_uniform_scales_in_range():
  image = _disk()
  area = np.sum(image[..., 0] > 120)
  ratios = [np.sum(_robust(image, seed=seed, scale_min=0.8,
                           scale_max=1.25)[..., 0] > 120) / area
            for seed in range(24)]
  assert 0.8 ** 2 * 0.88 <= min(ratios) and max(ratios) <= 1.25 ** 2 * 1.12
  assert min(ratios) < 0.85 and max(ratios) > 1.2


def test_framing_is_one_more_resampling():
  def gathers(resampling):
    aug = _aug(resampling=resampling, scale_min=0.8, scale_max=1.25)
    return str(jax.make_jaxpr(lambda x: augment.augment_batch(
        jax.random.key(0), x, aug))(jnp.asarray(_images(1)))).count(' gather[')
  assert gathers('single') == 1
  assert gathers('chain') == 4


# The robust recipe's values (configs/robust.py), stronger probabilities.
ROBUST = dict(translation=0.08, scale_min=0.8, scale_max=1.25, contrast=0.3,
              saturation=0.3, hue=0.05, grayscale=0.5, blur=0.5,
              blur_sigma_min=0.1, blur_sigma_max=1.5, downscale=0.5,
              downscale_min=0.35)


@pytest.mark.parametrize('resampling,factors', [
    ('single', ROBUST), ('chain', ROBUST),
    ('single', dict(scale_min=0.8, scale_max=1.25))])
def test_robust_batch_range_determinism_and_batch_independence(resampling,
                                                               factors):
  aug = _aug(resampling=resampling, **factors)
  run = jax.jit(lambda k, x: augment.augment_batch(k, x, aug))
  images = _images(6, seed=5)
  a = np.asarray(run(jax.random.key(7), jnp.asarray(images)))
  assert a.shape == images.shape and a.dtype == np.float32
  assert a.min() >= 0.0 and a.max() <= 255.0
  np.testing.assert_array_equal(
      a, np.asarray(run(jax.random.key(7), jnp.asarray(images))))
  assert not np.allclose(a, np.asarray(run(jax.random.key(8),
                                           jnp.asarray(images))))
  # An example's output depends on its own key and image only.
  others = images.copy()
  others[1:] = _images(5, seed=6)
  b = np.asarray(run(jax.random.key(7), jnp.asarray(others)))
  np.testing.assert_array_equal(a[0], b[0])
  keys = jax.random.split(jax.random.key(7), 6)
  factors = {name: aug[name] for name in augment.FIELDS}
  one = np.asarray(augment.augment_image(keys[3], jnp.asarray(images[3]),
                                         **factors))
  np.testing.assert_allclose(one, a[3], atol=1e-2)


def test_robust_ops_keep_the_original_draws():
  """Turning ops on leaves the original layers' draws as they were: on a gray
  image, which saturation, hue and grayscale leave alone, the output is the
  original's."""
  images = jnp.full((3, H, W, 3), 128, jnp.uint8)
  base = dict(augment.FIELDS, brightness=0.3)
  plain = augment.augment_batch(jax.random.key(2), images, _aug(**base))
  robust = augment.augment_batch(jax.random.key(2), images, _aug(
      **dict(base, saturation=0.3, hue=0.05, grayscale=1.0)))
  np.testing.assert_allclose(np.asarray(plain), np.asarray(robust), atol=1e-2)


def test_unknown_robust_factor_is_refused():
  with pytest.raises(TypeError, match='sharpness'):
    augment.augment_image(jax.random.key(0), jnp.asarray(_images(1)[0]),
                          sharpness=0.5)
