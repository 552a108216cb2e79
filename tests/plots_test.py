"""Tests for gender_jax.plots: every picture is a valid PNG; paging."""

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


def test_pictures_are_valid_pngs_and_paged(tmp_path):
  plots.plot_confusion_matrix([[40, 9], [12, 39]], CLASS_NAMES,
                              str(tmp_path / 'cm.png'))
  plots.plot_reliability_diagram(bins_of(), 0.0421, str(tmp_path / 'rel.png'))
  rng = np.random.default_rng(0)
  faces = rng.integers(0, 255, (65, 24, 20, 3), np.uint8)
  pages = plots.plot_wrong_predictions(faces, np.ones(65, int),
                                       np.linspace(0, .4, 65), CLASS_NAMES,
                                       str(tmp_path), per_page=30)
  assert [os.path.basename(p) for p in pages] == [
      'wrong_predictions.png', 'wrong_predictions_2.png',
      'wrong_predictions_3.png']
  for path in [tmp_path / 'cm.png', tmp_path / 'rel.png', *pages]:
    assert_png(path)
  os.makedirs(tmp_path / 'x')
  none = plots.plot_wrong_predictions([], [], [], CLASS_NAMES,
                                      str(tmp_path / 'x'))
  assert len(none) == 1 and os.path.exists(none[0])


def test_image_grid_with_multiline_titles(tmp_path):
  faces = np.zeros((7, 30, 25, 3), np.uint8)
  path = str(tmp_path / 'grid.png')
  plots.plot_image_grid(faces, [f'#{i}\na\nb' for i in range(7)], path, 'G')
  assert_png(path)
  with Image.open(path) as im:
    width, height = im.size
  assert width > height       # 6 columns, 2 rows.
