"""Start-up and user-error handling shared by the entry points in `scripts/`."""

import contextlib
import logging as std_logging
import os
import re
import sys
from typing import Iterator, Type

from absl import flags
from absl import logging

from gender_jax import cpu
from gender_jax import errors
from gender_jax.errors import UserError  # Re-exported for the scripts.

_CHATTY = ('orbax', 'tensorflow_datasets', 'xla_bridge')
# Exit status of a run stopped by the user's own mistake (as argparse's).
USAGE_EXIT_STATUS = 2


def _drop_library_info(record) -> bool:
  """Drops orbax, TFDS and JAX backend-probe INFO chatter (their warnings and errors stay)."""
  return record.levelno > std_logging.INFO or not any(
      name in record.pathname for name in _CHATTY)


def start() -> None:
  """Call first in a script's `main`: CPU malloc settings, quiet libraries.

  May re-execute the process once (see `gender_jax.cpu`).
  """
  cpu.reexec_with_malloc_tunables()
  # On the handler, so that records of other loggers (jax's backend probe
  # logs "Unable to initialize backend 'tpu'" through its own) pass it too.
  logging.get_absl_handler().addFilter(_drop_library_info)


def quiet_tensorflow() -> None:
  """Call before TensorFlow is imported (it reads these once, at load): no
  start-up notices on stderr. TF_CPP_MIN_LOG_LEVEL=1 drops TF's C++ INFO logs
  (the CPU-feature note; warnings and errors stay). The oneDNN notice ignores
  that level; only TF_ENABLE_ONEDNN_OPTS=0 removes it, which also turns off
  TF's oneDNN CPU kernels (convolutions, matmuls: unused where TensorFlow
  only reads, writes and decodes data). Values set in the environment win."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')


def fail(program: str, message: str) -> None:
  """Prints `program: error: message` as one line on stderr; exits with 2."""
  print(f'{program}: error: {" ".join(str(message).split())}', file=sys.stderr,
        flush=True)
  sys.exit(USAGE_EXIT_STATUS)


@contextlib.contextmanager
def user_errors(program: str, *also: Type[BaseException]) -> Iterator[None]:
  """Turns `UserError` (and the exception types in `also`) raised inside into
  `fail(program, message)`, and so too an error of the user's disk or paths
  (`errors.environment_error`: full, read-only, a directory where a file
  goes...). With absl's --verbosity >= 1 the traceback is printed first, for
  debugging."""
  try:
    yield
  except (UserError, *also) as e:  # pylint: disable=catching-non-exception
    if logging.get_verbosity() >= 1:
      raise
    fail(os.path.basename(program), e)
  except Exception as e:  # pylint: disable=broad-except
    line = errors.environment_error(e)
    if line is None or logging.get_verbosity() >= 1:
      raise
    fail(os.path.basename(program), line)


def parse_flags(argv):
  """absl `app.run` flags parser for the scripts: a bad or missing flag, or an
  unknown `--config.<key>` (ml_collections raises a bare AttributeError whose
  text quotes the key and may suggest a near name), is one line on stderr and
  exit status 2. So is a `--config` file that cannot be read (ml_collections
  defers that error to the first use of the flag)."""
  program = os.path.basename(argv[0])
  try:
    argv = flags.FLAGS(argv)
    if 'config' in flags.FLAGS and flags.FLAGS['config'].present:
      _ = flags.FLAGS.config.get     # Raises the deferred load error.
    return argv
  except OSError as e:
    reason = re.search(r'\[Errno \d+\] .*', str(e))
    fail(program, f'cannot load {flags.FLAGS["config"].serialize()}'
         f'{": " + reason.group(0) if reason else ""}.')
  except flags.Error as e:
    fail(program, f'{str(e).rstrip(".")}. Run with --helpfull to list the '
         'flags.')
  except AttributeError as e:
    text = str(e)
    key = re.search(r'\w+', text)
    key = key.group(0) if key else text
    given = [a for a in argv[1:]
             if re.match(rf'--config\.(\w+\.)*{re.escape(key)}(=|$)', a)]
    hint = re.search(r'Did you mean "(\w+)"', text)
    fail(program, f'unknown config field {key!r}'
         f'{" in " + " ".join(given) if given else ""}'
         f'{" (did you mean " + repr(hint.group(1)) + "?)" if hint else ""}'
         '; configs/default.py lists every field.')
