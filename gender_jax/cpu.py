"""CPU process settings that make XLA:CPU (and TensorFlow) faster here.

XLA:CPU allocates each step's large temporary buffers with malloc, which
glibc serves with fresh mmap()s and unmaps on free, so a train step spends
much of its CPU time in page faults on freshly zeroed memory. With glibc's
``glibc.malloc.hugetlb=1`` tunable malloc asks for transparent huge pages on
those mappings, which cuts the faults ~100x (timings: benchmarks/README.md).

glibc reads tunables only when a process starts, so the setting cannot be
applied from inside a running interpreter: entry points call
`reexec_with_malloc_tunables()` first thing, which re-executes the same
command line once with ``GLIBC_TUNABLES`` extended. Library users (e.g. a
notebook) can export the variable themselves:
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``.

XLA:CPU options (`XLA_CPU_FLAGS`) are different: XLA reads ``XLA_FLAGS`` when
JAX first creates its CPU backend, so `set_xla_flags()` runs when the
package is imported and takes effect for any process that imports
gender_jax before its first JAX computation (scripts, tests, notebooks).
XLA aborts on a flag it does not know, so they are only added for the jaxlib
versions they are known to exist in (`XLA_CPU_FLAGS_JAXLIB`).
"""

from importlib import metadata
import os
import platform
import re
import sys
from typing import Mapping, Optional

MALLOC_TUNABLES = 'glibc.malloc.hugetlb=1'
# Set to 1 to keep the process as started (no re-exec).
NO_REEXEC_ENV = 'GENDER_JAX_NO_REEXEC'
_THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'
# jaxlib 0.10's XLA:CPU hands convolutions to YNNPACK by default; its own
# convolution thunk runs the model's first two convs faster and the last two
# as fast, so convolutions are taken out of the YNN fusion list (dots and
# reductions stay with YNN).
XLA_CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=-individual_convolution',)
# jaxlib versions [from, to) whose XLA accepts XLA_CPU_FLAGS (an experimental
# flag: checked with 0.10.2; a later jaxlib may rename or drop it).
XLA_CPU_FLAGS_JAXLIB = ((0, 10, 2), (0, 11, 0))


def transparent_hugepages_available() -> bool:
  """True when the kernel grants huge pages on request (madvise/always)."""
  try:
    with open(_THP_SETTING) as f:
      return '[never]' not in f.read()
  except OSError:
    return False


def tunables_env(environ: Mapping[str, str]) -> Optional[dict]:
  """`environ` with MALLOC_TUNABLES added, or None if nothing is to change.

  Nothing changes when the tunable is already there (any value: the user's
  choice wins), when re-exec is disabled by NO_REEXEC_ENV, or off glibc Linux
  or without transparent huge pages.
  """
  current = environ.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.hugetlb' in current or environ.get(NO_REEXEC_ENV) == '1':
    return None
  if sys.platform != 'linux' or platform.libc_ver()[0] != 'glibc':
    return None
  if not transparent_hugepages_available():
    return None
  env = dict(environ)
  env['GLIBC_TUNABLES'] = ':'.join(t for t in (current, MALLOC_TUNABLES) if t)
  return env


def reexec_with_malloc_tunables() -> None:
  """Re-executes this command line with MALLOC_TUNABLES, once; else returns.

  Call it at the very start of a script's main (before work is done: the
  process is replaced). The original command line, ``-m`` included, is kept.
  """
  env = tunables_env(os.environ)
  if env is None:
    return
  env[NO_REEXEC_ENV] = '1'     # Never loop, even if glibc ignores the value.
  args = getattr(sys, 'orig_argv', None) or [sys.executable] + sys.argv
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + list(args[1:]), env)


def jaxlib_version() -> Optional[tuple]:
  """The installed jaxlib's (major, minor, patch), read from its package
  metadata (nothing is imported), or None if it is not installed/readable."""
  try:
    match = re.match(r'(\d+)\.(\d+)\.(\d+)', metadata.version('jaxlib'))
  except metadata.PackageNotFoundError:
    return None
  return tuple(int(v) for v in match.groups()) if match else None


def xla_cpu_flags_supported(version: Optional[tuple]) -> bool:
  """True when jaxlib `version` is in the XLA_CPU_FLAGS_JAXLIB range."""
  low, high = XLA_CPU_FLAGS_JAXLIB
  return version is not None and low <= version < high


def xla_flags_env(environ: Mapping[str, str]) -> Optional[str]:
  """``XLA_FLAGS`` with each of XLA_CPU_FLAGS appended, or None if unchanged.

  A flag the user already sets (same name, any value) is left to the user;
  with a jaxlib outside XLA_CPU_FLAGS_JAXLIB nothing is added.
  """
  if not xla_cpu_flags_supported(jaxlib_version()):
    return None
  current = environ.get('XLA_FLAGS', '')
  names = {f.split('=', 1)[0] for f in current.split()}
  extra = [f for f in XLA_CPU_FLAGS if f.split('=', 1)[0] not in names]
  if not extra:
    return None
  return ' '.join([current, *extra]).strip()


def set_xla_flags() -> None:
  """Adds XLA_CPU_FLAGS to this process's ``XLA_FLAGS`` (see module doc)."""
  flags = xla_flags_env(os.environ)
  if flags is not None:
    os.environ['XLA_FLAGS'] = flags
