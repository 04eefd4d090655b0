"""Each pass of a conv alone, XLA:CPU against oneDNN (arch/kernels): forward,
input gradient, kernel gradient, at the CIFAR ResNet-20 layer shapes (batch 128).

  taskset -c 0,1 .venv/bin/python benchmarks/conv_passes.py

Milliseconds, median of `--repeats` calls of each compiled pass; GFLOP/s counts
2 x mult-adds per pass. On a shared machine, read the ratios.
"""
import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from arch import kernels  # noqa: E402

# (image side, in channels, out channels, stride): ResNet-20's distinct 3x3 convs.
SHAPES = [(32, 3, 16, 1), (32, 16, 16, 1), (32, 16, 32, 2), (16, 32, 32, 1), (16, 32, 64, 2),
          (8, 64, 64, 1), (2, 64, 64, 1)]


def lax_conv(x, w, strides, pads):
  return jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def passes(conv, strides, pads):
  """Compiled (forward, input gradient, kernel gradient) of `conv`."""
  forward = lambda x, w: conv(x, w, strides, pads)
  return (jax.jit(forward),
          jax.jit(lambda x, w, dy: jax.vjp(lambda x: forward(x, w), x)[1](dy)),
          jax.jit(lambda x, w, dy: jax.vjp(lambda w: forward(x, w), w)[1](dy)))


def median_ms(f, args, repeats):
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=10)
  args = parser.parse_args(argv)
  if not kernels.available():
    sys.exit('error: the oneDNN library is not built (make kernels)')
  print(f'load average {os.getloadavg()}, OMP_NUM_THREADS {os.environ.get("OMP_NUM_THREADS", "unset")}')
  print('shape | GFLOP | XLA fwd / dx / dw ms | oneDNN fwd / dx / dw ms | dw speed-up')
  for side, cin, cout, s in SHAPES:
    x = jax.random.normal(jax.random.key(0), (args.batch, side, side, cin))
    w = jax.random.normal(jax.random.key(1), (3, 3, cin, cout))
    strides, pads = (s, s), ((1, 1), (1, 1))
    dy = lax_conv(x, w, strides, pads)
    ms = {name: [median_ms(f, a, args.repeats) for f, a in
                 zip(passes(conv, strides, pads), [(x, w), (x, w, dy), (x, w, dy)])]
          for name, conv in (('xla', lax_conv), ('onednn', kernels.conv))}
    gflop = 2 * dy.size * 9 * cin / 1e9
    fmt = lambda v: ' / '.join(f'{t:.2f}' for t in v)
    print(f'{args.batch}x{side}x{side}x{cin}->{cout} s{s} | {gflop:.2f} | {fmt(ms["xla"])} | '
          f'{fmt(ms["onednn"])} | {ms["xla"][2] / ms["onednn"][2]:.1f}x', flush=True)
  print(f'load average at the end {os.getloadavg()}')


if __name__ == '__main__':
  main()
