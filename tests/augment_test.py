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
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(kw)


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
