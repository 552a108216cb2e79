"""Two processes on loopback (gloo CPU collectives) train as one job."""

import glob
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from gender_jax import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r'''
import json, os, sys
sys.path.insert(0, sys.argv[1])
data_dir, workdir, out = sys.argv[2:5]
from gender_jax import sharding, steps, train
assert sharding.maybe_initialize_distributed()  # From JAX_* variables.
import jax, numpy as np
from gender_jax import dataset, input_pipeline, models
from tests.conftest import tiny_train_config as tiny_config
assert jax.process_count() == 2 and jax.device_count() == 2
config = tiny_config(data_dir, num_epochs=2, steps_per_epoch=3)
summary = train.train_and_evaluate(config, workdir)
# A few explicit steps on the global batches of both processes.
mesh = sharding.make_mesh()
model = models.create_model(config)
state = steps.init_state(config, model, mesh)
step = steps.make_train_step(config, model, mesh)
builder = dataset.load_builder(data_dir)
for batch in input_pipeline.train_iterator(config, builder, mesh, epoch=0):
  state, _ = step(state, batch, jax.random.key(0))
local = {jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
         for path, leaf in jax.tree_util.tree_leaves_with_path(
             state.variables())}
np.savez(out + '.npz', **local)
with open(out + '.json', 'w') as f:
  json.dump({'step': int(state.step),
             'val': summary['final_evaluation']['validation'],
             'history': summary['history']}, f)
jax.distributed.shutdown()
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_train_identically(tmp_path):
  data_dir = str(tmp_path / 'data')
  synthetic.make_tfds_dataset(data_dir, image_size=(24, 20))
  workdir = str(tmp_path / 'w')
  port = _free_port()
  procs = []
  for pid in range(2):
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
           'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}',
           'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': str(pid),
           # The worker compiles the same steps twice: cache them.
           'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'jax_cache'),
           'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
           'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}
    env.pop('XLA_FLAGS', None)
    procs.append(subprocess.Popen(
        [sys.executable, '-c', WORKER, REPO, data_dir, workdir,
         str(tmp_path / f'out{pid}')],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=420)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail('2-process run timed out')
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]

  results = []
  for pid in range(2):
    with open(tmp_path / f'out{pid}.json') as f:
      results.append(json.load(f))
  for r in results:   # Wall-clock fields differ between processes.
    r['history'] = [{k: v for k, v in h.items()
                     if 'seconds' not in k and 'per_sec' not in k}
                    for h in r['history']]
  assert results[0] == results[1]
  assert results[0]['step'] == 3
  assert [h['step'] for h in results[0]['history']] == [3, 6]
  a, b = (np.load(tmp_path / f'out{pid}.npz') for pid in range(2))
  assert sorted(a.files) == sorted(b.files) and a.files
  for key in a.files:
    np.testing.assert_array_equal(a[key], b[key])
  # Host 0 alone writes the summary and the TensorBoard events.
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['processes'] == 2
  assert len(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))) == 1
