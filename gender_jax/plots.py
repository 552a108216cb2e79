"""Every matplotlib picture of the project, as an RGB uint8 (H, W, 3) array.

  confusion_matrix        counts and row shares of a confusion matrix
  reliability_diagram     accuracy vs confidence per calibration bin
  coverage_accuracy       accuracy on the most confident share kept
  image_grid              faces in a grid, each with a title (evaluate's
                          misclassified faces, label's mislabel candidates)
  wrong_prediction_pages  misclassified faces, paged into grids

The arrays go to `write_png` and to TensorBoard's `write_images` alike.
Figures are drawn on matplotlib's Agg canvas without pyplot (no display, no
global state), and matplotlib is imported only when a picture is drawn. Class
names are arguments, so this module needs neither TensorFlow nor the dataset.
"""

import io
import math
import os
from typing import List, Optional, Sequence

import numpy as np

from gender_jax import fileio

WRONG_PER_PAGE = 30                        # 5 rows x 6 columns.


def _figure(width: float, height: float):
  """A matplotlib Figure on the Agg canvas (no pyplot, no display needed)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  return Figure(figsize=(width, height), dpi=100, layout='constrained')


def _pixels(fig) -> np.ndarray:
  """The figure rendered: RGB uint8 (H, W, 3)."""
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  canvas = backend_agg.FigureCanvasAgg(fig)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def write_png(image: np.ndarray, path: str) -> None:
  """Writes an RGB uint8 picture to `path` as PNG, whole or not at all."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format='PNG')
  fileio.write_atomic(path, buffer.getvalue())


def confusion_matrix(cm, class_names: Sequence[str]) -> np.ndarray:
  """Counts and their share of the true class; rows true, columns predicted."""
  cm = np.asarray(cm)
  fig = _figure(4.2, 3.6)
  ax = fig.add_subplot()
  ax.imshow(cm, cmap='Blues')
  totals = cm.sum(axis=1, keepdims=True)
  for (i, j), v in np.ndenumerate(cm):
    share = v / totals[i, 0] if totals[i, 0] else 0.0
    ax.text(j, i, f'{v}\n{share:.1%}', ha='center', va='center',
            color='white' if v > cm.max() / 2 else 'black')
  ticks = list(range(len(class_names)))
  ax.set_xticks(ticks, class_names)
  ax.set_yticks(ticks, class_names)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title(f'Confusion matrix (n={int(cm.sum())})')
  return _pixels(fig)


def reliability_diagram(bins: Sequence[dict], ece: float) -> np.ndarray:
  """Per-bin accuracy against confidence (bins as `evaluate.calibration_bins`
  makes them), the gap to mean confidence, and the counts below."""
  fig = _figure(4.5, 5.0)
  ax, ax_count = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
  width = bins[0]['upper'] - bins[0]['lower']
  full = [b for b in bins if b['count']]
  centers = [(b['lower'] + b['upper']) / 2 for b in full]
  ax.bar(centers, [b['accuracy'] for b in full], width=width * 0.95,
         color='tab:blue', edgecolor='black', label='accuracy')
  ax.plot([0.5, 1.0], [0.5, 1.0], '--', color='gray', label='perfect')
  ax.bar(centers, [b['confidence'] - b['accuracy'] for b in full],
         bottom=[b['accuracy'] for b in full], width=width * 0.95,
         color='tab:red', alpha=0.35, hatch='//', edgecolor='tab:red',
         label='gap to mean confidence')
  ax.set_ylim(0, 1.02)
  ax.set_xlim(0.5, 1.0)
  ax.set_ylabel('accuracy')
  ax.set_title(f'Reliability diagram (ECE {ece:.4f})')
  ax.legend(loc='upper left', fontsize=8)
  ax_count.bar([(b['lower'] + b['upper']) / 2 for b in bins],
               [b['count'] for b in bins], width=width * 0.95, color='gray')
  ax_count.set_yscale('symlog')
  ax_count.set_xlabel('confidence max(p, 1-p)')
  ax_count.set_ylabel('count')
  return _pixels(fig)


def coverage_accuracy(curve: Sequence[dict], marked: Sequence[dict],
                      num_examples: int) -> np.ndarray:
  """Accuracy on the most confident share of the examples against that
  share (points as `evaluate.selective_accuracy` makes them), with the
  `marked` points labelled by their confidence cut: what flagging the rest
  for review buys."""
  fig = _figure(4.5, 3.8)
  ax = fig.add_subplot()
  ax.plot([k['count'] / num_examples for k in curve],
          [k['accuracy'] for k in curve], '-o', markersize=3,
          color='tab:blue')
  for k in marked:
    x = k['count'] / num_examples
    ax.plot(x, k['accuracy'], 'o', color='tab:red')
    cut = math.floor(k['threshold'] * 1e4) / 1e4     # As the report prints.
    ax.annotate(f"{k['accuracy']:.1%} (cut {cut:.4f})",
                (x, k['accuracy']), textcoords='offset points',
                xytext=(-6, -12), ha='right', fontsize=8)
  ax.set_xlim(0, 1.02)
  ax.set_xlabel('share kept (most confident first; the rest flagged)')
  ax.set_ylabel('accuracy on the kept')
  ax.set_title(f'Accuracy by coverage (n={num_examples})')
  ax.grid(alpha=0.3)
  return _pixels(fig)


def image_grid(images, titles: Sequence[str], title: str,
               cols: int = 6) -> np.ndarray:
  """`images` (uint8 HxWx3) in a grid, each with its title."""
  rows = max(1, math.ceil(len(images) / cols))
  lines = max([t.count('\n') + 1 for t in titles] or [1])
  fig = _figure(cols * 1.7, rows * (1.85 + 0.13 * lines) + 0.5)
  if not len(images):
    fig.text(0.5, 0.5, 'Nothing to show.', ha='center')
  for k, (image, text) in enumerate(zip(images, titles)):
    ax = fig.add_subplot(rows, cols, k + 1)
    ax.imshow(image)
    ax.set_title(text, fontsize=8)
    ax.axis('off')
  fig.suptitle(title, fontsize=10)
  return _pixels(fig)


def wrong_page_paths(directory: str, num_pages: int) -> List[str]:
  """wrong_predictions.png, then wrong_predictions_2.png, ..."""
  return [os.path.join(directory, 'wrong_predictions.png' if k == 1 else
                       f'wrong_predictions_{k}.png')
          for k in range(1, max(num_pages, 1) + 1)]


def wrong_prediction_pages(images, labels, p_male,
                           class_names: Sequence[str],
                           num_wrong_total: Optional[int] = None,
                           per_page: int = WRONG_PER_PAGE) -> List[np.ndarray]:
  """Grids of misclassified faces (already sorted), `per_page` per picture.

  Each face is titled with its rank, true label and p(male); with no faces,
  one picture that says so. Page k goes to `wrong_page_paths(...)[k]`.
  """
  n = len(images)
  total = n if num_wrong_total is None else num_wrong_total
  num_pages = max(1, math.ceil(n / per_page))
  pages = []
  for page in range(num_pages):
    chunk = range(page * per_page, min(n, (page + 1) * per_page))
    pages.append(image_grid(
        [images[i] for i in chunk],
        [f'#{i + 1} true {class_names[int(labels[i])]}\n'
         f'p(male)={p_male[i]:.3f}' for i in chunk],
        f'Misclassified, largest error first: page {page + 1}/{num_pages}, '
        f'showing {n} of {total}'))
  return pages
