"""Parameter counts, multiply-adds and a per-block summary, from the network itself.

Everything runs under `jax.eval_shape`, so counting VGG16's 138M weights
allocates nothing. Multiply-adds are counted per layer, the way the papers count
them: for each `nn.Conv` and `nn.Dense` call, output elements x kernel fan-in
(kh * kw * in_channels / groups, or in_features). Normalisation, activations,
pooling and additions are not counted; they are a few percent of the total and
none of the published figures include them.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _size(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def trace(model, input_shape):
  """Abstract forward pass on one example (eval mode).

  Returns (variables, calls): the variable shapes and, per module call in call
  order, a dict with path, type, output shape and multiply-adds. A net with
  `scan_blocks` is traced as its unrolled twin (the same function and
  parameter count): a scanned body is traced once, not once per block.
  """
  if getattr(model, 'scan_blocks', False):
    model = model.clone(scan_blocks=False)
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != '__call__':
      return out
    module = context.module
    macs = 0
    if isinstance(module, (nn.Conv, nn.Dense)):
      kernel = module.variables['params']['kernel']
      macs = int(np.prod(out.shape[1:])) * int(np.prod(kernel.shape[:-1]))
    shape = tuple(out.shape[1:]) if hasattr(out, 'shape') else None
    calls.append(dict(path=module.path, type=type(module).__name__, shape=shape, macs=macs))
    return out

  def init(rng):
    with nn.intercept_methods(interceptor):
      return model.init(rng, jnp.zeros((1, *input_shape), jnp.float32), train=False)

  variables = jax.eval_shape(init, jax.random.key(0))
  return variables, calls


def count_params(model, input_shape):
  """Returns {'params': trainable, 'batch_stats': BN moving stats, 'total': both}."""
  variables, _ = trace(model, input_shape)
  params = _size(variables.get('params', {}))
  stats = _size(variables.get('batch_stats', {}))
  return {'params': params, 'batch_stats': stats, 'total': params + stats}


def count_macs(model, input_shape):
  """Multiply-adds of one forward pass on one example."""
  _, calls = trace(model, input_shape)
  return sum(c['macs'] for c in calls)


def summary_rows(model, input_shape):
  """One row per top-level block: name, output shape, params, multiply-adds."""
  variables, calls = trace(model, input_shape)
  params = variables.get('params', {})
  rows = {}
  for call in calls:
    if not call['path']:
      continue
    name = call['path'][0]
    row = rows.setdefault(name, dict(name=name, type=None, shape=None, params=0, macs=0))
    row['macs'] += call['macs']
    if len(call['path']) == 1:  # the block's own call returns after its layers
      row['type'], row['shape'] = call['type'], call['shape']
  for row in rows.values():
    row['params'] = _size(params.get(row['name'], {}))
  return list(rows.values()), count_params(model, input_shape)


def format_summary(model, input_shape, title=''):
  """The table `launch.py summary` prints."""
  rows, counts = summary_rows(model, input_shape)
  lines = [f'{title}  input {tuple(input_shape)}',
           f'{"block":<28}{"type":<22}{"output":>18}{"params":>14}{"mult-adds":>16}']
  for r in rows:
    lines.append(f'{r["name"]:<28}{r["type"] or "":<22}{str(r["shape"]):>18}'
                 f'{r["params"]:>14,}{r["macs"]:>16,}')
  macs = sum(r['macs'] for r in rows)
  lines.append(f'{"total":<68}{counts["params"]:>14,}{macs:>16,}')
  lines.append(f'trainable params {counts["params"]:,} + BN moving stats {counts["batch_stats"]:,} '
               f'= {counts["total"]:,};  {macs / 1e6:,.1f}M mult-adds per example')
  return '\n'.join(lines)
