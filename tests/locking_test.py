"""Tests of gender_jax.locking: exclusive, named holder, stale takeover."""

import json
import os
import subprocess
import sys
import time

import pytest

from gender_jax import locking


def test_second_holder_is_refused_with_the_holder_named(tmp_path):
  path = str(tmp_path / 'run.lock')
  child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    with open(path, 'w') as f:
      json.dump({'host': os.uname().nodename, 'pid': child.pid,
                 'started': 0}, f)
    with pytest.raises(locking.LockedError, match=f'pid {child.pid}'):
      locking.acquire(path, 'workdir W')
  finally:
    child.kill()
    child.wait()


def test_released_on_exit_and_on_error(tmp_path):
  path = str(tmp_path / 'run.lock')
  with locking.hold(path, 'x') as record:
    assert locking.read_holder(path)['pid'] == record['pid'] == os.getpid()
  assert not os.path.exists(path)
  with pytest.raises(RuntimeError):
    with locking.hold(path, 'x'):
      raise RuntimeError('boom')
  assert not os.path.exists(path)


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path):
  path = str(tmp_path / 'run.lock')
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  with open(path, 'w') as f:
    json.dump({'host': os.uname().nodename, 'pid': dead.pid, 'started': 0}, f)
  with locking.hold(path, 'x') as record:
    assert locking.read_holder(path)['pid'] == record['pid']


def test_lock_of_another_host_is_refused(tmp_path):
  path = str(tmp_path / 'run.lock')
  with open(path, 'w') as f:
    json.dump({'host': 'elsewhere', 'pid': 1, 'started': 0}, f)
  with pytest.raises(locking.LockedError, match='host elsewhere'):
    locking.acquire(path, 'x')


def test_unwritten_lock_is_busy_and_an_old_garbage_one_is_named(tmp_path):
  path = str(tmp_path / 'lock')
  open(path, 'w').close()                   # Created, not yet written.
  with pytest.raises(locking.LockedError, match='try again in a few') as e:
    locking.acquire(path, 'workdir w')
  assert 'delete' not in str(e.value)
  old = time.time() - 60
  os.utime(path, (old, old))
  with pytest.raises(locking.LockedError,
                     match='names no process.*if no run is using workdir w, '
                     'delete it'):
    locking.acquire(path, 'workdir w')
