"""Tests for gender_jax.labels: one home for every label convention."""

import subprocess
import sys

import pytest

from gender_jax import labels


def test_project_convention():
  assert labels.CLASS_NAMES[labels.MALE] == 'male'
  assert labels.CLASS_NAMES[labels.FEMALE] == 'female'
  assert (labels.FEMALE, labels.MALE) == (0, 1)


@pytest.mark.parametrize('value,label', [
    ('male', 1), ('Female', 0), (' 1 ', 1), ('0', 0), ('M', 1), ('f', 0),
    ('man', 1), ('WOMAN', 0)])
def test_parse_label(value, label):
  assert labels.parse_label(value) == label


def test_parse_label_rejects_other_values():
  with pytest.raises(ValueError, match="label '2': expected male"):
    labels.parse_label('2')


def test_source_conventions_translate_to_ours():
  assert labels.utkface_label('0') == labels.MALE      # UTKFace: 0 = male.
  assert labels.utkface_label('1') == labels.FEMALE
  assert labels.celeba_label('1') == labels.MALE       # CelebA Male: +-1.
  assert labels.celeba_label('-1') == labels.FEMALE
  for bad, fn in [('2', labels.utkface_label), ('0', labels.celeba_label)]:
    with pytest.raises(ValueError):
      fn(bad)
  assert labels.match_alias('Valid', labels.SPLIT_ALIASES) == 'validation'
  assert labels.match_alias('Women', labels.CLASS_ALIASES) == 'female'
  assert labels.match_alias('other', labels.CLASS_ALIASES) is None


@pytest.mark.multiprocess
def test_import_does_not_load_tensorflow():
  code = ('import sys, gender_jax.labels, gender_jax.errors, '
          'gender_jax.sources; '
          "print(sorted(m for m in sys.modules if m.startswith('tensorflow')))")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == '[]'


def test_csv_columns_by_name_any_case_first_choice_wins():
  assert labels.csv_columns(['file', 'age', 'gender', 'race']) == {
      'path': 0, 'folder': None, 'label': 2, 'split': None}
  assert labels.csv_columns([' Class_ID', 'Name', 'Gender ']) == {
      'path': None, 'folder': 0, 'label': 2, 'split': None}
  assert labels.csv_columns(['identity', 'image', 'path', 'Sex',
                             'Subset']) == {
      'path': 2, 'folder': 0, 'label': 3, 'split': 4}
  assert labels.csv_columns(['a.jpg', 'male']) == {
      'path': None, 'folder': None, 'label': None, 'split': None}
