"""tf.data pipelines from the `gender_faces` TFDS dataset to sharded batches.

Each process reads its own slice of a split (`tfds.split_for_jax_process`),
batches to its share of the global batch and hands numpy batches to
`sharding.to_global`, so every batch is a global `jax.Array` split over the
('data',) mesh. Images stay uint8 (the model rescales).

* Training: shuffle (buffer `config.shuffle_buffer`, seed `config.seed +
  epoch`), repeat `config.repeat` times, full batches only. An epoch is
  deterministic given (seed, epoch), so a run resumed at `start_step` sees the
  same remaining batches. On a dataset of several sources (splits
  `train_<source>`, see `gender_jax.prepare_data`), `config.source_weights`
  ('utkface:1,folders:1') draws each example from a source with those
  weights, each source shuffled and repeated on its own; empty (the default)
  reads the union of the sources, i.e. weights proportional to their sizes.
  Either way an epoch has `examples * repeat // batch` steps.
* Evaluation: every example exactly once; the last batches are padded with
  zero images whose `mask` is False, and every process yields the same number
  of batches.
"""

import collections
import logging
import math

import jax
import tensorflow as tf
import tensorflow_datasets as tfds

from gender_jax import dataset
from gender_jax import errors
from gender_jax import sharding
from gender_jax import sources

log = logging.getLogger(__name__)
_logged_resizes = set()
_caches = {}


def num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Examples in `split` (any TFDS split string, e.g. 'train[:10%]', or a
  part's union of source splits, see `dataset.resolve_split`)."""
  return builder.info.splits[dataset.resolve_split(builder, split)].num_examples


def train_source_weights(config, builder) -> dict:
  """{stored train split: weight} from `config.source_weights`; {} when it is
  empty (read the union). UserError naming a source the split lacks or a
  source left without a weight."""
  weights = sources.parse_weights(config.source_weights)
  if not weights:
    return {}
  members = dataset.resolve_split(builder, config.train_split).split('+')
  by_source = {}
  for member in members:
    part, _, name = member.partition('_')
    if '[' in member or not name:
      raise errors.UserError(
          f'config.source_weights={config.source_weights!r} needs '
          f'config.train_split={config.train_split!r} to name whole source '
          f'splits <part>_<source>; it reads {member!r}.')
    by_source[name] = member
  unknown = sorted(set(weights) - set(by_source))
  missing = sorted(set(by_source) - set(weights))
  if unknown or missing:
    raise errors.UserError(
        f'config.source_weights={config.source_weights!r}: '
        + (f'no source {unknown} in {config.train_split!r}; ' if unknown else '')
        + (f'no weight for {missing}; ' if missing else '')
        + f'the sources are {sorted(by_source)}.')
  return {by_source[name]: w for name, w in weights.items() if w > 0}


def stored_image_size(builder: tfds.core.DatasetBuilder) -> tuple:
  """(height, width) of the images stored in the dataset."""
  return tuple(builder.info.features[dataset.IMAGE_KEY].shape[:2])


def train_steps_per_epoch(config, builder) -> int:
  """Full local batches per epoch: per-process examples * repeat // batch."""
  local = sharding.local_batch_size(config.batch_size)
  per_process = builder.info.splits[tfds.split_for_jax_process(
      dataset.resolve_split(builder, config.train_split),
      drop_remainder=True)].num_examples
  steps = per_process * config.repeat // local
  if config.steps_per_epoch:
    steps = min(steps, config.steps_per_epoch)
  if steps < 1:
    raise errors.UserError(
        f'{config.train_split!r} has {per_process} examples per process, '
        f'fewer than one batch of {local} (x repeat {config.repeat}); lower '
        'config.batch_size.')
  return steps


def eval_steps(config, builder, split: str) -> int:
  """Batches `eval_iterator` yields (the same on every process)."""
  local = sharding.local_batch_size(config.eval_batch_size)
  split = dataset.resolve_split(builder, split)
  count = jax.process_count()
  per_process = max(builder.info.splits[tfds.split_for_jax_process(
      split, process_index=i, process_count=count)].num_examples
                    for i in range(count))
  steps = math.ceil(per_process / local)
  if config.eval_steps:
    steps = min(steps, config.eval_steps)
  return steps


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = True
  options.experimental_optimization.map_parallelization = True
  return options


def _read(builder, split: str, shuffle_files: bool, seed: int):
  read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False,
                                options=_options())
  return builder.as_dataset(split=split, shuffle_files=shuffle_files,
                            read_config=read_config)


def _preprocess_fn(config, builder):
  """Record -> {'image': uint8 (H, W, 3), 'label': int32}, resizing if needed."""
  stored, wanted = stored_image_size(builder), tuple(config.image_size)
  if stored != wanted and (stored, wanted) not in _logged_resizes:
    _logged_resizes.add((stored, wanted))
    if jax.process_index() == 0:
      log.warning('dataset images are %dx%d but config.image_size is %dx%d: '
                  'resizing every image in the input pipeline (bilinear). '
                  'Prepare the data at the model size to skip this.',
                  *stored, *wanted)

  def preprocess(example):
    image = example[dataset.IMAGE_KEY]
    if stored != wanted:
      image = tf.image.resize(image, wanted, method='bilinear')
      image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return {'image': image,
            'label': tf.cast(example[dataset.LABEL_KEY], tf.int32)}
  return preprocess


def _train_examples(config, builder, epoch: int, split: str):
  """This process's decoded examples of stored train split(s) `split`, files
  shuffled per epoch."""
  split = tfds.split_for_jax_process(split, drop_remainder=True)
  preprocess = _preprocess_fn(config, builder)
  if not config.cache:
    return _read(builder, split, True, config.seed + epoch).map(
        preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  # One in-memory cache per (dataset, split, size) for the whole run; its file
  # order is fixed by config.seed, examples are still shuffled per epoch.
  key = (str(builder.data_dir), str(split), tuple(config.image_size),
         config.seed)
  if key not in _caches:
    _caches[key] = _read(builder, split, True, config.seed).map(
        preprocess, num_parallel_calls=tf.data.AUTOTUNE).cache()
  return _caches[key]


def train_dataset(config, builder, epoch: int, start_step: int = 0):
  """The local tf.data.Dataset behind `train_iterator` (numpy batches)."""
  steps = train_steps_per_epoch(config, builder)
  seed = config.seed + epoch
  weights = train_source_weights(config, builder)
  splits = list(weights) or [dataset.resolve_split(builder, config.train_split)]
  parts = [_train_examples(config, builder, epoch, split).shuffle(
      config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
           for split in splits]
  if weights:
    total = sum(weights.values())
    ds = tf.data.Dataset.sample_from_datasets(
        [part.repeat() for part in parts],
        weights=[weights[split] / total for split in splits], seed=seed)
  else:
    ds = parts[0].repeat(config.repeat)
  ds = ds.batch(sharding.local_batch_size(config.batch_size),
                drop_remainder=True)
  ds = ds.take(steps).skip(start_step)
  return ds.prefetch(tf.data.AUTOTUNE)


def eval_dataset(config, builder, split: str):
  """The local tf.data.Dataset behind `eval_iterator` (numpy batches)."""
  local = sharding.local_batch_size(config.eval_batch_size)
  steps = eval_steps(config, builder, split)
  height, width = config.image_size
  ds = tf.data.Dataset.from_tensors({
      'image': tf.zeros((height, width, 3), tf.uint8),
      'label': tf.constant(0, tf.int32),
      'mask': tf.constant(False)}).repeat()   # Padding.
  process_split = tfds.split_for_jax_process(
      dataset.resolve_split(builder, split))
  if builder.info.splits[process_split].num_examples:  # Else: padding only.
    examples = _read(builder, process_split, False, config.seed).map(
        _preprocess_fn(config, builder), num_parallel_calls=tf.data.AUTOTUNE)
    ds = examples.map(lambda ex: {**ex, 'mask': tf.constant(True)}).concatenate(
        ds)
  ds = ds.take(steps * local).batch(local)
  return ds.prefetch(tf.data.AUTOTUNE)


def _device_prefetch(iterator, size: int):
  """Keeps `size` batches already transferred to the devices ahead."""
  queue = collections.deque()
  for batch in iterator:
    queue.append(batch)
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def _numpy_batches(ds, builder, split: str):
  """`tfds.as_numpy(ds)`; a read error (a truncated or corrupt shard) becomes
  a `dataset.DataError` naming the damaged shard files."""
  iterator = iter(tfds.as_numpy(ds))
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      raise dataset.damage_error(
          builder, dataset.resolve_split(builder, split), e) from e
    yield batch


def _to_global(ds, mesh, prefetch: int, builder, split: str):
  batches = (sharding.to_global(b, mesh)
             for b in _numpy_batches(ds, builder, split))
  return _device_prefetch(batches, prefetch)


def train_iterator(config, builder, mesh, epoch: int, start_step: int = 0):
  """Batches of epoch `epoch` from step `start_step`: {'image', 'label'}.

  'image' is uint8 (B, H, W, 3) and 'label' int32 (B,), both global
  jax.Arrays sharded over mesh axis 'data'; B = config.batch_size.
  """
  return _to_global(train_dataset(config, builder, epoch, start_step), mesh,
                    config.prefetch, builder, config.train_split)


def eval_iterator(config, builder, mesh, split: str):
  """Batches covering every example of `split` once: {'image','label','mask'}.

  Padded examples have mask False; B = config.eval_batch_size. Honours the
  config.eval_steps cap.
  """
  return _to_global(eval_dataset(config, builder, split), mesh,
                    config.prefetch, builder, split)
