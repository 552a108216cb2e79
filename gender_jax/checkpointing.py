"""Orbax checkpoints of a workdir: the latest train state and the best model.

Layout of a workdir ``W``:
  W/config.json      the config of the run that wrote the checkpoints (written
                     by host 0 with the run's first checkpoint, so a run that
                     fails before saving anything leaves it as it was).
  W/checkpoints/<step>/{state,loop}   latest train states (resume); ``state`` is
                     the whole TrainState pytree, ``loop`` a JSON dict with the
                     epoch loop's bookkeeping (epoch, plateau, early stopping).
  W/best/<step>/{model,meta}   the best model so far by the early-stopping rule
                     (Keras ``restore_best_weights``): ``model`` is
                     {'params', 'batch_stats'}, ``meta`` a JSON dict (epoch,
                     val_accuracy, val_loss, ...).
Best is a separate manager rather than ``best_fn`` on one manager because Keras
keeps the weights of the last epoch that improved by more than ``min_delta``,
not simply the highest accuracy. Every process calls save/restore (orbax
coordinates multi-host writes); only host 0 writes plain files.
"""

import functools
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from gender_jax import config_lib
from gender_jax import errors
from gender_jax import fileio
from gender_jax import models

CONFIG_FILE = 'config.json'


def _manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(epath.Path(directory).absolute(), options=options)


def _drop_step(manager: ocp.CheckpointManager, step: int) -> None:
  if step in manager.all_steps():
    manager.delete(step)


class IncompatibleError(errors.UserError):
  """An intact checkpoint this version cannot continue (e.g. written by an
  older one): the message says what to do instead."""


class Checkpointer:
  """Saves/restores the latest train state and the best model of a workdir."""

  def __init__(self, workdir: str,
               config: Optional[ml_collections.ConfigDict] = None,
               max_to_keep: int = 2):
    self.workdir = workdir
    self._config = config    # Written to config.json with the first save.
    self._latest = _manager(os.path.join(workdir, 'checkpoints'), max_to_keep)
    self._best = _manager(os.path.join(workdir, 'best'), 1)

  def latest_step(self) -> Optional[int]:
    return self._latest.latest_step()

  def _write_config_once(self) -> None:
    if self._config is not None:
      write_config(self.workdir, self._config)
      self._config = None

  def save_latest(self, step: int, state: Any, loop: dict) -> None:
    """Saves the train state of `step`, replacing one saved before (a run
    resumed from an older step after a damaged one replays the same steps)."""
    self._write_config_once()
    _drop_step(self._latest, step)
    self._latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop)),
        force=True)
    self._latest.wait_until_finished()

  def restore_latest(self, abstract_state: Any,
                     check: Optional[Callable[[dict], Any]] = None):
    """Returns (state, loop) of the newest checkpoint that restores, or None
    if there is none.

    ``abstract_state`` gives shapes, dtypes and shardings (`abstract_state`,
    or a concrete state); ``check(loop)`` raises for loop bookkeeping that
    cannot be used. A newer step that fails to restore (a truncated or
    damaged file, unreadable loop metadata) while an older one restores is
    moved to ``checkpoints.corrupt/<step>-<time>`` (`set_aside`) with a
    warning naming it and the reason: one lost step, not the run. When no
    step restores nothing is moved and a UserError names the newest step and
    its reason. An `IncompatibleError` of ``check`` (intact metadata of
    another version) is no damage: it stops the restore, naming the step.
    """
    failed = []
    for step in sorted(self._latest.all_steps(), reverse=True):
      try:
        restored = self._latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            loop=ocp.args.JsonRestore()))
        if check is not None:
          check(restored['loop'])
      except IncompatibleError as e:
        raise IncompatibleError(
            f'{self._latest.directory / str(step)}: {e}') from None
      except Exception as e:  # pylint: disable=broad-except
        # Any read error of orbax/tensorstore/JSON: try the next older step.
        failed.append((step, error_line(e)))
        continue
      for bad_step, reason in failed:
        moved = set_aside(self._latest.directory / str(bad_step))
        logging.warning('Checkpoint %s could not be restored (%s): moved '
                        'aside to %s; resuming from step %d.',
                        self._latest.directory / str(bad_step), reason,
                        moved, step)
      if failed:
        self._latest.reload()
      return restored['state'], restored['loop']
    if failed:
      step, reason = failed[0]
      raise errors.UserError(
          f'no checkpoint in {self._latest.directory} can be restored '
          f'(newest, step {step}: {reason}); move that folder aside to start '
          'the run over.')
    return None

  def save_best(self, step: int, variables: Any, meta: dict) -> None:
    """Saves the best model, replacing one of the same step (as save_latest)."""
    self._write_config_once()
    _drop_step(self._best, step)
    model = {'params': variables['params'],
             'batch_stats': variables['batch_stats']}
    self._best.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(model), meta=ocp.args.JsonSave(meta)),
        force=True)
    self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    self._best.close()


def error_line(error: BaseException) -> str:
  """An exception as one short line: its type and first line of text."""
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0][:300] if text else ""}'.rstrip(': ')


def set_aside(path) -> str:
  """Moves a damaged checkpoint folder `<dir>/<step>` to
  `<dir>.corrupt/<step>-<time>` (host 0; every process waits for it) and
  returns the new name. Outside `<dir>`, so orbax never reads it as a step."""
  path = str(path)
  target = os.path.join(f'{os.path.dirname(path)}.corrupt',
                        f'{os.path.basename(path)}-'
                        f'{time.strftime("%Y%m%d-%H%M%S")}')
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(path, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'set_aside {path}')
  return target


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json into the workdir atomically (host 0 only)."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    fileio.write_atomic(os.path.join(workdir, CONFIG_FILE),
                        config.to_json(indent=2))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} not found: {workdir!r} is not a gender_jax workdir. Pass the '
        '--workdir of a run made by scripts/train.py.')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.image_size = tuple(config.image_size)
  try:
    config_lib.validate(config)
  except (KeyError, AttributeError) as e:     # A field it lacks.
    field = str(e).strip('"\'')
    raise IncompatibleError(
        f'{path} has no field {field}: it was written by an older gender_jax '
        'version; train in a new --workdir (or add the field with its value '
        'from configs/default.py).') from None
  return config


def _with_sharding(shapes, sharding):
  """`shapes` (ShapeDtypeStructs) with `sharding` set, if given."""
  if sharding is None:
    return shapes
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      shapes)


def abstract_variables(config: ml_collections.ConfigDict, sharding=None):
  """Shapes/dtypes of {'params','batch_stats'} for `config`'s model."""
  model = models.create_model(config)
  shapes = jax.eval_shape(
      lambda: models.init_variables(model, jax.random.key(0), config.image_size))
  return _with_sharding({k: shapes[k] for k in ('params', 'batch_stats')},
                        sharding)


def abstract_state(config: ml_collections.ConfigDict, create_state: Callable,
                   sharding=None):
  """Shapes/dtypes of the train state that `create_state(config, model,
  variables)` (`steps.create_train_state`) builds from `abstract_variables`:
  what `Checkpointer.restore_latest` restores into."""
  return _with_sharding(jax.eval_shape(
      functools.partial(create_state, config, models.create_model(config)),
      abstract_variables(config)), sharding)


def restore_best(workdir: str, config: Optional[ml_collections.ConfigDict] = None,
                 sharding=None):
  """Returns ({'params','batch_stats'}, meta) of a workdir's best model.

  ``config`` defaults to the workdir's config.json; pass another one (e.g.
  stage 2's, with a different dropout rate) to restore into that model: only
  the variable shapes must agree.
  """
  config = config or read_config(workdir)
  directory = os.path.join(workdir, 'best')
  if not os.path.isdir(directory):
    raise FileNotFoundError(
        f'No best checkpoint in {directory}: the run in {workdir!r} has not '
        'finished an epoch yet.')
  manager = _manager(directory, 1)
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(
          f'No best checkpoint in {directory}: the run in {workdir!r} has not '
          'finished an epoch yet.')
    abstract = abstract_variables(config, sharding)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          model=ocp.args.StandardRestore(abstract),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      # Any read error of orbax/tensorstore/JSON: the files are damaged.
      raise errors.UserError(
          f'the best model {os.path.join(directory, str(step))} cannot be '
          f'read ({error_line(e)}); use the latest train state instead '
          '(evaluate.py --checkpoint=latest) or retrain.') from e
  finally:
    manager.close()
  return restored['model'], restored['meta']


def load_model(workdir: str):
  """Returns (config, model, variables, meta) of a workdir's best model."""
  config = read_config(workdir)
  variables, meta = restore_best(workdir, config)
  return config, models.create_model(config), variables, meta


def restore_latest_variables(workdir: str,
                             config: Optional[ml_collections.ConfigDict] = None,
                             sharding=None, step: Optional[int] = None):
  """Returns ({'params','batch_stats'}, meta) of a workdir's latest train state
  (or of the kept one at `step`).

  Reads only those two collections and the step of ``checkpoints/<step>/state``
  (orbax partial restore), so the optimizer and its state are neither built nor
  read. ``meta`` is the loop's JSON dict plus ``step``. ``config`` as in
  `restore_best`.
  """
  config = config or read_config(workdir)
  directory = os.path.join(workdir, 'checkpoints')
  missing = FileNotFoundError(
      f'No train-state checkpoint in {directory}: the run in {workdir!r} has '
      'not saved one yet.')
  if not os.path.isdir(directory):
    raise missing
  item = abstract_variables(config, sharding)
  item['step'] = jax.ShapeDtypeStruct((), 'int32', sharding=sharding)
  manager = _manager(directory, 1)
  try:
    if step is None:
      step = manager.latest_step()
    if step is None:
      raise missing
    if step not in manager.all_steps():
      raise FileNotFoundError(
          f'No train-state checkpoint of step {step} in {directory}; it keeps '
          f'steps {sorted(manager.all_steps())}.')
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=item, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item)),
        loop=ocp.args.JsonRestore()))
  finally:
    manager.close()
  state = restored['state']
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  return variables, {**restored['loop'], 'step': int(state['step'])}
