"""Exclusive lock files: one process at a time in a workdir or on an output.

A lock is a file created with O_EXCL that holds its owner's host, pid, start
time and command line. It is removed when the holder releases it (normally
or by an exception); a lock left by a process that died (same host, pid no
longer running) is taken over with a warning. Another live holder, or one on
another host, makes `hold` raise `LockedError` naming it, so the second
process stops before touching anything.
"""

import contextlib
import json
import os
import socket
import sys
import time
from typing import Iterator, Optional

from absl import logging

from gender_jax import errors


class LockedError(errors.UserError):
  """The lock is held by another live process; the message names it."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def read_holder(path: str) -> Optional[dict]:
  """The holder recorded in lock file `path`, {} if unreadable, None if absent."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}


def _describe(holder: dict, path: str) -> str:
  started = holder.get('started')
  when = (time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))
          if isinstance(started, (int, float)) else 'an unknown time')
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
          f'(since {when}; lock file {path})')


def _try_create(path: str, record: dict) -> bool:
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'w') as f:
    json.dump(record, f)
  return True


# A lock file younger than this that cannot be read is one whose holder has
# not finished writing it yet.
FRESH_SECONDS = 10.0


def _unreadable(path: str, what: str) -> str:
  """The message for a lock file that exists but holds no readable record."""
  try:
    age = time.time() - os.path.getmtime(path)
  except OSError:
    age = 0.0
  if age < FRESH_SECONDS:
    return (f'{what} is being locked by another process right now (its lock '
            f'file {path} is not written yet); try again in a few seconds.')
  return (f'{what} has a lock file {path} that names no process (written '
          f'{age:.0f} s ago, unreadable); if no run is using {what}, delete '
          'it.')


def acquire(path: str, what: str) -> dict:
  """Creates lock file `path` for this process; returns its record.

  `what` names the locked thing in messages (e.g. "workdir runs/stage1").
  Raises LockedError when a live process (or one on another host) holds it.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  record = {'host': socket.gethostname(), 'pid': os.getpid(),
            'started': time.time(), 'argv': sys.argv}
  for _ in range(3):
    if _try_create(path, record):
      return record
    holder = read_holder(path)
    if holder is None:       # Released meanwhile: try again.
      continue
    if not holder:
      raise LockedError(_unreadable(path, what))
    same_host = holder.get('host') == record['host']
    pid = holder.get('pid')
    if same_host and isinstance(pid, int) and pid == os.getpid():
      raise LockedError(f'{what} is already locked by this process '
                        f'({_describe(holder, path)}).')
    if same_host and isinstance(pid, int) and not _pid_alive(pid):
      # Renamed aside first: of two processes taking over the same stale
      # lock, only one moves it, so neither removes the other's new lock.
      aside = f'{path}.stale-{os.getpid()}'
      try:
        os.rename(path, aside)
      except FileNotFoundError:
        continue
      if read_holder(aside) != holder:     # Not the stale one: put it back.
        os.rename(aside, path)
        continue
      os.remove(aside)
      logging.warning('Took over the stale lock of %s left by %s, which is '
                      'no longer running.', what, _describe(holder, path))
      continue
    raise LockedError(
        f'{what} is in use by {_describe(holder, path)}. Wait for that run to '
        f'finish, or if it is gone (e.g. its machine was lost) delete {path}.')
  raise LockedError(f'could not lock {what} ({path}): other processes keep '
                    'taking it; run one at a time.')


def release(path: str, record: dict) -> None:
  """Removes lock file `path` if it is still the one `record` describes."""
  holder = read_holder(path)
  if holder and holder.get('pid') == record['pid'] and (
      holder.get('host') == record['host']):
    try:
      os.remove(path)
    except FileNotFoundError:
      pass


@contextlib.contextmanager
def hold(path: str, what: str) -> Iterator[dict]:
  """`with hold(path, what):` runs the block holding lock file `path`."""
  record = acquire(path, what)
  try:
    yield record
  finally:
    release(path, record)
