"""Label a folder of face images with a trained model, resumably, into CSV.

`label_images` labels every image under a folder (recursively, in a fixed
order; the labeller's own outputs are never inputs) into one CSV row each
(`gender_jax.label_csv`), framed as the training data were
(`gender_jax.framing`), with the model of a workdir (`predict.Predictor`),
then writes the summaries (`label_report.summarize`). One run at a time per
output (`<output>.lock` names the run holding it); a killed run continues
where it stopped when rerun with the same arguments, and other arguments are
refused. `engine='ray'` labels on Ray Data instead (`gender_jax.label_ray`),
into the same rows.
"""

import os
import time
from typing import Dict, List, Optional, Set

import jax
import tqdm
from absl import logging

from gender_jax import errors
from gender_jax import framing as framing_lib
from gender_jax import image_io
from gender_jax import label_csv
from gender_jax import label_report
from gender_jax import locking
from gender_jax import predict

ENGINES = ('local', 'ray')


class LabelError(errors.UserError, ValueError):
  """A labelling input the user must fix; the message says which and how."""


def output_paths(output_csv: str) -> Dict[str, str]:
  """Every file the labeller writes for `output_csv` (the CSV included)."""
  return {
      'csv': output_csv,
      'args': output_csv + '.args.json',
      'lock': output_csv + '.lock',
      'repair': output_csv + '.repair.tmp',
      'shards': output_csv + '.ray',     # The Ray engine's shards (a folder).
      **label_report.report_paths(output_csv),
  }


def own_outputs(images_dir: str, outputs: Dict[str, str]) -> Set[str]:
  """The labeller's output files as paths relative to `images_dir` (those
  inside it), so that they are never labelled as images."""
  root = os.path.realpath(images_dir)
  inside = set()
  for path in outputs.values():
    rel = os.path.relpath(os.path.realpath(path), root)
    if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
      inside.add(rel.replace(os.sep, '/'))
  return inside


def _read_config(workdir: str):
  """The workdir's training config; a missing workdir is a LabelError."""
  from gender_jax import checkpointing  # pylint: disable=g-import-not-at-top
  try:
    return checkpointing.read_config(workdir)
  except FileNotFoundError as e:
    raise LabelError(e) from e


def load_predictor(workdir, mc_samples, batch_size, seed, runtime, tta):
  """The workdir's best model (calibrated) as a Predictor; a missing
  checkpoint or a bad mc_samples/batch_size/runtime/tta is a LabelError."""
  try:
    return predict.Predictor.from_workdir(
        workdir, mc_samples=mc_samples, batch_size=batch_size, seed=seed,
        runtime=runtime, tta=tta)
  except (FileNotFoundError, ValueError) as e:
    raise LabelError(e) from e


def _check_inputs(images_dir: str, labels: Optional[str], output_csv: str,
                  review_below: Optional[float] = None) -> None:
  """Fails early (before labelling) on a missing folder, a bad labels file,
  an --output that is a directory or a review cut outside [0.5, 1]."""
  if review_below is not None and not 0.5 <= review_below <= 1.0:
    raise LabelError(f'--review_below={review_below}: a confidence '
                     'max(p, 1-p) is in [0.5, 1]; give a cut there, e.g. 0.8.')
  if os.path.isdir(output_csv):
    raise LabelError(f'--output {output_csv!r} is a directory: give the path '
                     'of the CSV file to write, e.g. labels.csv.')
  if not os.path.isdir(images_dir):
    raise LabelError(f'--images {images_dir!r} is not a directory: pass the '
                     'folder holding the images.')
  if labels not in (None, label_report.FOLDER_LABELS):
    try:
      label_report.read_labels(labels, images_dir)
    except (OSError, ValueError) as e:
      raise LabelError(f'--labels: {e}') from e


def label_images(workdir: str, images_dir: str, output_csv: str,
                 mc_samples: int = 1, batch_size: int = 64, *,
                 seed: int = 0, num_workers: Optional[int] = None,
                 labels: Optional[str] = None, per_directory: bool = False,
                 progress: bool = True, runtime: str = 'jax',
                 tta: str = 'none', resize: Optional[str] = None,
                 boxes: Optional[str] = None,
                 box_margin: Optional[float] = None,
                 predictor: Optional[predict.Predictor] = None,
                 engine: str = 'local', ray_address: Optional[str] = None,
                 num_actors: Optional[int] = None,
                 review_below: Optional[float] = None) -> dict:
  """Labels every image under `images_dir` into `output_csv` (resumable).

  Args:
    workdir: a training workdir; its best checkpoint is used.
    images_dir: folder searched recursively for image files.
    output_csv: CSV to write (appended to when resuming).
    mc_samples: MC-Dropout samples per image; 1 = deterministic only.
    batch_size: images per device batch (fixed; the last one is padded).
    seed: dropout seed (per image: seed and a hash of its path).
    num_workers: decoding threads (default: CPU count, at most 8).
    labels: given labels: a CSV file, 'folders' (Male/Female folders), or
      None (folders if every image is under a Male or Female folder).
    per_directory: also write per-folder summaries and flagged images.
    progress: show a progress bar with images/s.
    runtime: 'jax', or 'onnxruntime' (the exported ONNX model under ONNX
      Runtime; mc_samples=1 only, MC-Dropout runs in JAX).
    tta: 'none', or 'flip' (mean logit of each image and its mirror).
    resize: 'stretch', 'crop' or 'pad' (`image_io.frame`); None: the
      training dataset's (`framing.resolve_framing`).
    boxes: CSV of face boxes `path,x,y,w,h` (paths relative to
      `images_dir`, extension optional: VGGFace2's loose_bb_*.csv); images
      without a box are framed whole.
    box_margin: grows each box by this fraction of its size per side; None:
      the training dataset's.
    predictor: a ready `Predictor` (else built from `workdir`, with its
      calibration.json's temperature); its mc_samples, batch_size, seed,
      runtime, tta and temperature then replace the arguments.
    engine: 'local' (this process), or 'ray' (Ray Data: `label_ray`; the
      same rows, so either engine resumes the other's CSV).
    ray_address: engine='ray': a cluster to join ('auto', 'ray://host:10001');
      None starts an embedded Ray on this machine.
    num_actors: engine='ray': model actors (default: one per GPU of the
      cluster, else one per node).
    review_below: also list the images whose confidence max(p, 1-p) is
      below this (in [0.5, 1]) for review, least confident first.

  Returns:
    A summary: counts, timings (seconds, images_per_second of the images
    labelled in this call, compile excluded) and the written file paths.

  Raises:
    errors.UserError: a missing workdir or folder, a bad labels file
      (LabelError), bad framing (framing.FramingError), a CSV made with
      other arguments (label_csv.ResumeError); locking.LockedError: another
      run is writing `output_csv`.
  """
  if engine not in ENGINES or (engine == 'ray' and predictor is not None):
    raise LabelError(f'engine={engine!r}: expected one of {ENGINES} (and no '
                     'ready predictor with engine=ray).')
  config = _read_config(workdir)
  _check_inputs(images_dir, labels, output_csv, review_below)
  framing, framing_line = framing_lib.resolve_framing(config, resize, boxes,
                                                      box_margin)
  outputs = output_paths(output_csv)
  os.makedirs(os.path.dirname(os.path.abspath(output_csv)), exist_ok=True)
  with locking.hold(outputs['lock'], f'label output {output_csv}'):
    if engine == 'ray':
      from gender_jax import label_ray  # pylint: disable=g-import-not-at-top
      summary = label_ray.run(
          config, workdir, images_dir, outputs, (framing, framing_line),
          progress, dict(mc_samples=mc_samples, batch_size=batch_size,
                         seed=seed, runtime=runtime, tta=tta),
          ray_address, num_actors, num_workers)
    else:
      if jax.process_count() > 1:   # (Starts JAX: after the cheap checks.)
        raise LabelError('the local engine runs on one host; start it on one '
                         'process, or use --engine=ray for several machines.')
      predictor = predictor or load_predictor(
          workdir, mc_samples, batch_size, seed, runtime, tta)
      announce(framing_line, progress)
      summary = _label(config, workdir, images_dir, outputs, predictor,
                       num_workers or min(8, os.cpu_count() or 1), progress,
                       framing)
    summary.update(label_report.summarize(
        output_csv, images_dir, labels=labels, per_directory=per_directory,
        review_below=review_below))
  return summary


def prepare(config, workdir, images_dir, outputs, settings: dict, framing):
  """(header, files, paths in the CSV, rows dropped) of a run of either
  engine: checks the arguments sidecar (`settings`: `Predictor.settings()`)
  and repairs the CSV."""
  header = label_csv.columns(settings['mc_samples'])
  excluded = own_outputs(images_dir, outputs)
  files = [p for p in image_io.list_images(images_dir) if p not in excluded]
  label_csv.check_args(outputs['args'], label_csv.run_arguments(
      workdir, images_dir, config, settings, header, framing), outputs['csv'])
  done, num_dropped = label_csv.done_paths(outputs['csv'], header, excluded,
                                           outputs['repair'])
  return header, files, done, num_dropped


def announce(message: str, progress: bool) -> None:
  """Shows `message` above the progress bar (if shown) and logs it."""
  if progress:
    tqdm.tqdm.write(label_report.display_path(message))
  logging.info('%s', label_report.display_path(message))


def images_to_do(files, done, images_dir, progress) -> List[str]:
  """The files not in `done`, in order; says how many."""
  todo = [p for p in files if p not in done]
  announce(f'{len(files)} images under {images_dir}: '
           f'{len(files) - len(todo)} already labelled, {len(todo)} to do.',
           progress)
  return todo


def progress_bar(files, todo, progress: bool):
  """A bar over all `files` (images/s), the ones not in `todo` done."""
  return tqdm.tqdm(total=len(files), initial=len(files) - len(todo),
                   unit='img', disable=not progress, smoothing=0.1)


def _label(config, workdir, images_dir, outputs, predictor, num_workers,
           progress, framing) -> dict:
  """Labels the images not yet in the CSV; returns counts and timings."""
  from gender_jax import label_ray  # pylint: disable=g-import-not-at-top
  if label_ray.pending_shards(outputs):
    raise LabelError(
        f'{outputs["shards"]} holds the finished part of an interrupted '
        '--engine=ray run: rerun with --engine=ray to finish it, or delete '
        'that folder to discard it.')
  settings = predictor.settings()
  header, files, done, num_dropped = prepare(config, workdir, images_dir,
                                             outputs, settings, framing)
  todo = images_to_do(files, done, images_dir, progress)
  compile_seconds = predictor.warm_up()
  start = time.perf_counter()
  batches = predictor.predict_files(
      [os.path.join(images_dir, p) for p in todo], predict.path_ids(todo),
      resize=framing.resize, boxes=framing.boxes_of(todo),
      box_margin=framing.box_margin, num_workers=num_workers)
  with progress_bar(files, todo, progress) as bar:
    num_errors = label_csv.append_rows(
        outputs['csv'], header,
        ((todo[b.start:b.start + len(b.errors)], b.errors, b.outputs)
         for b in batches), bar.update)
  seconds = time.perf_counter() - start
  return run_summary(outputs['csv'], files, todo, num_dropped, num_errors,
                     settings, predictor.batch_size, framing, compile_seconds,
                     seconds, 'local')


def run_summary(output_csv, files, todo, num_dropped, num_errors, settings,
                batch_size, framing, compile_seconds, seconds, engine) -> dict:
  """A labelling call's counts and timings (either engine)."""
  return {
      'output_csv': output_csv,
      'engine': engine,
      'num_files': len(files),
      'num_labelled_now': len(todo),
      'num_resumed': len(files) - len(todo),
      'num_rows_dropped': num_dropped,
      'num_errors_now': num_errors,
      'mc_samples': settings['mc_samples'],
      'batch_size': batch_size,
      'temperature': settings['temperature'],
      'tta': settings['tta'],
      'resize': framing.resize,
      'boxes': framing.boxes,
      'box_margin': framing.box_margin,
      'compile_seconds': compile_seconds,
      'seconds': seconds,
      'images_per_second': len(todo) / seconds if seconds > 0 else 0.0,
  }
