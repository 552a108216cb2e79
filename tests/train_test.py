"""Tests of gender_jax.train: Keras callback rules, steps, end-to-end runs."""

import glob
import json
import os
import subprocess
import sys

import jax
from jax.experimental.compilation_cache import compilation_cache
import numpy as np
import pytest

from gender_jax import calibration
from gender_jax import checkpointing
from gender_jax import input_pipeline
from gender_jax import models
from gender_jax import sharding
from gender_jax import synthetic
from gender_jax import train
from checkpointing_test import damage
from conftest import tiny_train_config as tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, 'configs', 'default.py')


@pytest.fixture(scope='module', autouse=True)
def compile_cache(tmp_path_factory):
  """A persistent compilation cache for this module (and its subprocesses).

  The end-to-end tests build the same tiny steps several times; compiling
  dominates their run time.
  """
  path = str(tmp_path_factory.mktemp('jax_cache'))
  saved = {k: getattr(jax.config, k) for k in (
      'jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
      'jax_persistent_cache_min_entry_size_bytes')}
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  compilation_cache.reset_cache()
  yield path
  for key, value in saved.items():
    jax.config.update(key, value)
  compilation_cache.reset_cache()


def cache_env(path):
  """Environment for a subprocess sharing the compilation cache at `path`."""
  return {**os.environ, 'JAX_PLATFORMS': 'cpu',
          'JAX_COMPILATION_CACHE_DIR': path,
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('data')
  synthetic.make_tfds_dataset(str(root), image_size=(24, 20))
  return str(root)


def _params(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_trees_equal(a, b):
  for x, y in zip(_params(a), _params(b), strict=True):
    np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------
# Steps.


@pytest.mark.slow
def test_train_step_learns_and_updates_batch_stats(data_dir):
  config = tiny_config(data_dir)
  mesh = sharding.make_mesh()
  model = models.create_model(config)
  state = train.init_state(config, model, mesh)
  before = jax.tree.map(np.asarray, state.variables())
  step = train.make_train_step(config, model, mesh)
  rng = jax.random.key(0)
  images = np.random.default_rng(0).integers(0, 256, (16, 24, 20, 3),
                                             dtype=np.uint8)
  labels = (np.arange(16) % 2).astype(np.int32)
  batch = sharding.to_global({'image': images, 'label': labels}, mesh)
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch, rng)
    losses.append(float(metrics.compute()['loss']))
  assert int(state.step) == 3
  assert all(np.isfinite(losses))
  for x, y in zip(_params(before['batch_stats']),
                  _params(state.batch_stats)):
    assert not np.allclose(x, y)
  for x, y in zip(_params(before['params']), _params(state.params)):
    assert not np.allclose(x, y)
  assert train.get_learning_rate(state) == pytest.approx(1e-3)
  state = train.set_learning_rate(state, 5e-4, mesh)
  assert train.get_learning_rate(state) == pytest.approx(5e-4)


def test_augment_step_draws_what_model_inputs_draws():
  """The loop augments in its own jitted call (`augment_step`); precise BN
  prepares batches with `model_inputs`. For one step key both give the same
  images, and each step gets its own augmentation."""
  config = tiny_config('unused')
  images = np.random.default_rng(0).integers(0, 256, (4, 24, 20, 3),
                                             dtype=np.uint8)
  batch = {'image': images, 'label': np.arange(4, dtype=np.int32) % 2}
  rng = jax.random.key(4)
  got = [np.asarray(train.augment_step(batch, rng, step, config=config)
                    ['image']) for step in (0, 5)]
  for step, image in zip((0, 5), got):
    want, _ = train.model_inputs(batch, jax.random.fold_in(rng, step),
                                 config=config)
    np.testing.assert_array_equal(image, np.asarray(want))
  assert not np.allclose(got[0], got[1])


def test_eval_is_exact_over_padded_batches(data_dir):
  """Masked sums / mask count equal a plain numpy pass over every example."""
  config = tiny_config(data_dir, eval_batch_size=48)   # 40 examples: padded.
  mesh = sharding.make_mesh()
  model = models.create_model(config)
  state = train.init_state(config, model, mesh)
  builder = train.dataset.load_builder(config.data_dir)
  got = train.evaluate(train.make_eval_step(model, mesh), state.variables(),
                       config, builder, mesh, 'validation')
  images, labels = [], []
  for batch in input_pipeline.eval_iterator(config, builder, mesh,
                                            'validation'):
    mask = np.asarray(batch['mask'])
    images.append(np.asarray(batch['image'])[mask])
    labels.append(np.asarray(batch['label'])[mask])
  images, labels = np.concatenate(images), np.concatenate(labels)
  logits = np.asarray(model.apply(state.variables(), images, train=False))
  loss, correct = train.per_example_metrics(logits, labels)
  assert got['count'] == 40 == len(labels)
  assert got['loss'] == pytest.approx(float(np.mean(loss)), rel=1e-5)
  assert got['accuracy'] == pytest.approx(float(np.mean(correct)), abs=1e-7)


SHARDED_SCRIPT = r'''
import os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
import jax, numpy as np
from jax.sharding import Mesh
sys.path.insert(0, sys.argv[1])
from tests.conftest import tiny_train_config as tiny_config
from gender_jax import models, sharding, train
assert jax.device_count() == 8, jax.devices()
results = []
for devices in (jax.devices(), jax.devices()[:1]):
  mesh = Mesh(np.asarray(devices), ('data',))
  config = tiny_config('unused', dropout_rate=0.3)
  model = models.create_model(config)
  state = train.init_state(config, model, mesh)
  step = train.make_train_step(config, model, mesh)
  rng = np.random.default_rng(0)
  for i in range(3):
    batch = {'image': rng.integers(0, 256, (16, 24, 20, 3), dtype=np.uint8),
             'label': rng.integers(0, 2, (16,)).astype(np.int32)}
    batch = jax.device_put(batch, sharding.data_sharding(mesh))
    state, metrics = step(state, batch, jax.random.key(7))
  kernel = state.params['Dense_0']['kernel']
  assert len(kernel.sharding.device_set) == len(devices)
  results.append((jax.tree.map(np.asarray, state.variables()),
                  float(metrics.compute()['loss'])))
(a, loss_a), (b, loss_b) = results
assert abs(loss_a - loss_b) < 1e-4, (loss_a, loss_b)
for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
  np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
print('SHARDED_OK', loss_a, loss_b)
'''


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sharded_step_equals_single_device_step(compile_cache):
  """3 steps (augmentation + both dropouts) on 8 CPU devices vs 1 device."""
  out = subprocess.run([sys.executable, '-c', SHARDED_SCRIPT, REPO],
                       capture_output=True, text=True,
                       env=cache_env(compile_cache), timeout=300,
                       check=False)
  assert out.returncode == 0 and 'SHARDED_OK' in out.stdout, (
      out.stdout[-3000:] + out.stderr[-3000:])


# ---------------------------------------------------------------------------
# End to end.


@pytest.mark.slow
def test_stage1_then_stage2(data_dir, tmp_path):
  w1, w2 = str(tmp_path / 'w1'), str(tmp_path / 'w2')
  summary = train.train_and_evaluate(tiny_config(data_dir), w1)
  assert summary['epochs_run'] == 2
  assert len(summary['history']) == 2
  assert summary['history'][-1]['step'] == 12
  assert set(summary['final_evaluation']) == {'validation', 'test'}
  assert summary['final_evaluation']['test']['count'] == 40
  assert glob.glob(os.path.join(w1, 'events.out.tfevents.*'))
  assert os.listdir(os.path.join(w1, 'checkpoints'))
  assert os.listdir(os.path.join(w1, 'best'))
  with open(os.path.join(w1, train.RESULTS_FILE)) as f:
    assert json.load(f)['best_epoch'] == summary['best_epoch']
  # config.calibrate: the best model's temperature, fitted on validation.
  assert summary['calibration']['step'] == summary['best_step']
  assert calibration.read_temperature(w1, summary['best_step']) == (
      summary['calibration']['temperature'])
  assert checkpointing.read_config(w1).model == 'tiny'
  # The best model is the one the early-stopping rule chose.
  accs = [h['val_accuracy'] for h in summary['history']]
  best_epoch = max(range(len(accs)), key=lambda i: (accs[i], -i)) + 1
  assert summary['best_epoch'] == best_epoch
  best, meta = checkpointing.restore_best(w1)
  assert meta['val_accuracy'] == pytest.approx(accs[best_epoch - 1])
  assert summary['final_evaluation']['validation']['accuracy'] == (
      pytest.approx(accs[best_epoch - 1]))

  # Stage 2 starts from exactly stage 1's best params and batch stats.
  config2 = tiny_config(data_dir, 'stage2.py', init_from=w1, num_epochs=1,
                        precise_bn_batches=2)
  assert config2.augment is False and config2.dropout_rate == 0.3
  mesh = sharding.make_mesh()
  state = train.init_state(config2, models.create_model(config2), mesh)
  _assert_trees_equal(state.variables(), best)
  assert int(state.step) == 0
  assert int(state.opt_state.count) == 0
  summary2 = train.train_and_evaluate(config2, w2)
  assert summary2['init_from'] == w1
  # Epoch 0 is the restored model, evaluated before any step.
  assert [h['epoch'] for h in summary2['history']] == [0, 1]
  assert [h['step'] for h in summary2['history']] == [0, 6]
  assert 'train_loss' not in summary2['history'][0]
  assert summary2['best_val_accuracy'] == max(
      h['val_accuracy'] for h in summary2['history'])
  with pytest.raises(train.errors.UserError, match='image_size'):
    train.init_state(tiny_config(data_dir, 'stage2.py', init_from=w1,
                                 image_size=(32, 24)), None, mesh)


@pytest.mark.slow
def test_stage2_keeps_its_baseline_when_it_cannot_improve(data_dir,
                                                          tmp_path):
  """A fine-tune at a negligible learning rate never beats epoch 0: best/ is
  the restored model itself."""
  w1, w2 = str(tmp_path / 'w1'), str(tmp_path / 'w2')
  train.train_and_evaluate(tiny_config(data_dir, num_epochs=1), w1)
  stage1_best, _ = checkpointing.restore_best(w1)
  summary = train.train_and_evaluate(tiny_config(
      data_dir, 'stage2.py', init_from=w1, num_epochs=2, learning_rate=1e-12,
      min_learning_rate=1e-12, precise_bn_batches=0), w2)
  assert summary['best_epoch'] == 0 and summary['best_step'] == 0
  assert len(summary['history']) == 3
  best, meta = checkpointing.restore_best(w2)
  assert meta['epoch'] == 0
  _assert_trees_equal(best, stage1_best)


@pytest.mark.slow
def test_user_errors_leave_the_workdir_alone(data_dir, tmp_path):
  """Batch larger than the data: nothing is created. Another model in a
  trained workdir: refused up front, config.json unchanged. A live lock:
  refused, naming its holder."""
  workdir = str(tmp_path / 'w')
  with pytest.raises(train.errors.UserError, match='lower config.batch_size'):
    train.train_and_evaluate(tiny_config(data_dir, batch_size=4096,
                                         steps_per_epoch=None), workdir)
  assert not os.path.exists(workdir)
  train.train_and_evaluate(tiny_config(data_dir, num_epochs=1), workdir)
  config_file = os.path.join(workdir, 'config.json')
  with open(config_file) as f:
    before = f.read()
  with pytest.raises(train.errors.UserError, match=r"image_size=\(32, 24\) here"):
    train.train_and_evaluate(tiny_config(data_dir, num_epochs=2,
                                         image_size=(32, 24)), workdir)
  with open(config_file) as f:
    assert f.read() == before
  holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    with open(os.path.join(workdir, train.LOCK_FILE), 'w') as f:
      json.dump({'host': os.uname().nodename, 'pid': holder.pid}, f)
    with pytest.raises(train.locking.LockedError, match=f'pid {holder.pid}'):
      train.train_and_evaluate(tiny_config(data_dir, num_epochs=2), workdir)
  finally:
    holder.kill()
    holder.wait()
  with open(config_file) as f:
    assert f.read() == before


def test_loop_state_json_round_trip_and_earlier_versions():
  loop = train.LoopState(plateau=train.callbacks.Plateau(5e-4, 0.1, 2),
                         early_stopping=train.callbacks.EarlyStopping(
                             0.97, 1, 4), epoch=4, history=[{}] * 4)
  assert train.LoopState.from_json(
      json.loads(json.dumps(loop.to_json())), 1e-3) == loop
  old = {'epoch': 4, 'epoch_step': 0, 'best': None, 'stopped_early': False,
         'history': [{}] * 4, 'train_seconds': 1.0,
         'plateau': {'best_value': 0.1, 'plateau_count': 2, 'scale': 0.5,
                     'cooldown_count': 0},
         'early_stopping': {'best_metric': 0.97, 'patience_count': 1}}
  got = train.LoopState.from_json(old, 1e-3)
  assert got.plateau == train.callbacks.Plateau(
      train.callbacks.Plateau.start(5e-4).learning_rate, best=0.1, wait=2)
  assert got.early_stopping == train.callbacks.EarlyStopping(0.97, 1, 4)
  assert (got.epoch, got.train_seconds) == (4, 1.0)


def _interrupt_after(monkeypatch, epoch_to_stop, batches):
  """Makes train_iterator raise KeyboardInterrupt mid-epoch (a kill)."""
  original = input_pipeline.train_iterator

  def iterator(config, builder, mesh, epoch, start_step=0):
    for i, batch in enumerate(original(config, builder, mesh, epoch,
                                       start_step)):
      if epoch == epoch_to_stop and i == batches:
        raise KeyboardInterrupt('simulated kill')
      yield batch
  monkeypatch.setattr(input_pipeline, 'train_iterator', iterator)


@pytest.mark.slow
@pytest.mark.parametrize('damaged', [False, True])
def test_killed_run_resumes_at_the_right_step(data_dir, tmp_path,
                                              monkeypatch, damaged):
  """A kill mid-epoch resumes exactly; with the latest checkpoint damaged
  too, it resumes from the one before (set aside: one lost step)."""
  config = tiny_config(data_dir, checkpoint_every_steps=4)
  full = str(tmp_path / 'full')
  train.train_and_evaluate(config, full)
  killed = str(tmp_path / 'killed')
  _interrupt_after(monkeypatch, epoch_to_stop=1, batches=5)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, killed)
  monkeypatch.undo()
  checkpoints = os.path.join(killed, 'checkpoints')
  # Kept: the end of epoch 1 (6) and mid-epoch 2 (6 + 2 batches).
  assert sorted(os.listdir(checkpoints)) == ['6', '8']
  if damaged:
    damage(os.path.join(checkpoints, '8', 'state'))
  resumed = train.train_and_evaluate(config, killed)
  assert [h['step'] for h in resumed['history']] == [6, 12]
  assert bool(glob.glob(os.path.join(killed, 'checkpoints.corrupt',
                                     '8-*'))) == damaged
  ckpt = checkpointing.Checkpointer(killed)
  assert ckpt.latest_step() == 12
  ckpt.close()
  # Same data order and randomness: the resumed run ends where the full run
  # ends.
  mesh = sharding.make_mesh()
  model = models.create_model(config)
  states = []
  for workdir in (full, killed):
    ckpt = checkpointing.Checkpointer(workdir)
    states.append(ckpt.restore_latest(train.abstract_state(config, model,
                                                           mesh))[0])
    ckpt.close()
  for x, y in zip(_params(states[0].params), _params(states[1].params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_checkpoint(data_dir, tmp_path,
                                                  monkeypatch):
  workdir = str(tmp_path / 'w')
  train.train_and_evaluate(tiny_config(data_dir, num_epochs=1), workdir)
  original = train.per_example_metrics
  monkeypatch.setattr(train, 'per_example_metrics', lambda logits, labels: (
      original(logits, labels)[0] * np.nan, original(logits, labels)[1]))
  with pytest.raises(train.TrainingError, match='Non-finite.*step 8.*intact'):
    train.train_and_evaluate(tiny_config(data_dir, checkpoint_every_steps=2),
                             workdir)
  ckpt = checkpointing.Checkpointer(workdir)
  assert ckpt.latest_step() == 6
  ckpt.close()
  # The failed run saved nothing, so config.json still describes the first.
  assert checkpointing.read_config(workdir).checkpoint_every_steps == 0


@pytest.mark.slow
@pytest.mark.multiprocess
def test_script_missing_dataset_is_a_clear_error(tmp_path, compile_cache):
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'train.py'),
       '--config=' + os.path.join(REPO, 'configs', 'stage1.py'),
       f'--workdir={tmp_path / "w"}', f'--config.data_dir={tmp_path / "no"}'],
      capture_output=True, text=True, timeout=300, check=False,
      env=cache_env(compile_cache))
  assert out.returncode == 2
  assert 'prepare_data.py' in out.stderr
  assert 'Traceback' not in out.stderr
