"""arch/trace_cache.py: a program exported by one compile is reused by the next
with the same key, without tracing, and computes the same bits (custom calls,
donation and pytrees included); another key, architecture or argument shape is
traced afresh; an unreadable entry is traced again and rewritten."""
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import arch
from arch import trace_cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  monkeypatch.setattr(trace_cache, 'directory', lambda: str(tmp_path))
  return tmp_path


def step_fn(depth, traces):
  """A ResNet train step that counts its traces."""
  model = arch.build(dict(name='cifar_resnet', depth=depth, shortcut='A'))
  tx = optax.sgd(0.1, momentum=0.9)

  def step(state, x, y):
    traces.append(1)
    params, stats, opt = state

    def loss_fn(params):
      logits, new = model.apply({'params': params, 'batch_stats': stats}, x, train=True,
                                mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    changes, opt = tx.update(grads, opt, params)
    return (optax.apply_updates(params, changes), new['batch_stats'], opt), dict(loss=loss)

  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
  variables = model.init(jax.random.key(1), x)

  def fresh_state():  # new buffers: a compiled step may donate them
    return jax.tree.map(jnp.copy, (variables['params'], variables['batch_stats'],
                                   tx.init(variables['params'])))
  return step, fresh_state, x, jnp.arange(16) % 10


def test_second_compile_skips_the_trace_and_computes_the_same(cache_dir):
  traces = []
  step, fresh_state, x, y = step_fn(8, traces)
  want_state, want_metrics = jax.jit(step)(fresh_state(), x, y)
  assert len(traces) == 1

  first = trace_cache.compile('step', step, (fresh_state(), x, y), 'depth 8', donate_argnums=(0,))
  assert len(traces) == 2 and len(os.listdir(cache_dir)) == 1
  second = trace_cache.compile('step', step, (fresh_state(), x, y), 'depth 8', donate_argnums=(0,))
  assert len(traces) == 2  # loaded, not traced

  for compiled in (first, second):
    state = fresh_state()
    new_state, metrics = compiled(state, x, y)
    assert jax.tree.structure(new_state) == jax.tree.structure(want_state)
    for a, b in zip(jax.tree.leaves((new_state, metrics)), jax.tree.leaves((want_state, want_metrics))):
      np.testing.assert_array_equal(a, b)
    assert jax.tree.leaves(state)[0].is_deleted()  # the state was donated

  # Another key or another batch shape is another program.
  trace_cache.compile('step', step, (fresh_state(), x, y), 'depth 8, other', donate_argnums=(0,))
  trace_cache.compile('step', step, (fresh_state(), x[:8], y[:8]), 'depth 8', donate_argnums=(0,))
  assert len(traces) == 4 and len(os.listdir(cache_dir)) == 3


def test_unreadable_entry_is_traced_again(cache_dir, caplog):
  traces = []
  step, fresh_state, x, y = step_fn(8, traces)
  trace_cache.compile('step', step, (fresh_state(), x, y), 'k')
  (entry,) = os.listdir(cache_dir)
  with open(cache_dir / entry, 'wb') as f:
    f.write(b'not a program')
  again = trace_cache.compile('step', step, (fresh_state(), x, y), 'k')
  assert len(traces) == 2 and 'unreadable' in caplog.text
  _, metrics = again(fresh_state(), x, y)
  assert np.isfinite(metrics['loss'])
  trace_cache.compile('step', step, (fresh_state(), x, y), 'k')
  assert len(traces) == 2  # rewritten whole


def test_on_only_beside_a_compilation_cache_in_one_process():
  assert trace_cache._directory('/c', None, 1) == '/c/arch_traces'
  assert trace_cache._directory(None, None, 1) is None
  assert trace_cache._directory('/c', '0', 1) is None   # ARCH_TRACE_CACHE=0
  assert trace_cache._directory('/c', None, 2) is None  # multi-process: plain jit


def test_a_model_registered_outside_arch_is_part_of_the_key(tmp_path, monkeypatch):
  """Editing an experiment's own model changes the key; a builder without a
  source file (a notebook cell) gets a key no other process can share."""
  module = tmp_path / 'my_models.py'
  module.write_text('def my_net():\n  return None\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  my_models = importlib.import_module('my_models')
  monkeypatch.setitem(arch.registry._BUILDERS, 'my_net', my_models.my_net)
  before = trace_cache._models_digest()
  module.write_text('def my_net():\n  return 1\n')
  assert trace_cache._models_digest() != before
  first, second = eval('lambda: None'), eval('lambda: None')  # the same text, no file
  monkeypatch.setitem(arch.registry._BUILDERS, 'cell_net', first)
  digest = trace_cache._models_digest()
  monkeypatch.setitem(arch.registry._BUILDERS, 'cell_net', second)
  assert trace_cache._models_digest() != digest
