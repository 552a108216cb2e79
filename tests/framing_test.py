"""Tests for gender_jax.framing: the labeller's framing and where it comes
from (the end-to-end effect on labels is in label_test)."""

import json
import os

import ml_collections
import pytest

from gender_jax import framing


def _config_with_metadata(tmp_path, meta):
  """A config whose data_dir holds `meta` as the dataset's metadata.json
  (as prepare_data.py writes it); returns (config, metadata path)."""
  path = tmp_path / 'data' / framing.DATASET_METADATA
  path.parent.mkdir(parents=True)
  path.write_text(json.dumps(meta))
  return ml_collections.ConfigDict({'data_dir': str(tmp_path / 'data')}), path


def test_metadata_path_is_the_datasets():
  """The TF-free restatement matches `dataset.dataset_dir`."""
  from gender_jax import dataset  # pylint: disable=g-import-not-at-top
  assert framing.DATASET_METADATA == os.path.join(dataset.dataset_dir(''),
                                                  'metadata.json')


def test_resolve_framing_order_and_errors(tmp_path):
  config, meta_path = _config_with_metadata(
      tmp_path, {'resize': 'pad', 'box_margin': 0.25})
  boxes = tmp_path / 'boxes.csv'
  boxes.write_text('a/b,1,2,3,4\n')
  found, line = framing.resolve_framing(config, boxes=str(boxes))
  assert (found.resize, found.box_margin) == ('pad', 0.25)
  assert found.box('a/b.jpg') == (1, 2, 3, 4) and found.box('c') is None
  assert found.boxes_of(['c', 'a/b.png']) == [None, (1, 2, 3, 4)]
  assert line == (f'Framing: resize=pad (training data {meta_path}), 1 face '
                  f'boxes from {boxes}, box_margin=0.25 (training data '
                  f'{meta_path}).')
  found, line = framing.resolve_framing(config, 'stretch', str(boxes), 0.0)
  assert (found.resize, found.box_margin) == ('stretch', 0.0)
  assert 'resize=stretch (given)' in line and '0.0 (given)' in line
  default = ml_collections.ConfigDict({'data_dir': str(tmp_path / 'none')})
  found, line = framing.resolve_framing(default)
  assert found == framing.Framing() and found.boxes_of(['a/b']) is None
  assert line == 'Framing: resize=stretch (default), no face boxes.'
  boxes.write_text('a/b,1,2,3\n')
  for kwargs, words in (({'resize': 'fit'}, "--resize='fit'"),
                        ({'box_margin': -1.0}, '--box_margin=-1.0'),
                        ({'boxes': str(boxes)}, 'line 1')):
    with pytest.raises(framing.FramingError, match=words) as error:
      framing.resolve_framing(config, **kwargs)
    assert '\n' not in str(error.value)


def test_unreadable_metadata_is_no_metadata(tmp_path):
  config, meta_path = _config_with_metadata(tmp_path, {})
  meta_path.write_text('{not json')
  found, line = framing.resolve_framing(config)
  assert found == framing.Framing() and '(default)' in line
