"""The labeller's two engines side by side: local against Ray Data.

Runs `scripts/label.py` as users do (a fresh process, the whole command),
local then `--engine=ray` (embedded Ray), in turns for --rounds, on one
folder and workdir, into a temporary folder. Prints per round the wall time,
the steady images/s (local: its reported images/s, compile excluded; Ray:
images over the seconds after its first rows) and Ray / local for both, and
checks that the two CSVs are byte-identical.

  python benchmarks/label_engines.py --workdir=runs/stage2 \\
      --images=../shared/data/gender-faces/Test --mc_samples=20
"""

import argparse
import filecmp
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def label(workdir: str, images: str, output: str, mc_samples: int,
          engine: str) -> dict:
  """One `scripts/label.py` run: its JSON summary plus 'wall' seconds."""
  start = time.perf_counter()
  done = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'scripts', 'label.py'),
       f'--workdir={workdir}', f'--images={images}', f'--output={output}',
       f'--mc_samples={mc_samples}', f'--engine={engine}'],
      capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  if done.returncode:
    sys.exit(f'label.py --engine={engine} failed:\n{done.stderr[-2000:]}')
  summary = json.loads(done.stdout[done.stdout.index('{'):])
  startup = summary.get('startup_seconds') or 0.0
  summary['wall'] = wall
  summary['steady'] = (summary['num_labelled_now']
                       / (summary['seconds'] - startup) if startup
                       else summary['images_per_second'])
  return summary


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--images', required=True)
  parser.add_argument('--mc_samples', type=int, default=20)
  parser.add_argument('--rounds', type=int, default=3)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.rounds):
      runs = {}
      for engine in ('local', 'ray'):
        output = os.path.join(tmp, f'{engine}{r}', 'labels.csv')
        runs[engine] = label(args.workdir, args.images, output,
                             args.mc_samples, engine)
        runs[engine]['csv'] = output
      local, ray = runs['local'], runs['ray']
      same = filecmp.cmp(local['csv'], ray['csv'], shallow=False)
      print(f"round {r + 1}: {local['num_labelled_now']} images; local wall "
            f"{local['wall']:.1f} s, steady {local['steady']:.0f}/s; ray wall "
            f"{ray['wall']:.1f} s (first rows after "
            f"{ray['startup_seconds']:.1f} s), steady {ray['steady']:.0f}/s; "
            f"ray/local speed: whole command "
            f"{local['wall'] / ray['wall']:.2f}, steady "
            f"{ray['steady'] / local['steady']:.2f}; CSVs "
            f"{'identical' if same else 'DIFFER'}", flush=True)


if __name__ == '__main__':
  main()
