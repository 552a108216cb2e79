"""Tests for gender_jax.label_csv: rows, the arguments sidecar and repairs
(labelling end to end, resumed or not, is in label_test)."""

import json
import os

import ml_collections
import numpy as np
import pytest

from gender_jax import framing
from gender_jax import label_csv

MC_HEADER = ('path', 'p_male', 'predicted', 'mc_mean', 'mc_std',
             'mc_entropy', 'mc_mutual_info', 'error')


def test_columns():
  assert label_csv.columns(1) == ('path', 'p_male', 'predicted', 'error')
  assert label_csv.columns(2) == MC_HEADER


def test_rows_and_bytes():
  outputs = {k: np.asarray([0.25, 0.25, np.nan], np.float32)
             for k in MC_HEADER[3:-1]}
  outputs['p_male'] = np.asarray([0.5, 0.123456789, np.nan], np.float32)
  name = os.fsdecode(b'Male/latin1_\xe9.jpg')
  rows = label_csv.format_rows(['a.jpg', name, 'b.png'],
                               ['', '', 'OSError: truncated'], outputs,
                               MC_HEADER)
  assert rows == [
      ['a.jpg', '0.5', 'male'] + ['0.25'] * 4 + [''],
      [name, '0.1234568', 'female'] + ['0.25'] * 4 + [''],
      ['b.png'] + [''] * 6 + ['OSError: truncated']]
  assert label_csv.csv_bytes(rows[1:]) == (
      b'Male/latin1_\xe9.jpg,0.1234568,female,0.25,0.25,0.25,0.25,\r\n'
      b'b.png,,,,,,,OSError: truncated\r\n')


def test_append_rows_writes_the_header_once(tmp_path):
  out = str(tmp_path / 'l.csv')
  header = label_csv.columns(1)
  ones = {'p_male': np.ones(2)}
  counts = []
  for batch in ((['a', 'b'], ['', 'bad'], ones), (['c', 'd'], ['', ''], ones)):
    assert label_csv.append_rows(out, header, [batch],
                                 counts.append) == batch[1].count('bad')
  assert counts == [2, 2]
  assert [r[0] for r in label_csv.data_rows(out, header)] == list('abcd')
  with pytest.raises(label_csv.ResumeError, match='has columns'):
    list(label_csv.data_rows(out, MC_HEADER))


def test_sidecar_records_defaults_as_older_versions(tmp_path):
  """Default runtime, temperature, tta and framing are left out, so that a
  CSV of a version without them still resumes."""
  config = ml_collections.ConfigDict({'model': 'cnn', 'image_size': (112, 96)})
  settings = {'mc_samples': 20, 'seed': 0, 'runtime': 'jax',
              'temperature': 1.0, 'tta': 'none', 'checkpoint_step': 7}
  header = label_csv.columns(20)
  args = label_csv.run_arguments('w', 'i', config, settings, header,
                                 framing.Framing())
  assert args == {'workdir': os.path.abspath('w'),
                  'images_dir': os.path.abspath('i'), 'mc_samples': 20,
                  'seed': 0, 'model': 'cnn', 'image_size': [112, 96],
                  'columns': list(header), 'checkpoint_step': 7}
  boxed = framing.Framing('crop', 0.1, '/b.csv', {})
  other = dict(settings, runtime='onnxruntime', temperature=1.5, tta='flip')
  assert label_csv.run_arguments('w', 'i', config, other, header,
                                 boxed) == dict(
      args, runtime='onnxruntime', temperature=1.5, tta='flip',
      resize='crop', boxes='/b.csv', box_margin=0.1)


def test_check_args(tmp_path):
  out, sidecar = tmp_path / 'l.csv', str(tmp_path / 'l.csv.args.json')
  label_csv.check_args(sidecar, {'seed': 0}, str(out))
  assert json.loads(open(sidecar).read()) == {'seed': 0}
  out.write_text('path\n')
  label_csv.check_args(sidecar, {'seed': 0}, str(out))
  with pytest.raises(label_csv.ResumeError, match='seed: was 0, now 1'):
    label_csv.check_args(sidecar, {'seed': 1}, str(out))
  with open(sidecar, 'w') as f:
    f.write('{')
  with pytest.raises(label_csv.ResumeError, match='not readable JSON'):
    label_csv.check_args(sidecar, {'seed': 0}, str(out))
  os.remove(sidecar)
  with pytest.raises(label_csv.ResumeError, match='cannot be resumed'):
    label_csv.check_args(sidecar, {'seed': 0}, str(out))


def test_partial_last_record_is_dropped_wherever_cut(tmp_path):
  """A file name holding a newline is one quoted record over two lines: a
  cut at any of its bytes drops the whole record."""
  header = label_csv.columns(1)
  raw = label_csv.csv_bytes([header, ['a.jpg', '0.5', 'male', ''],
                             ['two\nlines.jpg', '0.25', 'female', '']])
  start = raw.index(b'"two')
  part = tmp_path / 'part.csv'
  for cut in range(start, len(raw) + 1):
    part.write_bytes(raw[:cut])
    label_csv.drop_partial_last_record(str(part), len(header))
    assert part.read_bytes() == raw[:len(raw) if cut == len(raw) else start]


def test_done_paths_repairs_repeats_and_own_outputs(tmp_path):
  header = label_csv.columns(1)
  rows = [['a', '0.5', 'male', ''], ['b', '0.1', 'female', ''],
          ['out.csv', '0.5', 'male', '']]
  out = tmp_path / 'l.csv'
  out.write_bytes(label_csv.csv_bytes([header] + rows + [header] + rows[:1]))
  done, dropped = label_csv.done_paths(str(out), header, {'out.csv'},
                                       str(tmp_path / 'repair.tmp'))
  assert (done, dropped) == ({'a', 'b'}, 3)
  assert out.read_bytes() == label_csv.csv_bytes([header] + rows[:2])
  assert label_csv.done_paths(str(tmp_path / 'none.csv'), header, set(),
                              '') == (set(), 0)
