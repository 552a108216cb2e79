"""Latest/best checkpoints round-trip exactly; missing ones fail clearly."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gender_jax import checkpointing
from gender_jax import config_lib
from gender_jax import models
from gender_jax import sharding
from gender_jax import steps

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'configs')


def _tiny_config():
  config = config_lib.load_sibling(os.path.join(CONFIGS, 'x'), 'stage1.py')
  config.model = 'tiny'
  config.image_size = (24, 20)
  return config


def _equal(a, b):
  return jax.tree.all(jax.tree.map(
      lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b))


def test_latest_and_best_round_trip(tmp_path):
  workdir = str(tmp_path / 'w')
  config = _tiny_config()
  model = models.create_model(config)
  variables = models.init_variables(model, jax.random.key(0), config.image_size)
  state = {'params': variables['params'],
           'batch_stats': variables['batch_stats'],
           'opt': optax.nadam(1e-3).init(variables['params']),
           'step': jnp.int32(7)}
  checkpointing.write_config(workdir, config)
  ckpt = checkpointing.Checkpointer(workdir)
  assert ckpt.restore_latest(state) is None
  ckpt.save_latest(7, state, {'epoch': 1, 'history': [0.5]})
  ckpt.save_best(7, variables, {'epoch': 1, 'val_accuracy': 0.75})
  assert ckpt.latest_step() == 7
  restored, loop = ckpt.restore_latest(jax.tree.map(jnp.zeros_like, state))
  ckpt.close()
  assert loop == {'epoch': 1, 'history': [0.5]}
  assert _equal(restored, state)

  # Stage 2 restores the best model into a model with another dropout rate.
  stage2 = checkpointing.read_config(workdir)
  stage2.dropout_rate = 0.3
  best, meta = checkpointing.restore_best(workdir, stage2)
  assert meta == {'epoch': 1, 'val_accuracy': 0.75}
  assert _equal(best, {'params': variables['params'],
                       'batch_stats': variables['batch_stats']})
  config_read, model_read, loaded, _ = checkpointing.load_model(workdir)
  assert tuple(config_read.image_size) == (24, 20)
  assert isinstance(model_read, models.GenderCNN)
  assert _equal(loaded, best)


def test_missing_workdir_and_best_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='not a gender_jax workdir'):
    checkpointing.read_config(str(tmp_path / 'nowhere'))
  workdir = str(tmp_path / 'w')
  checkpointing.write_config(workdir, _tiny_config())
  with pytest.raises(FileNotFoundError, match='has not finished an epoch'):
    checkpointing.restore_best(workdir)


def test_config_of_an_older_version_is_one_line(tmp_path):
  workdir = str(tmp_path / 'w')
  checkpointing.write_config(workdir, _tiny_config())
  path = os.path.join(workdir, checkpointing.CONFIG_FILE)
  with open(path) as f:
    stored = json.load(f)
  del stored['kernels']
  with open(path, 'w') as f:
    json.dump(stored, f)
  with pytest.raises(checkpointing.IncompatibleError,
                     match=r'config.json has no field kernels: .*older '
                     r'gender_jax.*new --workdir') as error:
    checkpointing.read_config(workdir)
  assert '\n' not in str(error.value)


def _state(step):
  config = _tiny_config()
  model = models.create_model(config)
  variables = models.init_variables(model, jax.random.key(step),
                                    config.image_size)
  return config, variables, {
      'params': variables['params'], 'batch_stats': variables['batch_stats'],
      'step': jnp.int32(step)}


def damage(path: str, how: str = 'truncate') -> str:
  """Truncates (to half) or empties file `path`, or the largest file under
  folder `path`."""
  files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
  target = max(files, key=os.path.getsize) if files else path
  size = os.path.getsize(target)
  with open(target, 'r+b') as f:
    f.truncate(size // 2 if how == 'truncate' else 0)
  return target


@pytest.mark.parametrize('part,how', [('state', 'truncate'),
                                      ('loop/metadata', 'empty')])
def test_damaged_latest_step_falls_back_to_the_one_before(tmp_path, part, how):
  workdir = str(tmp_path / 'w')
  config, _, older = _state(3)
  _, _, newer = _state(5)
  checkpointing.write_config(workdir, config)
  ckpt = checkpointing.Checkpointer(workdir)
  ckpt.save_latest(3, older, {'epoch': 1})
  ckpt.save_latest(5, newer, {'epoch': 2})
  ckpt.close()
  damage(os.path.join(workdir, 'checkpoints', '5', part), how)
  ckpt = checkpointing.Checkpointer(workdir)
  restored, loop = ckpt.restore_latest(jax.tree.map(jnp.zeros_like, older))
  assert loop == {'epoch': 1} and _equal(restored, older)
  assert ckpt.latest_step() == 3
  ckpt.save_latest(5, newer, {'epoch': 2})    # The run goes on from there.
  ckpt.close()
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '5']
  aside = os.listdir(os.path.join(workdir, 'checkpoints.corrupt'))
  assert len(aside) == 1 and aside[0].startswith('5-')


def test_bad_loop_state_and_nothing_restorable(tmp_path):
  workdir = str(tmp_path / 'w')
  config, _, state = _state(3)
  checkpointing.write_config(workdir, config)
  ckpt = checkpointing.Checkpointer(workdir)
  ckpt.save_latest(3, state, {'epoch': 'x'})

  def check(loop):
    if not isinstance(loop['epoch'], int):
      raise TypeError('epoch is not an int')
  with pytest.raises(checkpointing.errors.UserError,
                     match=r'step 3: TypeError: epoch is not an int\); move'):
    ckpt.restore_latest(state, check=check)
  ckpt.close()
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['3']


def test_incompatible_loop_state_stops_and_moves_nothing(tmp_path):
  """Intact metadata of another version is no damage: the restore stops on
  the newest step, naming it, and leaves every step where it is."""
  workdir = str(tmp_path / 'w')
  config, _, state = _state(3)
  checkpointing.write_config(workdir, config)
  ckpt = checkpointing.Checkpointer(workdir)
  ckpt.save_latest(3, state, {'epoch': 1})
  ckpt.save_latest(5, state, {'epoch': 'old'})

  def check(loop):
    if loop['epoch'] == 'old':
      raise checkpointing.IncompatibleError('of another version.')
  with pytest.raises(checkpointing.IncompatibleError) as error:
    ckpt.restore_latest(state, check=check)
  ckpt.close()
  assert str(error.value) == (
      f'{os.path.join(workdir, "checkpoints", "5")}: of another version.')
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3',
                                                                      '5']
  assert not os.path.exists(os.path.join(workdir, 'checkpoints.corrupt'))


def test_abstract_state_is_the_train_state_of_abstract_variables():
  config = _tiny_config()
  mesh = sharding.make_mesh()
  replicated = sharding.replicated(mesh)
  abstract = checkpointing.abstract_state(config, steps.create_train_state,
                                          replicated)
  state = steps.init_state(config, models.create_model(config), mesh)
  def leaves(tree, sharding_of):
    return [(jax.tree_util.keystr(path), x.shape, x.dtype, sharding_of(x))
            for path, x in jax.tree_util.tree_leaves_with_path(tree)]
  assert leaves(abstract, lambda x: x.sharding) == leaves(
      state, lambda _: replicated)
  assert abstract.variables() == checkpointing.abstract_variables(config,
                                                                  replicated)


def test_damaged_best_model_is_one_line_naming_it(tmp_path):
  workdir = str(tmp_path / 'w')
  config, variables, _ = _state(3)
  checkpointing.write_config(workdir, config)
  ckpt = checkpointing.Checkpointer(workdir)
  ckpt.save_best(3, variables, {'epoch': 1})
  ckpt.close()
  damage(os.path.join(workdir, 'best', '3', 'model'))
  with pytest.raises(checkpointing.errors.UserError) as error:
    checkpointing.restore_best(workdir)
  message = str(error.value)
  assert '\n' not in message
  assert os.path.join(workdir, 'best', '3') in message
  assert '--checkpoint=latest' in message


def test_saving_a_step_again_replaces_it(tmp_path):
  """A run resumed from an older step replays steps it had saved."""
  workdir = str(tmp_path / 'w')
  config, first, state = _state(3)
  _, second, state2 = _state(4)
  checkpointing.write_config(workdir, config)
  ckpt = checkpointing.Checkpointer(workdir)
  for variables, train_state in ((first, state), (second, state2)):
    ckpt.save_latest(6, train_state, {'epoch': 1})
    ckpt.save_best(6, variables, {'epoch': 1})
  restored, _ = ckpt.restore_latest(jax.tree.map(jnp.zeros_like, state))
  ckpt.close()
  assert _equal(restored, state2)
  best, _ = checkpointing.restore_best(workdir)
  assert _equal(best, {k: second[k] for k in ('params', 'batch_stats')})
