"""The ('data',) device mesh, batches placed on it, and multi-host start-up."""

import importlib.util
import os
from typing import Optional

from absl import logging
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gender_jax import errors


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
    raise errors.UserError(
        f'batch size {global_batch_size} is not divisible by the {n_dev} '
        'devices; choose a multiple of the device count.')
  return global_batch_size // n_proc


def to_global(batch, mesh: Mesh):
  """Turns a pytree of this process's numpy arrays into global jax.Arrays."""
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      batch)


def maybe_initialize_distributed(config: Optional[ml_collections.ConfigDict]
                                 = None) -> bool:
  """Calls `jax.distributed.initialize` when asked to; True if it is running.

  Asked by `config.distributed` or by the environment
  (`JAX_COORDINATOR_ADDRESS`, with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`).
  Without the address, `initialize()` auto-detects the cluster (TPU pods,
  SLURM, ...). On CPU, collectives across processes use gloo. Must run before
  anything touches the devices; a second call does nothing.
  """
  env = os.environ
  wanted = bool(config is not None and config.get('distributed', False))
  if not (wanted or env.get('JAX_COORDINATOR_ADDRESS')):
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = {}
  if env.get('JAX_NUM_PROCESSES'):
    kwargs['num_processes'] = int(env['JAX_NUM_PROCESSES'])
  if env.get('JAX_PROCESS_ID'):
    kwargs['process_id'] = int(env['JAX_PROCESS_ID'])
  if env.get('JAX_PLATFORMS', '').startswith('cpu') or not _has_accelerator():
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)
  logging.info('jax.distributed: process %d of %d, %d devices in all.',
               jax.process_index(), jax.process_count(), jax.device_count())
  return True


def _has_accelerator() -> bool:
  """Whether a GPU/TPU plugin is installed (without initialising backends)."""
  return any(importlib.util.find_spec(name) is not None
             for name in ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'libtpu',
                          'jax_rocm60_plugin'))
