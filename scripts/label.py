r"""Labels every image under a folder with a trained model, into CSV.

  python scripts/label.py --workdir=runs/stage2 --images=/data/vggface2/train \
      --output=labels.csv [--mc_samples=20] [--batch_size=64] \
      [--per_directory] [--labels=identity_meta.csv] [--runtime=onnxruntime]

One row per image (path, p_male, predicted, MC-Dropout mean/std/entropy/
mutual information with --mc_samples>1, error). Unreadable files get a row
with the reason. Rerun the same command after an interruption to continue
where it stopped; a second run on the same --output while one is running
stops at once, naming the run that holds it. With --per_directory,
<output>_per_directory.csv and <output>_flagged.csv summarise each folder
(identity); with given labels (--labels, or Male/Female folders),
<output>_mislabels.csv ranks the images whose given label is most likely
wrong. A mistake in the flags, folders or files is one line on stderr and
exit status 2.
"""

import json

from absl import app
from absl import flags

from gender_jax import cli
cli.quiet_tensorflow()   # Before label imports TensorFlow.
from gender_jax import label  # pylint: disable=g-import-not-at-top,g-bad-import-order

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (its best '
                               'checkpoint is used).', required=True)
_IMAGES = flags.DEFINE_string('images', None, 'Folder searched recursively.',
                              required=True)
_OUTPUT = flags.DEFINE_string('output', None, 'CSV file to write.',
                              required=True)
_MC_SAMPLES = flags.DEFINE_integer(
    'mc_samples', 1, 'MC-Dropout samples per image (1: no MC statistics).',
    lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Images per batch.',
                                   lower_bound=1)
_SEED = flags.DEFINE_integer('seed', 0, 'MC-Dropout seed.')
_NUM_WORKERS = flags.DEFINE_integer(
    'num_workers', None, 'Image decoding threads (default: cores, at most 8).',
    lower_bound=1)
_LABELS = flags.DEFINE_string(
    'labels', None, "Given labels: a CSV of (image or folder path, label), or "
    "'folders' for a Male/Female folder layout (used automatically when every "
    'image is under such a folder).')
_RUNTIME = flags.DEFINE_enum(
    'runtime', 'jax', ['jax', 'onnxruntime'], 'Inference runtime: JAX, or the '
    'exported ONNX model under ONNX Runtime (needs the onnx extra; '
    '--mc_samples=1 only).')
_PER_DIRECTORY = flags.DEFINE_bool(
    'per_directory', False, 'Also summarise each folder and flag images that '
    "disagree with their folder's majority or their given label.")



def main(argv):
  cli.start()
  with cli.user_errors(argv[0]):
    if len(argv) > 1:
      raise cli.UserError(f'unexpected arguments: {argv[1:]}')
    summary = label.label_images(
        _WORKDIR.value, _IMAGES.value, _OUTPUT.value,
        mc_samples=_MC_SAMPLES.value, batch_size=_BATCH_SIZE.value,
        seed=_SEED.value, num_workers=_NUM_WORKERS.value,
        labels=_LABELS.value, per_directory=_PER_DIRECTORY.value,
        runtime=_RUNTIME.value)
  print(json.dumps(summary, indent=2))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
