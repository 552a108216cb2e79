"""Start-up shared by the command-line entry points in `scripts/`."""

import logging as std_logging

from absl import logging

from gender_jax import cpu

_CHATTY = ('orbax', 'tensorflow_datasets', 'xla_bridge')


def _drop_library_info(record) -> bool:
  """Drops orbax, TFDS and JAX backend-probe INFO chatter (their warnings and errors stay)."""
  return record.levelno > std_logging.INFO or not any(
      name in record.pathname for name in _CHATTY)


def start() -> None:
  """Call first in a script's `main`: CPU malloc settings, quiet libraries.

  May re-execute the process once (see `gender_jax.cpu`).
  """
  cpu.reexec_with_malloc_tunables()
  logging.get_absl_logger().addFilter(_drop_library_info)
