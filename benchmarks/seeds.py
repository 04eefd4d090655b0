"""k seeds as one vmapped program (config.num_seeds = k) against k separate runs.

`vmapped` is arch/train.py's training step with num_seeds=k: one compiled
program, the k replicas stacked. `sequential` is the num_seeds=1 step run once on
each of k states: k separate runs taking turns on the same cores. Both are
train.make_functions' own programs (batch gather, augmentation, diagnostics
included), on experiments/degradation.py's digits recipe, timed in interleaved
rounds after a warm-up step, with compile time apart. By default the convs are
oneDNN's (arch/kernels, when built), whose custom calls vmap runs one replica
after the other inside the program; `--xla` traces XLA's convolutions instead,
which vmap turns into grouped convolutions. speed-up = sequential time /
vmapped time for one step of all k seeds (above 1: the group is faster). At k=1
both sides run the same program (num_seeds=1 is not vmapped): its speed-up
shows the noise. On a shared machine read the ratios, and give `uptime`'s load.

  taskset -c 0,1 .venv/bin/python benchmarks/seeds.py                  # ResNet-20
  taskset -c 0,1 .venv/bin/python benchmarks/seeds.py --xla
  taskset -c 0,1 .venv/bin/python benchmarks/seeds.py --depth 56 --rounds 2
"""
import argparse
import contextlib
import csv
import os
import sys
import tempfile
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from arch import layers  # noqa: E402
from arch import optim  # noqa: E402
from arch import sweep  # noqa: E402
from arch import train  # noqa: E402


class Program:
  """The compiled training step of `config` with num_seeds=k, and its state."""

  def __init__(self, config, k):
    config = config.copy_and_resolve_references()
    config.num_seeds, self.k = k, k
    job = train.prepare(config, tempfile.mkdtemp(prefix='seeds-bench-'))
    schedule = optim.make_schedule(config.schedule, config.num_steps)
    tx = optim.make_optimizer(config.optimizer, schedule)
    init, train_step, _ = train.make_functions(job, tx, schedule)
    self.replicated = NamedSharding(job.mesh, P())
    self.images = jax.device_put(job.data.images, self.replicated)
    self.labels = jax.device_put(job.data.labels, self.replicated)
    with jax.threefry_partitionable(False):  # as train.py initialises
      self.state = init()
    t = time.perf_counter()
    self.step = train_step.lower(self.state, self.images, self.labels).compile()
    self.compile_s = time.perf_counter() - t
    self.state = self.run(self.state, 1)  # warm-up

  def run(self, state, steps):
    for _ in range(steps):
      state, metrics = self.step(state, self.images, self.labels)
    jax.block_until_ready(metrics['loss'])
    return state

  def replica(self, i):
    """Replica i's state alone, as the num_seeds=1 program takes it (k=1: a copy)."""
    pick = (lambda x: x[i]) if self.k > 1 else (lambda x: x.copy())
    return jax.tree.map(lambda x: jax.device_put(pick(x), self.replicated), self.state)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--depth', type=int, default=20, help='CIFAR ResNet depth (option A)')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--seeds', default='1,4,8', help='comma-separated k')
  parser.add_argument('--rounds', type=int, default=3, help='interleaved timing rounds')
  parser.add_argument('--steps', type=int, default=3, help='steps per round (warm-up excluded)')
  parser.add_argument('--xla', action='store_true', help="XLA's convs, not oneDNN's")
  parser.add_argument('--csv', default=None, help='default: benchmarks/results_seeds[_xla].csv')
  args = parser.parse_args(argv)
  args.csv = args.csv or f'benchmarks/results_seeds{"_xla" if args.xla else ""}.csv'

  print(f'jax {jax.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, '
        f'affinity {sorted(os.sched_getaffinity(0))}, load average {os.getloadavg()}', flush=True)
  experiment = sweep.load_experiment(os.path.join(ROOT, 'experiments', 'degradation.py'))
  config = experiment.get_config(f'depth={args.depth},batch_size={args.batch}')
  ks = [int(k) for k in args.seeds.split(',')]
  with layers.onednn_convs(False) if args.xla else contextlib.nullcontext():
    convs = 'onednn' if layers._onednn_on() else 'xla'  # what the programs are traced with
    one = Program(config, 1)
    vmapped, separate = {}, {}
    for k in ks:
      vmapped[k] = one if k == 1 else Program(config, k)
      separate[k] = [vmapped[k].replica(i) for i in range(k)]
      print(f'num_seeds={k}: compile {vmapped[k].compile_s:.1f} s', flush=True)
  times = {(k, side): [] for k in ks for side in ('vmapped', 'sequential')}
  for r in range(args.rounds):
    for k in ks:
      t = time.perf_counter()
      vmapped[k].state = vmapped[k].run(vmapped[k].state, args.steps)
      times[k, 'vmapped'].append((time.perf_counter() - t) / args.steps)
      t = time.perf_counter()
      for _ in range(args.steps):  # the k runs take turns, a step each
        separate[k] = [one.run(state, 1) for state in separate[k]]
      times[k, 'sequential'].append((time.perf_counter() - t) / args.steps)
    print(f'round {r + 1}/{args.rounds} done, load average {os.getloadavg()}', flush=True)

  rows = []
  for k in ks:
    vm, seq = np.median(times[k, 'vmapped']), np.median(times[k, 'sequential'])
    rows.append(dict(
        model=f'cifar_resnet-{args.depth} digits 8x8', convs=convs,
        batch=args.batch, k=k,
        compile_vmapped_s=round(vmapped[k].compile_s, 2), compile_one_s=round(one.compile_s, 2),
        vmapped_ms=round(1e3 * vm, 1), sequential_ms=round(1e3 * seq, 1),
        vmapped_steps_s=round(k / vm, 2), sequential_steps_s=round(k / seq, 2),
        vmapped_img_s=round(k * args.batch / vm, 1),
        sequential_img_s=round(k * args.batch / seq, 1),
        speedup=round(seq / vm, 2)))
  if args.csv:
    os.makedirs(os.path.dirname(args.csv) or '.', exist_ok=True)
    with open(args.csv, 'w', newline='') as f:
      writer = csv.DictWriter(f, list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
  print('\n(ms: one step of all k seeds; steps_s: seed-steps per second)')
  print(' | '.join(rows[0]))
  for row in rows:
    print(' | '.join(str(v) for v in row.values()))
  print(f'load average at the end {os.getloadavg()}')


if __name__ == '__main__':
  main()
