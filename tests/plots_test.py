"""Tests for gender_jax.plots: pictures as arrays, valid PNGs, paging."""

import os

import numpy as np
from PIL import Image

from gender_jax import plots

CLASS_NAMES = ('female', 'male')


def bins_of(num_bins=10):
  """Calibration bins as evaluate makes them, some empty."""
  edges = np.linspace(0.5, 1.0, num_bins + 1)
  return [{'lower': float(lo), 'upper': float(hi), 'count': 3 * (i % 3),
           'accuracy': .6 + .03 * i if i % 3 else None,
           'confidence': float((lo + hi) / 2) if i % 3 else None}
          for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]


def assert_png(path):
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    assert im.format == 'PNG' and min(im.size) > 100


def assert_picture(image):
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  assert min(image.shape[:2]) > 100 and image.std() > 0   # Something drawn.


def test_pictures_are_arrays_written_as_pngs(tmp_path):
  cm = plots.confusion_matrix([[40, 9], [12, 39]], CLASS_NAMES)
  rel = plots.reliability_diagram(bins_of(), 0.0421)
  curve = [{'coverage': c, 'threshold': 1.0 - c / 2, 'count': round(100 * c),
            'accuracy': 1.0 - c / 10} for c in (0.25, 0.5, 0.8, 1.0)]
  cov = plots.coverage_accuracy(curve, curve[2:3], 100)
  for image in (cm, rel, cov):
    assert_picture(image)
  path = str(tmp_path / 'cm.png')
  plots.write_png(cm, path)
  assert_png(path)
  with Image.open(path) as im:
    np.testing.assert_array_equal(np.asarray(im.convert('RGB')), cm)
  assert os.listdir(tmp_path) == ['cm.png']       # No temporary left.


def test_wrong_predictions_are_paged():
  rng = np.random.default_rng(0)
  faces = rng.integers(0, 255, (65, 24, 20, 3), np.uint8)
  pages = plots.wrong_prediction_pages(faces, np.ones(65, int),
                                       np.linspace(0, .4, 65), CLASS_NAMES,
                                       per_page=30)
  assert len(pages) == 3
  for page in pages:
    assert_picture(page)
  assert [os.path.basename(p) for p in plots.wrong_page_paths('d', 3)] == [
      'wrong_predictions.png', 'wrong_predictions_2.png',
      'wrong_predictions_3.png']
  none = plots.wrong_prediction_pages([], [], [], CLASS_NAMES)
  assert len(none) == 1
  assert_picture(none[0])


def test_image_grid_with_multiline_titles():
  faces = np.zeros((7, 30, 25, 3), np.uint8)
  height, width, _ = plots.image_grid(faces, [f'#{i}\na\nb' for i in range(7)],
                                      'G').shape
  assert width > height       # 6 columns, 2 rows.
