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
