"""Every matplotlib picture of the project, each written to one PNG.

  plot_confusion_matrix     counts and row shares of a confusion matrix
  plot_reliability_diagram  accuracy vs confidence per calibration bin
  plot_image_grid           faces in a grid, each with a title (evaluate's
                            misclassified faces, label's mislabel candidates)
  plot_wrong_predictions    misclassified faces, paged into grids

Figures are drawn on matplotlib's Agg canvas without pyplot (no display, no
global state), and matplotlib is imported only when a picture is drawn. Class
names are arguments, so this module needs neither TensorFlow nor the dataset.
"""

import math
import os
from typing import List, Optional, Sequence

import numpy as np

WRONG_PER_PAGE = 30                        # 5 rows x 6 columns.


def _figure(width: float, height: float):
  """A matplotlib Figure on the Agg canvas (no pyplot, no display needed)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  return Figure(figsize=(width, height), dpi=100, layout='constrained')


def plot_confusion_matrix(cm, class_names: Sequence[str], path: str) -> None:
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
  fig.savefig(path)


def plot_reliability_diagram(bins: Sequence[dict], ece: float,
                             path: str) -> None:
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
  fig.savefig(path)


def plot_image_grid(images, titles: Sequence[str], path: str, title: str,
                    cols: int = 6) -> None:
  """One PNG of `images` (uint8 HxWx3) in a grid, each with its title."""
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
  fig.savefig(path)


def wrong_page_paths(directory: str, num_pages: int) -> List[str]:
  """wrong_predictions.png, then wrong_predictions_2.png, ..."""
  return [os.path.join(directory, 'wrong_predictions.png' if k == 1 else
                       f'wrong_predictions_{k}.png')
          for k in range(1, max(num_pages, 1) + 1)]


def plot_wrong_predictions(images, labels, p_male, class_names: Sequence[str],
                           directory: str,
                           num_wrong_total: Optional[int] = None,
                           per_page: int = WRONG_PER_PAGE) -> List[str]:
  """Grids of misclassified faces (already sorted), `per_page` per PNG.

  Each face is titled with its rank, true label and p(male). Returns the PNG
  paths; with no faces, one PNG that says so.
  """
  n = len(images)
  total = n if num_wrong_total is None else num_wrong_total
  paths = wrong_page_paths(directory, math.ceil(n / per_page))
  for page, path in enumerate(paths):
    chunk = range(page * per_page, min(n, (page + 1) * per_page))
    plot_image_grid(
        [images[i] for i in chunk],
        [f'#{i + 1} true {class_names[int(labels[i])]}\n'
         f'p(male)={p_male[i]:.3f}' for i in chunk], path,
        f'Misclassified, largest error first: page {page + 1}/{len(paths)}, '
        f'showing {n} of {total}')
  return paths
