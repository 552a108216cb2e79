"""Tests for gender_jax.label_ray: the labeller on Ray Data (embedded Ray).

One Ray session (2 CPUs) serves the module; the local engine's CSV is the
reference every Ray run must equal byte for byte.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gender_jax import image_io
from gender_jax import label
from gender_jax import label_csv
from gender_jax import label_ray
from gender_jax import synthetic

ray = pytest.importorskip('ray', reason="needs the ray extra: pip install "
                          "'.[ray]'")
pytestmark = pytest.mark.slow
MC = 4
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


@pytest.fixture(scope='module', autouse=True)
def ray_session():
  """One embedded Ray of 2 CPUs for the module (each test would pay ~5 s
  to start its own)."""
  ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
  yield
  ray.shutdown()


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  """Male/Female folders, 3 broken files and a name that is not UTF-8."""
  root = tmp_path_factory.mktemp('images')
  synthetic.make_raw_dataset(str(root), counts={'Test': (9, 10)}, seed=5)
  folder = root / 'Test'
  synthetic.add_broken_files(str(folder / 'Female'))
  first = sorted(os.listdir(folder / 'Male'))[0]
  with open(os.fsencode(folder / 'Male') + b'/latin1_\xe9.jpg', 'wb') as f:
    f.write((folder / 'Male' / first).read_bytes())
  return str(folder)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, make_workdir):
  return make_workdir(tmp_path_factory.mktemp('w'))


def run(workdir, images_dir, out, engine='ray', **kwargs):
  kwargs.setdefault('batch_size', 8)
  kwargs.setdefault('mc_samples', MC)
  return label.label_images(workdir, images_dir, str(out), progress=False,
                            engine=engine, **kwargs)


@pytest.fixture(scope='module')
def reference(workdir, images, tmp_path_factory):
  """The local engine's CSV (bytes) and summary."""
  out = tmp_path_factory.mktemp('local') / 'l.csv'
  summary = run(workdir, images, out, engine='local', per_directory=True)
  return out.read_bytes(), summary


def test_engines_write_the_same_files(workdir, images, reference, tmp_path):
  """Same CSV (bad files' reasons included), sidecar and summaries."""
  raw, local = reference
  out = tmp_path / 'r.csv'
  summary = run(workdir, images, out, per_directory=True)
  assert out.read_bytes() == raw
  assert summary['engine'] == 'ray' and summary['num_actors'] == 1
  assert summary['num_errors'] == local['num_errors'] == 3
  assert not os.path.exists(str(out) + '.ray')
  theirs = label.output_paths(local['output_csv'])
  mine = label.output_paths(str(out))
  for name in ('args', 'per_directory', 'flagged', 'mislabels'):
    with open(theirs[name], 'rb') as f, open(mine[name], 'rb') as g:
      assert f.read() == g.read(), name


def test_framing_boxes_flip_and_onnxruntime_match(workdir, images,
                                                  tmp_path):
  """Face boxes (one outside its image: a reason), padding, flip TTA and
  ONNX Runtime: the same rows from both engines."""
  pytest.importorskip('onnxruntime')
  boxes = tmp_path / 'boxes.csv'
  boxes.write_text('Male/00000,1,1,10,12\nFemale/00001.jpg,2,3,5,4\n'
                   'Male/00002,500,500,5,5\n')
  kwargs = dict(mc_samples=1, resize='pad', boxes=str(boxes),
                box_margin=0.1, tta='flip', runtime='onnxruntime')
  run(workdir, images, tmp_path / 'r.csv', **kwargs)
  run(workdir, images, tmp_path / 'l.csv', engine='local', **kwargs)
  assert (tmp_path / 'r.csv').read_bytes() == (tmp_path / 'l.csv').read_bytes()
  rows = {r[0]: r for r in _rows(tmp_path / 'r.csv', 1)}
  assert 'lies outside' in rows[next(p for p in rows
                                     if p.startswith('Male/00002'))][-1]


def test_bad_files_get_the_decoders_reasons(workdir, images, tmp_path):
  run(workdir, images, tmp_path / 'r.csv', mc_samples=1)
  bad = {r[0]: r[-1] for r in _rows(tmp_path / 'r.csv', 1) if r[-1]}
  assert len(bad) == 3
  for path, reason in bad.items():
    assert reason == image_io.decode(os.path.join(images, path), (24, 20))[1]


def test_keys_do_not_depend_on_batch_size(workdir, images, reference,
                                          tmp_path):
  """Batches of 3: the local engine's bytes at that size; against batches of
  8, the same rows up to float rounding (XLA compiles another program for
  another batch shape), where a key that depended on the batch would move
  the MC statistics by ~0.1."""
  out, local = tmp_path / 'r.csv', tmp_path / 'l.csv'
  run(workdir, images, out, batch_size=3)
  run(workdir, images, local, engine='local', batch_size=3)
  assert out.read_bytes() == local.read_bytes()
  mine, theirs = _rows(out), _rows(reference[1]['output_csv'])
  assert [(r[0], r[2], r[-1]) for r in mine] == [
      (r[0], r[2], r[-1]) for r in theirs]
  np.testing.assert_allclose(_numbers(mine), _numbers(theirs), rtol=0,
                             atol=1e-6)


def _rows(path, mc_samples=MC):
  return list(label_csv.data_rows(str(path), label_csv.columns(mc_samples)))


def _numbers(rows):
  """p_male and the MC statistics of each row (NaN for a bad file)."""
  return np.asarray([[float(v or 'nan') for v in r[1:2] + r[3:-1]]
                     for r in rows])


def test_driver_killed_after_one_shard_resumes(workdir, images, reference,
                                               tmp_path, monkeypatch):
  """The run stops after its first shard (rows on disk, none in the CSV);
  the rerun labels only the rest and merges all shards in order."""
  monkeypatch.setattr(label_ray, 'SHARD_ROWS', 8)
  real, calls = label_ray._write_shard, []  # pylint: disable=protected-access

  def stop_after_one(*args):
    if calls:
      raise KeyboardInterrupt
    calls.append(1)
    real(*args)

  monkeypatch.setattr(label_ray, '_write_shard', stop_after_one)
  out = tmp_path / 'r.csv'
  with pytest.raises(KeyboardInterrupt):
    run(workdir, images, out)
  monkeypatch.setattr(label_ray, '_write_shard', real)
  shards = label_ray.shard_files(str(out) + '.ray')
  assert len(shards) == 1
  header = label_csv.columns(MC)
  assert out.read_bytes().decode().splitlines() == [','.join(header)]
  with pytest.raises(label.LabelError, match='interrupted --engine=ray run'):
    run(workdir, images, out, engine='local')
  summary = run(workdir, images, out)
  assert summary['num_resumed'] >= 8
  assert out.read_bytes() == reference[0]
  assert not os.path.exists(str(out) + '.ray')


def _cut(raw: bytes, rows: int, extra: int = 0) -> bytes:
  """The header and `rows` rows of `raw`, then `extra` bytes of the next."""
  lines = raw.splitlines(keepends=True)
  return b''.join(lines[:rows + 1]) + lines[rows + 1][:extra]


def test_resume_from_a_partial_csv_and_shards(workdir, images, reference,
                                              tmp_path):
  """A CSV cut inside a row (a killed merge or local run) beside shards
  that hold some of the same and some later rows: the rerun gives the
  uninterrupted CSV, every row once."""
  raw = reference[0]
  lines = raw.splitlines(keepends=True)
  out = tmp_path / 'r.csv'
  out.write_bytes(_cut(raw, 6, 9))
  shutil.copyfile(os.path.join(os.path.dirname(reference[1]['output_csv']),
                               'l.csv.args.json'), str(out) + '.args.json')
  os.makedirs(str(out) + '.ray')
  for name, rows in (('part-000000.csv', lines[4:11]),
                     ('part-000003.csv', lines[15:18])):
    (tmp_path / 'r.csv.ray' / name).write_bytes(lines[0] + b''.join(rows))
  (tmp_path / 'r.csv.ray' / 'part-000004.csv.tmp-1').write_bytes(b'junk')
  summary = run(workdir, images, out)
  assert summary['num_resumed'] == 6 + 4 + 3
  assert out.read_bytes() == raw
  assert not os.path.exists(str(out) + '.ray')
  assert run(workdir, images, out)['num_labelled_now'] == 0
  assert out.read_bytes() == raw


def test_merge_in_groups_and_stale_shards(workdir, images, reference,
                                          tmp_path, monkeypatch):
  """Many shards are merged in groups; shards whose CSV was deleted (to
  start over) are removed, not merged."""
  monkeypatch.setattr(label_ray, 'MERGE_FAN_IN', 2)
  monkeypatch.setattr(label_ray, 'SHARD_ROWS', 3)
  out = tmp_path / 'r.csv'
  stale = tmp_path / 'r.csv.ray'
  stale.mkdir()
  (stale / 'part-000000.csv').write_bytes(b'stale')
  run(workdir, images, out)
  assert out.read_bytes() == reference[0]


def test_killed_decode_task_and_actor_are_retried(workdir, images, reference,
                                                  tmp_path, monkeypatch):
  """A decode task's process and a model actor's process die once each
  (os._exit): Ray reruns them; no row is lost or written twice."""
  decode, actor = tmp_path / 'decode.died', tmp_path / 'actor.died'
  real_decode = label_ray.decode_batch

  def dies_once(marker):
    try:
      os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
      return
    os._exit(1)  # pylint: disable=protected-access

  def decode_batch(batch, **kwargs):
    dies_once(str(decode))
    return real_decode(batch, **kwargs)

  class ModelActor(label_ray.ModelActor):

    def __call__(self, batch):
      dies_once(str(actor))
      return super().__call__(batch)

  monkeypatch.setattr(label_ray, 'decode_batch', decode_batch)
  monkeypatch.setattr(label_ray, 'ModelActor', ModelActor)
  out = tmp_path / 'r.csv'
  run(workdir, images, out)
  assert decode.exists() and actor.exists()
  assert out.read_bytes() == reference[0]


def test_user_errors(workdir, images, tmp_path, monkeypatch):
  with pytest.raises(label.LabelError, match='--num_actors=2: the Ray '
                     'cluster has 2 CPU'):
    run(workdir, images, tmp_path / 'a.csv', num_actors=2)
  with pytest.raises(label.LabelError, match='mc_samples=3 with runtime'):
    run(workdir, images, tmp_path / 'b.csv', mc_samples=3,
        runtime='onnxruntime')
  with pytest.raises(label.LabelError, match="engine='spark'"):
    run(workdir, images, tmp_path / 'c.csv', engine='spark')
  monkeypatch.setitem(sys.modules, 'ray', None)
  with pytest.raises(label.LabelError, match=r"pip install '\.\[ray\]'"):
    run(workdir, images, tmp_path / 'd.csv')
  assert not any(tmp_path.iterdir())


@pytest.mark.multiprocess
def test_script_error_after_ray_starts_is_one_line(workdir, images,
                                                   tmp_path):
  """An error found once the embedded Ray runs: one line, exit status 2."""
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'label.py'),
       f'--workdir={workdir}', f'--images={images}',
       f'--output={tmp_path / "r.csv"}', '--engine=ray', '--num_actors=9999'],
      env=dict(os.environ, GENDER_JAX_NO_REEXEC='1', JAX_PLATFORMS='cpu'),
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith('label.py: error: --num_actors=9999: ')
  assert result.stderr.count('\n') == 1, result.stderr


@pytest.mark.multiprocess
def test_two_node_cluster(workdir, images, reference, tmp_path):
  """A simulated cluster of two nodes (one actor on each) joined by
  address writes the same CSV. Each node declares one GPU (JAX runs on the
  CPU): an actor per GPU, and the model described in a Ray task, not in
  the driver."""
  out = tmp_path / 'r.csv'
  script = textwrap.dedent(f"""
      from ray import cluster_utils
      from gender_jax import label
      from gender_jax import label_ray
      in_driver = []
      describe = label_ray._describe
      def counted(*args):
        in_driver.append(1)       # (A task counts in its worker's copy.)
        return describe(*args)
      label_ray._describe = counted
      cluster = cluster_utils.Cluster(
          initialize_head=True, head_node_args={{'num_cpus': 2, 'num_gpus': 1}})
      cluster.add_node(num_cpus=2, num_gpus=1)
      try:
        summary = label.label_images(
            {workdir!r}, {images!r}, {str(out)!r}, mc_samples={MC},
            batch_size=8, progress=False, engine='ray',
            ray_address=cluster.address)
        assert summary['num_actors'] == 2, summary
        assert not in_driver
      finally:
        cluster.shutdown()
      """)
  env = dict(os.environ, GENDER_JAX_NO_REEXEC='1', JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', script], env=env,
                          capture_output=True, text=True, timeout=600,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert out.read_bytes() == reference[0]
