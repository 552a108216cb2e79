"""The user-error type every module raises and every script prints as one
line, and the operating-system errors that are the user's to fix."""

import errno
import os
from typing import Optional


class UserError(Exception):
  """A mistake in the user's input (flag, file, folder): the message says
  which and what to do; scripts print it as one line and exit with status 2."""


# OS errors about the user's files and disks, not our code: what to do.
_ENVIRONMENT = {
    errno.ENOSPC: 'the disk is full: free space or write elsewhere',
    errno.EDQUOT: 'the disk quota is used up: free space or write elsewhere',
    errno.EACCES: 'no permission: choose a path you can write to',
    errno.EPERM: 'not permitted: choose a path you can write to',
    errno.EROFS: 'a read-only file system: write elsewhere',
    errno.EISDIR: 'it is a directory: give a file path',
    errno.ENOTDIR: 'a part of the path is a file, not a folder',
    errno.ENAMETOOLONG: 'the name is too long',
    errno.EIO: 'the disk reported an I/O error',
}
_DISK_FULL = ('No space left on device', 'Disk quota exceeded')


def environment_error(error: BaseException) -> Optional[str]:
  """One line for an error caused by the user's disk or paths (full,
  read-only, a directory where a file goes...), found in `error` or the
  exceptions it was raised from; None for anything else (our bugs)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if (isinstance(error, OSError) and error.errno == errno.EEXIST and
        error.filename and os.path.isfile(error.filename)):
      return (f'{error.filename} is a file where a folder is needed: choose '
              'another path.')
    if isinstance(error, OSError) and error.errno in _ENVIRONMENT:
      where = ' -> '.join(str(f) for f in (error.filename, error.filename2)
                          if f is not None)
      return (f'{where + ": " if where else ""}{error.strerror or error} '
              f'({_ENVIRONMENT[error.errno]}).')
    text = str(error)
    for phrase in _DISK_FULL:
      if phrase in text:
        return (f'{phrase} while writing ({text.strip().splitlines()[0][:200]}'
                '): free space or write elsewhere.')
    error = error.__cause__ or error.__context__
  return None
