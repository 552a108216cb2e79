"""Tests for gender_jax.fileio: whole files or none."""

import errno
import json
import os

import pytest

from gender_jax import fileio


def test_write_json_round_trip_and_replace(tmp_path):
  path = str(tmp_path / 'r.json')
  fileio.write_json(path, {'b': 1, 'a': [1, 2]}, sort_keys=True)
  fileio.write_atomic(path, json.dumps({'new': True}))
  with open(path) as f:
    assert json.load(f) == {'new': True}
  assert os.listdir(tmp_path) == ['r.json']


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path,
                                                          monkeypatch):
  path = str(tmp_path / 'r.json')
  fileio.write_json(path, {'old': 1})

  def full(*args):
    raise OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(os, 'replace', full)
  with pytest.raises(OSError):
    fileio.write_json(path, {'new': 2})
  monkeypatch.undo()
  with open(path) as f:
    assert json.load(f) == {'old': 1}
  assert os.listdir(tmp_path) == ['r.json']
