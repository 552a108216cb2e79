r"""Labels every image under a folder with a trained model, into CSV.

  python scripts/label.py --workdir=runs/stage2 --images=/data/vggface2/train \
      --output=labels.csv [--mc_samples=20] [--batch_size=64] \
      [--per_directory] [--labels=identity_meta.csv] [--review_below=0.8] \
      [--runtime=onnxruntime] [--tta=flip] [--resize=stretch|crop|pad] \
      [--boxes=loose_bb_train.csv --box_margin=0.1] \
      [--engine=ray [--ray_address=auto] [--num_actors=N]]

One row per image (path, p_male, predicted, MC-Dropout mean/std/entropy/
mutual information with --mc_samples>1, error). Unreadable files get a row
with the reason. Rerun the same command after an interruption to continue
where it stopped; a second run on the same --output while one is running
stops at once, naming the run that holds it. With --per_directory,
<output>_per_directory.csv and <output>_flagged.csv summarise each folder
(identity); with given labels (--labels, or Male/Female folders),
<output>_mislabels.csv ranks the images whose given label is most likely
wrong; with --review_below=C, <output>_review.csv lists the images whose
confidence max(p, 1-p) is below C, least confident first (evaluate.py's
report gives the cut that keeps 95 / 90 / 80% of a labelled split). p(male)
is calibrated by the workdir's calibration.json (if any);
--tta=flip averages the logits of each image and its mirror. Images are
framed as the training data were: --resize and --box_margin default to what
scripts/prepare_data.py recorded for the workdir's dataset (else stretch);
--boxes crops each image listed there to its face box first. --engine=ray
labels on Ray Data (an embedded Ray on this machine, or with --ray_address
a cluster: README "Labelling on a cluster"); the rows are the same. A
mistake in the flags, folders or files is one line on stderr and exit
status 2.
"""

import json

from absl import app
from absl import flags

from gender_jax import cli
cli.quiet_tensorflow()   # Before label imports TensorFlow.
from gender_jax import image_io  # pylint: disable=g-import-not-at-top,g-bad-import-order
from gender_jax import label  # pylint: disable=g-import-not-at-top,g-bad-import-order
from gender_jax import predict  # pylint: disable=g-import-not-at-top,g-bad-import-order

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
    'num_workers', None, 'Image decoding threads (default: cores, at most 8; '
    '--engine=ray: per decode task, default 1).', lower_bound=1)
_LABELS = flags.DEFINE_string(
    'labels', None, "Given labels: a CSV of (image or folder path, label), or "
    "'folders' for a Male/Female folder layout (used automatically when every "
    'image is under such a folder).')
_RUNTIME = flags.DEFINE_enum(
    'runtime', 'jax', predict.RUNTIMES, 'Inference runtime: JAX, or the '
    'exported ONNX model under ONNX Runtime (needs the onnx extra; '
    '--mc_samples=1 only).')
_TTA = flags.DEFINE_enum(
    'tta', 'none', predict.TTA_MODES, 'Test-time augmentation: flip = mean '
    'logit of each image and its mirror (twice the compute).')
_PER_DIRECTORY = flags.DEFINE_bool(
    'per_directory', False, 'Also summarise each folder and flag images that '
    "disagree with their folder's majority or their given label.")
_REVIEW_BELOW = flags.DEFINE_float(
    'review_below', None, 'Also write <output>_review.csv: the images whose '
    'confidence max(p, 1-p) is below this, least confident first.',
    lower_bound=0.5, upper_bound=1.0)
_RESIZE = flags.DEFINE_enum(
    'resize', None, image_io.RESIZE_MODES, "How an image meets the model's "
    'aspect ratio: stretch, centre crop or pad (default: as the training '
    'dataset was prepared, else stretch).')
_BOXES = flags.DEFINE_string(
    'boxes', None, 'CSV of face boxes path,x,y,w,h in pixels, paths relative '
    "to --images, extension optional (VGGFace2's loose_bb_*.csv).")
_BOX_MARGIN = flags.DEFINE_float(
    'box_margin', None, 'Grow each face box by this fraction of its size on '
    'every side (default: as the training dataset was prepared, else 0).',
    lower_bound=0.0)
_ENGINE = flags.DEFINE_enum(
    'engine', 'local', label.ENGINES, 'local: label in this process; ray: on '
    'Ray Data (needs the ray extra), the same rows.')
_RAY_ADDRESS = flags.DEFINE_string(
    'ray_address', None, "--engine=ray: the cluster to join ('auto', "
    "'ray://host:10001'); default: an embedded Ray on this machine.")
_NUM_ACTORS = flags.DEFINE_integer(
    'num_actors', None, '--engine=ray: model actors (default: one per GPU of '
    'the cluster, else one per node).', lower_bound=1)


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
        runtime=_RUNTIME.value, tta=_TTA.value, resize=_RESIZE.value,
        boxes=_BOXES.value, box_margin=_BOX_MARGIN.value,
        engine=_ENGINE.value, ray_address=_RAY_ADDRESS.value,
        num_actors=_NUM_ACTORS.value, review_below=_REVIEW_BELOW.value)
  print(json.dumps(summary, indent=2))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
