"""Where the CPU time of the convolutions goes: each conv of the model, timed alone.

For the four convolutions of the original CNN at the benchmark's sizes
(218x178; the first one in its 2x2 space-to-depth form, as the model runs
it) this times, jitted and warm, the median of --repeats calls of:
  forward at the inference batch; forward, input gradient and kernel
  gradient (the CPU kernels' forms, `gender_jax.cpu_kernels.conv2d`) at the
  train batch;
and prints each with its GFLOP/s next to a float32 4096x4096 matmul, XLA's
best case on this machine. The last lines are the model's floor: its
forward FLOPs at the matmul rate, against the measured inference batch.
XLA:CPU's profile (`speed.py --profile`) shows convolution thunks at ~0 ms;
this is the table that accounts for them.

  python benchmarks/conv_speed.py
"""

import argparse
import statistics
import time

from gender_jax import cpu  # pylint: disable=g-import-not-at-top

cpu.reexec_with_malloc_tunables()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from gender_jax import cpu_kernels  # pylint: disable=g-import-not-at-top,wrong-import-position

# (input H, W, C, output F, kernel k, space-to-depth) of the model's convs at
# 218x178; the first one runs as a 12 -> 128 3x3 conv on 109x89 blocks.
LAYERS = ((218, 178, 3, 32, 5, True), (109, 89, 32, 64, 3, False),
          (54, 44, 64, 96, 3, False), (27, 22, 96, 128, 3, False))


def median_ms(fn, *args, repeats):
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def layer_flops(h, w, c, f, k, s2d, batch):
  """Multiply-adds x 2 of one conv as computed (s2d: the 12 -> 4F form)."""
  if s2d:
    return 2 * batch * (h // 2) * (w // 2) * 9 * (4 * c) * (4 * f)
  return 2 * batch * h * w * k * k * c * f


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--train_batch', type=int, default=32)
  parser.add_argument('--infer_batch', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()

  a = jnp.ones((4096, 4096), jnp.float32)
  mm_ms = median_ms(jax.jit(lambda a: a @ a), a, repeats=args.repeats)
  peak = 2 * 4096 ** 3 / mm_ms / 1e6
  print(f'matmul 4096^2 float32: {peak:.0f} GFLOP/s')

  rng = np.random.default_rng(0)
  total_fwd_ms = 0.0
  for h, w, c, f, k, s2d in LAYERS:
    conv = cpu_kernels.conv2d_same_s2d if s2d else cpu_kernels.conv2d_same
    kernel = jnp.asarray(rng.standard_normal((k, k, c, f)) * 0.1, jnp.float32)
    row = [f'conv {h}x{w} {c}->{f} {k}x{k}{" (s2d)" if s2d else ""}:']
    for name, batch in (('infer', args.infer_batch), ('train', args.train_batch)):
      x = jnp.asarray(rng.standard_normal((batch, h, w, c)), jnp.float32)
      gflop = layer_flops(h, w, c, f, k, s2d, batch) / 1e9
      fwd = median_ms(jax.jit(conv), x, kernel, repeats=args.repeats)
      if name == 'infer':
        total_fwd_ms += fwd
        row.append(f'fwd@{batch} {fwd:.1f} ms ({gflop / fwd * 1e3:.0f} GF/s)')
        continue
      g = jnp.ones(jax.eval_shape(conv, x, kernel).shape, jnp.float32)
      # The unused forward output is dead code: only the gradient is timed.
      grads = [jax.jit(lambda x, kernel, g, i=i, conv=conv: jax.vjp(
          conv, x, kernel)[1](g)[i]) for i in (0, 1)]
      ig, wg = (median_ms(fn, x, kernel, g, repeats=args.repeats)
                for fn in grads)
      row.append(f'fwd@{batch} {fwd:.1f} ms, input grad {ig:.1f} ms, '
                 f'kernel grad {wg:.1f} ms ({gflop / wg * 1e3:.0f} GF/s)')
    print(' | '.join(row), flush=True)

  useful = sum(layer_flops(h, w, c, f, k, False, args.infer_batch)
               for h, w, c, f, k, _ in LAYERS)
  dense = 2 * args.infer_batch * 13 * 11 * 128 * 512
  floor = (useful + dense) / peak / 1e6
  print(f'inference convs: {total_fwd_ms:.0f} ms per batch of '
        f'{args.infer_batch}; the model forward ({(useful + dense) / 1e9:.1f} '
        f'GFLOP) at the matmul rate: {floor:.0f} ms')


if __name__ == '__main__':
  main()
