"""The ('data',) device mesh and helpers to place host batches on it."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh() -> Mesh:
  """A 1-D mesh named 'data' over every device of every process."""
  return Mesh(np.asarray(jax.devices()), ('data',))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated (parameters, optimizer state, rng)."""
  return NamedSharding(mesh, P())


def local_batch_size(global_batch_size: int) -> int:
  """This process's share of a global batch; it must divide evenly."""
  n_dev, n_proc = jax.device_count(), jax.process_count()
  if global_batch_size % n_dev:
    raise ValueError(
        f'batch size {global_batch_size} is not divisible by the {n_dev} '
        'devices; choose a multiple of the device count.')
  return global_batch_size // n_proc


def to_global(batch, mesh: Mesh):
  """Turns a pytree of this process's numpy arrays into global jax.Arrays."""
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      batch)
