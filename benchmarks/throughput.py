"""Train and inference throughput of registered models on this machine's CPU.

In the spirit of timm's benchmark.py: for each model and batch size, images/s
for a training step (SGD with momentum, the training loop's loss, BN updates
and sown diagnostics, as in arch/train.py) and for inference (eval mode), with
warm-up excluded; compile time as its own figure; params, multiply-adds and the
achieved FLOP/s (a training step counted as 3x the forward's 2 * mult-adds).
The models are timed in interleaved rounds, so a load that comes and goes hits
them all alike: on a shared machine, read the ratios, not the absolute figures.

  python benchmarks/throughput.py                          # the default suite
  python benchmarks/throughput.py --models r20-cifar --compare-torch
  python benchmarks/throughput.py --models r56-cifar,plain56-cifar --before
  python benchmarks/throughput.py --models r110-cifar,r1202-cifar-scan --rounds 1

`--before` also times each model with the project's XLA:CPU workarounds and
oneDNN convolutions off (arch/layers.py `xla_cpu_workarounds`, `onednn_convs`),
i.e. the code as it was; `--xla` with only oneDNN off (pure XLA, workarounds
on). Unlabelled rows use oneDNN when arch/kernels loaded it. `--compare-torch`
times the same CIFAR ResNet in PyTorch CPU eager (best of NCHW and
channels-last) in the same rounds, in a child process of its own, and prints
JAX/PyTorch. `--xla-norms` times oneDNN's convs with XLA's batch norm. Pin the process
(`taskset -c 0,1`) and report `uptime`'s load average with the figures.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import arch  # noqa: E402
from arch import kernels, layers, trace_cache  # noqa: E402

CIFAR, DIGITS = (32, 32, 3), (8, 8, 1)
START_ENV = dict(os.environ)  # before arch/kernels sets its OpenMP defaults


def cifar(depth, shortcut='A', **kw):
  return dict(name='cifar_resnet', depth=depth, shortcut=shortcut, **kw)


# name -> (model config, input shape)
MODELS = {
    'r20-cifar': (cifar(20), CIFAR),
    'plain20-cifar': (cifar(20, 'none'), CIFAR),
    'r56-cifar': (cifar(56), CIFAR),
    'plain56-cifar': (cifar(56, 'none'), CIFAR),
    'r20-digits': (cifar(20), DIGITS),
    'r56-digits': (cifar(56), DIGITS),
    'plain56-digits': (cifar(56, 'none'), DIGITS),
    'r110-cifar': (cifar(110), CIFAR),
    'r110-cifar-scan': (cifar(110, scan_blocks=True), CIFAR),
    'r1202-cifar-scan': (cifar(1202, scan_blocks='remat'), CIFAR),
    'resnet50': (dict(name='resnet50', num_classes=10), (64, 64, 3)),
}
DEFAULT = 'r20-cifar,plain20-cifar,r56-digits,plain56-digits'


def train_step_fn(model, tx):
  def step(state, x, y):
    params, stats, opt = state

    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': stats}, x, train=True,
                                    mutable=['batch_stats', 'intermediates'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    changes, opt = tx.update(grads, opt, params)
    return (optax.apply_updates(params, changes), updates['batch_stats'], opt), loss
  return step


class JaxCase:
  """One model at one batch size: compiled train and eval steps and their timings."""

  def __init__(self, name, config, shape, batch, variant=''):
    """variant: '' (the default routing), 'xla' (oneDNN off), 'xla-norms' (oneDNN's
    convs, XLA's batch norms), 'before' (oneDNN and the workarounds off)."""
    self.name, self.shape, self.batch = name, shape, batch
    self.label = f'{name} ({variant})' if variant else name
    model = arch.build(config)
    unrolled = arch.build({k: v for k, v in config.items() if k != 'scan_blocks'})
    self.params = arch.count_params(model, shape)['params']
    self.macs = arch.count_macs(unrolled, shape)  # count_macs sees a scanned body once
    rng = np.random.default_rng(0)
    self.x = jnp.asarray(rng.standard_normal((batch, *shape), np.float32))
    self.y = jnp.asarray(rng.integers(0, 10, batch))
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
    with layers.xla_cpu_workarounds(variant != 'before'), \
        layers.onednn_convs(None if variant in ('', 'xla-norms') else False), \
        layers.onednn_norms(False if variant else None):
      variables = jax.jit(model.init)(jax.random.key(0), self.x[:1])
      self.state = (variables['params'], variables.get('batch_stats', {}),
                    tx.init(variables['params']))
      t = time.perf_counter()
      # through arch.trace_cache, as in training: a repeated run skips the trace too
      self.train = trace_cache.compile('throughput', train_step_fn(model, tx),
                                       (self.state, self.x, self.y), repr(config),
                                       donate_argnums=(0,))
      self.compile_s = time.perf_counter() - t
      t = time.perf_counter()
      self.state, loss = self.train(self.state, self.x, self.y)
      jax.block_until_ready(loss)
      self.first_step_s = time.perf_counter() - t
      self.eval = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
          self.eval_vars(), self.x).compile()
    self.times = {'train': [], 'infer': []}

  def eval_vars(self):
    return {'params': self.state[0], 'batch_stats': self.state[1]}

  def run(self, steps):
    t = time.perf_counter()
    for _ in range(steps):
      self.state, loss = self.train(self.state, self.x, self.y)
    jax.block_until_ready(loss)
    self.times['train'].append((time.perf_counter() - t) / steps)
    v = self.eval_vars()
    t = time.perf_counter()
    for _ in range(steps):
      out = self.eval(v, self.x)
    jax.block_until_ready(out)
    self.times['infer'].append((time.perf_counter() - t) / steps)


class TorchCase:
  """The same CIFAR ResNet in PyTorch CPU eager, NCHW and channels-last, best kept.

  It runs in a child process (benchmarks/torch_resnet.py) with the environment
  this one started with: in this process oneDNN's OpenMP runtime and PyTorch's
  would slow each other (BENCHMARKS.md). Rounds still interleave with JAX's.
  """

  def __init__(self, name, config, shape, batch):
    self.name, self.label, self.batch = name, f'{name} (torch)', batch
    spec = dict(n=(config['depth'] - 2) // 6, in_channels=shape[-1], batch=batch, hw=shape[0],
                shortcut=config.get('shortcut', 'A') != 'none')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    self.child = subprocess.Popen(
        [sys.executable, os.path.join(root, 'benchmarks', 'torch_resnet.py'), json.dumps(spec)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=START_ENV)
    if self.child.stdout.readline().strip() != 'ready':
      raise RuntimeError(f'{self.label}: the PyTorch child failed (is torch installed? '
                         'pip install -r requirements-bench.txt)')
    self.times = {'nchw': [], 'channels_last': []}

  def run(self, steps):
    self.child.stdin.write(f'{steps}\n')
    self.child.stdin.flush()
    for layout, seconds in json.loads(self.child.stdout.readline()).items():
      self.times[layout].append(seconds)

  def best(self):
    return min((float(np.median(v)), k) for k, v in self.times.items())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default=DEFAULT, help=f'comma-separated, of: {", ".join(MODELS)}')
  parser.add_argument('--batch-sizes', default='128')
  parser.add_argument('--rounds', type=int, default=5, help='interleaved timing rounds')
  parser.add_argument('--steps', type=int, default=3, help='steps per round (warm-up excluded)')
  parser.add_argument('--before', action='store_true', help='also time with the workarounds off')
  parser.add_argument('--xla', action='store_true', help='also time with oneDNN off')
  parser.add_argument('--xla-norms', action='store_true',
                      help="also time with oneDNN's convs but XLA's batch norms")
  parser.add_argument('--compare-torch', action='store_true')
  parser.add_argument('--csv', default='benchmarks/results.csv')
  args = parser.parse_args(argv)

  print(f'jax {jax.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, '
        f'affinity {sorted(os.sched_getaffinity(0))}, load average {os.getloadavg()}, oneDNN '
        f'{"on" if kernels.available() else "off"}, OpenMP '
        + ' '.join(f'{k}={os.environ.get(k, "unset")}'
                   for k in ('OMP_NUM_THREADS', 'OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')), flush=True)
  cases, torch_cases = [], []
  for name in args.models.split(','):
    if name not in MODELS:
      parser.error(f'unknown model {name!r}; choose from {", ".join(MODELS)}')
    config, shape = MODELS[name]
    for batch in map(int, args.batch_sizes.split(',')):
      variants = ([''] + ['xla-norms'] * args.xla_norms + ['xla'] * args.xla
                  + ['before'] * args.before)
      for variant in variants:
        case = JaxCase(name, config, shape, batch, variant)
        print(f'{case.label:28s} batch {batch}: compile {case.compile_s:6.1f} s, first step '
              f'{case.first_step_s:6.2f} s', flush=True)
        cases.append(case)
      if args.compare_torch and config['name'] == 'cifar_resnet':
        torch_cases.append(TorchCase(name, config, shape, batch))
  if args.rounds:  # untimed: the malloc heap grows to its steady size (BENCHMARKS.md, 8)
    for case in cases + torch_cases:
      case.run(args.steps)
      case.times = {k: [] for k in case.times}
  for r in range(args.rounds):
    for case in cases + torch_cases:
      case.run(args.steps)
    print(f'round {r + 1}/{args.rounds} done, load average {os.getloadavg()}', flush=True)

  rows = []
  for c in cases:
    row = dict(model=c.label, batch=c.batch, params=c.params, macs=c.macs,
               compile_s=round(c.compile_s, 2), first_step_s=round(c.first_step_s, 2))
    if c.times['train']:  # --rounds 0: compile figures only
      train_s, infer_s = np.median(c.times['train']), np.median(c.times['infer'])
      row.update(
          train_ms=round(1e3 * train_s, 1), train_img_s=round(c.batch / train_s, 1),
          train_gflop_s=round(6 * c.macs * c.batch / train_s / 1e9, 1),
          infer_ms=round(1e3 * infer_s, 1), infer_img_s=round(c.batch / infer_s, 1),
          infer_gflop_s=round(2 * c.macs * c.batch / infer_s / 1e9, 1))
    rows.append(row)
  for t in (t for t in torch_cases if any(t.times.values())):
    best, layout = t.best()
    rows.append(dict(model=f'{t.label} {layout}', batch=t.batch, train_ms=round(1e3 * best, 1),
                     train_img_s=round(t.batch / best, 1)))
  keys = list(dict.fromkeys(k for row in rows for k in row))
  if args.csv:
    os.makedirs(os.path.dirname(args.csv) or '.', exist_ok=True)
    with open(args.csv, 'w', newline='') as f:
      writer = csv.DictWriter(f, keys)
      writer.writeheader()
      writer.writerows(rows)
  print()
  print(' | '.join(keys))
  for row in rows:
    print(' | '.join(str(row.get(k, '')) for k in keys))
  print()
  for line in ratios(cases, torch_cases):
    print(line)
  print(f'load average at the end {os.getloadavg()}')


def ratios(cases, torch_cases):
  """The side-by-side ratios the targets are stated in."""
  train = {(c.label, c.batch): float(np.median(c.times['train'])) for c in cases
           if c.times['train']}
  out = []
  for (label, batch), t in train.items():
    name = label.split(' ')[0]
    suffix = label[len(name):]
    if name.startswith('r') and '-' in name:
      plain = f'plain{name[1:]}{suffix}'
      if (plain, batch) in train:
        out.append(f'residual overhead {label} / {plain}, batch {batch}: {t / train[(plain, batch)]:.2f}x')
    if suffix in (' (before)', ' (xla)', ' (xla-norms)') and (name, batch) in train:
      out.append(f'speed-up {name} vs{suffix}, batch {batch}: {t / train[(name, batch)]:.2f}x')
  for tc in torch_cases:
    if not any(tc.times.values()):
      continue
    best, layout = tc.best()
    if (tc.name, tc.batch) in train:
      out.append(f'train throughput JAX / PyTorch {tc.name} ({layout}), batch {tc.batch}: '
                 f'{best / train[(tc.name, tc.batch)]:.2f}x')
  return out


if __name__ == '__main__':
  main()
