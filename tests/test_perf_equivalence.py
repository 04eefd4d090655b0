"""The CPU speed-ups compute the same function: the conv routing against
`flax.linen.Conv`, the residual fusion barrier, and `scan_blocks` against the
unrolled net (same parameter count, same outputs and gradients once the
unrolled parameters are stacked into the scanned layout). No timing here:
benchmarks/ prints speeds, tests check correctness only."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arch
from arch import layers
from arch.resnet import scan_params

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def pure_xla():
  """These test the pure-XLA path; tests/test_onednn.py the oneDNN convolutions."""
  with layers.onednn_convs(False):
    yield


def conv_pair(features, kernel, strides, padding, x, use_bias=False):
  """(reference flax Conv, project Conv) with the same parameters."""
  ref = nn.Conv(features, kernel, strides, padding=padding, use_bias=use_bias)
  ours = layers.Conv(features, kernel, strides, padding=padding, use_bias=use_bias)
  variables = ref.init(jax.random.key(1), x)
  assert jax.tree.structure(variables) == jax.tree.structure(ours.init(jax.random.key(1), x))
  return ref, ours, variables


@pytest.mark.parametrize('shape,kernel,strides,padding', [
    ((3, 2, 2, 8), (3, 3), (1, 1), 'SAME'),      # image smaller than kernel: im2col
    ((3, 1, 1, 8), (3, 3), (1, 1), 'SAME'),
    ((3, 2, 3, 8), (3, 3), (2, 2), 'SAME'),      # strided, non-square
    ((3, 2, 2, 8), (3, 3), (1, 1), ((1, 1), (1, 1))),
    ((3, 2, 2, 8), (5, 5), (1, 1), 'SAME'),
    ((3, 8, 8, 8), (3, 3), (1, 1), 'SAME'),      # lax path
    ((3, 8, 8, 8), (1, 1), (2, 2), 'SAME'),
])
@pytest.mark.parametrize('use_bias', [False, True])
def test_conv_matches_flax_conv(shape, kernel, strides, padding, use_bias):
  x = jax.random.normal(jax.random.key(0), shape)
  ref, ours, variables = conv_pair(16, kernel, strides, padding, x, use_bias)
  np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x), **TOL)

  def grads(model):
    return jax.grad(lambda v, x: jnp.sum(jnp.sin(model.apply(v, x))), argnums=(0, 1))(variables, x)
  for a, b in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(ref))):
    np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize('shape,kernel,strides,pads', [
    ((2, 8, 8, 4), (3, 3), (1, 1), ((1, 1), (1, 1))),
    ((2, 8, 8, 4), (3, 3), (2, 2), ((0, 1), (0, 1))),   # SAME, stride 2
    ((2, 7, 6, 4), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ((2, 8, 8, 4), (1, 1), (2, 2), ((0, 0), (0, 0))),
    ((2, 5, 5, 4), (3, 3), (1, 1), ((0, 0), (0, 0))),
])
def test_canonical_conv_gradients_match_lax(shape, kernel, strides, pads):
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (*kernel, shape[-1], 6))
  lax_conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, strides, pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  ours = lambda x, w: layers.canonical_conv(x, w, strides, pads)
  np.testing.assert_allclose(ours(x, w), lax_conv(x, w), **TOL)
  loss = lambda f: jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))(x, w)
  for a, b in zip(loss(ours), loss(lax_conv)):
    np.testing.assert_allclose(a, b, **TOL)


def test_small_images_take_im2col_and_others_lax():
  w = jnp.zeros((3, 3, 8, 16))
  small = jax.jit(lambda x: layers.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))).lower(jnp.zeros((2, 2, 2, 8)))
  large = jax.jit(lambda x: layers.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))).lower(jnp.zeros((2, 4, 4, 8)))
  assert 'convolution' not in small.as_text() and 'dot_general' in small.as_text()
  assert 'convolution' in large.as_text()


@pytest.mark.parametrize('shape,features,strides,padding', [
    ((3, 7, 6, 8), 8, (2, 2), 'SAME'),
    ((3, 8, 8, 4), 8, (1, 1), ((1, 1), (0, 2))),  # depth multiplier 2
])
def test_depthwise_matches_flax_conv(shape, features, strides, padding):
  x = jax.random.normal(jax.random.key(0), shape)
  ref = nn.Conv(features, (3, 3), strides, padding=padding, feature_group_count=shape[-1])
  ours = layers.Conv(features, (3, 3), strides, padding=padding, feature_group_count=shape[-1])
  variables = ref.init(jax.random.key(1), x)

  def out_and_grads(model):  # jitted: op by op, this test took 10 s on the loaded machine
    return jax.jit(lambda v, x: (model.apply(v, x), jax.grad(
        lambda v, x: jnp.sum(jnp.sin(model.apply(v, x))), argnums=(0, 1))(v, x)))
  assert 'convolution' not in out_and_grads(ours).lower(variables, x).as_text()
  for a, b in zip(jax.tree.leaves(out_and_grads(ours)(variables, x)),
                  jax.tree.leaves(out_and_grads(ref)(variables, x))):
    np.testing.assert_allclose(a, b, **TOL)


def test_grouped_and_dilated_convs_fall_back_to_lax():
  x = jax.random.normal(jax.random.key(0), (2, 2, 2, 8))
  for kw in (dict(feature_group_count=4), dict(kernel_dilation=(2, 2))):
    ref, ours = nn.Conv(8, (3, 3), **kw), layers.Conv(8, (3, 3), **kw)
    v = ref.init(jax.random.key(1), x)
    np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), **TOL)


def test_materialize_is_exact():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16)) * 1e3
  x = x.at[0, 0, 0, :3].set(jnp.array([1e-40, 3e38, 0.0]))  # subnormal, huge, zero
  # XLA:CPU flushes subnormals to zero in its arithmetic (x + x included): the same here.
  flushed = np.where(np.abs(x) < np.finfo(np.float32).tiny, 0.0, x)
  np.testing.assert_array_equal(jax.jit(layers.materialize)(x), flushed)
  g = jax.grad(lambda x: jnp.sum(jnp.cos(layers.materialize(x))))(x)
  np.testing.assert_array_equal(g, jax.grad(lambda x: jnp.sum(jnp.cos(x)))(x))


@pytest.mark.parametrize('config', [
    dict(depth=8, shortcut='A'), dict(depth=8, shortcut='C', block='preact'),
    dict(depth=8, shortcut='none')])
def test_workarounds_do_not_change_the_network(config):
  """8x8 digits: the last stage is 2x2 (im2col) and every block has the barrier."""
  model = arch.build(dict(name='cifar_resnet', **config))
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  variables = model.init(jax.random.key(1), x)

  def run():
    def loss(params):
      out, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
      return jnp.sum(out ** 2), out
    return jax.jit(jax.grad(loss, has_aux=True))(variables['params'])

  grads, out = run()
  with layers.xla_cpu_workarounds(False):
    ref_grads, ref_out = run()
  np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('depth', [20, 1202])
@pytest.mark.parametrize('scan', [True, 'remat'])
def test_scan_blocks_same_param_count(depth, scan):
  # (arch.count_macs sees a scanned body once: count an unrolled twin's.)
  shape = (32, 32, 3)
  unrolled = arch.build(dict(name='cifar_resnet', depth=depth))
  scanned = arch.build(dict(name='cifar_resnet', depth=depth, scan_blocks=scan))
  assert arch.count_params(scanned, shape) == arch.count_params(unrolled, shape)


@pytest.mark.parametrize('block,shortcut,scan', [
    ('basic', 'A', True), ('basic', 'none', True), ('preact', 'B', True), ('basic', 'A', 'remat')])
def test_scan_blocks_same_function(block, shortcut, scan):
  config = dict(name='cifar_resnet', depth=20, block=block, shortcut=shortcut)
  unrolled = arch.build(config)
  scanned = arch.build(dict(config, scan_blocks=scan))
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  variables = unrolled.init(jax.random.key(1), x)
  mapped = {k: scan_params(v, 3) for k, v in variables.items()}
  assert jax.tree.structure(mapped) == jax.tree.structure(scanned.init(jax.random.key(1), x))

  def run(model, v):
    def loss(params):
      out, updates = model.apply({**v, 'params': params}, x, train=True, mutable=['batch_stats'])
      return jnp.sum(out ** 2), (out, updates['batch_stats'])
    grads, (out, stats) = jax.jit(jax.grad(loss, has_aux=True))(v['params'])
    return out, grads, stats, jax.jit(lambda v: model.apply(v, x))(v)

  out, grads, stats, evaluated = run(unrolled, variables)
  s_out, s_grads, s_stats, s_evaluated = run(scanned, mapped)
  np.testing.assert_allclose(s_out, out, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(s_evaluated, evaluated, rtol=1e-4, atol=1e-5)
  for got, want in ((s_grads, scan_params(grads, 3)), (s_stats, scan_params(stats, 3))):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_scan_blocks_bad_value_is_a_clear_error():
  with pytest.raises(ValueError, match='scan_blocks'):
    arch.build(dict(name='cifar_resnet', depth=20, scan_blocks='yes'))
