"""oneDNN convolutions (arch/kernels, routed by arch/layers.py) compute what
`flax.linen.Conv` computes: outputs, input and kernel gradients, for the shapes
the nets have; bit for bit the same twice; and everything falls back to pure XLA
when they are off. tests/test_perf_equivalence.py covers that pure-XLA path.
The library is built by `make kernels` (`make test` does it): without it these
tests fail rather than skip, so a broken build cannot pass CI unnoticed."""
import logging
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arch
from arch import kernels, layers
from conftest import ROOT, clean_env

TARGET = 'onednn_conv_forward'


def lowered(f, *args):
  return jax.jit(f).lower(*args).as_text()


def assert_close(got, want, rtol=1e-5):
  """Elementwise within float tolerance of the largest value: sums of up to
  128 * 32 * 32 terms in another order."""
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.max(np.abs(want))))


@pytest.mark.parametrize('shape,kernel,strides,padding', [
    ((4, 8, 8, 16), (3, 3), (1, 1), 'SAME'),
    ((4, 8, 8, 16), (3, 3), (2, 2), 'SAME'),        # pads (0, 1)
    ((4, 2, 2, 64), (3, 3), (1, 1), 'SAME'),        # image smaller than the kernel
    ((1, 1, 1, 8), (3, 3), (1, 1), 'SAME'),
    ((2, 7, 6, 4), (3, 3), (2, 2), 'VALID'),
    ((2, 7, 6, 4), (3, 3), (2, 1), ((2, 0), (1, 3))),  # explicit, uneven
    ((4, 8, 8, 16), (1, 1), (2, 2), 'SAME'),        # option-B/C projection shortcut
    ((1, 32, 32, 3), (3, 3), (1, 1), 'SAME'),       # CIFAR stem, batch 1
    ((128, 32, 32, 16), (3, 3), (1, 1), 'SAME'),    # CIFAR stage 1, batch 128
])
def test_matches_flax_conv(shape, kernel, strides, padding):
  x = jax.random.normal(jax.random.key(0), shape)
  ref = nn.Conv(16, kernel, strides, padding=padding, use_bias=True)
  ours = layers.Conv(16, kernel, strides, padding=padding, use_bias=True)
  variables = ref.init(jax.random.key(1), x)
  variables = jax.tree.map(lambda v: v + 0.1, variables)  # a non-zero bias

  def grads(model):
    return jax.jit(jax.grad(lambda v, x: jnp.sum(jnp.sin(model.apply(v, x))), argnums=(0, 1)))(
        variables, x)

  with layers.onednn_convs(True):
    assert TARGET in lowered(ours.apply, variables, x)
    out, ours_grads = jax.jit(ours.apply)(variables, x), grads(ours)
  assert_close(out, ref.apply(variables, x))
  for a, b in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(grads(ref))):
    assert_close(a, b, rtol=1e-4)


class Norm(nn.Module):
  """`layers.batch_norm` in train mode: oneDNN's or nn.BatchNorm by `onednn_convs`."""
  relu: bool
  use_scale: bool

  @nn.compact
  def __call__(self, x):
    return layers.batch_norm(True, 'bn', self.use_scale, relu=self.relu)(x)


def away_from_zero(shape):
  """Per-channel samples with |x| in [0.5, 1.5] and a mean near 0: normalised,
  none is near the ReLU's kink, so the two implementations' masks cannot differ
  by a rounding."""
  magnitude = jax.random.uniform(jax.random.key(0), shape, minval=0.5, maxval=1.5)
  return jnp.where(jax.random.bernoulli(jax.random.key(1), 0.5, shape), magnitude, -magnitude)


@pytest.mark.parametrize('shape', [(16, 8, 8, 16), (128, 2, 2, 64), (4, 5, 7, 3)])
@pytest.mark.parametrize('relu', [True, False])
@pytest.mark.parametrize('use_scale', [True, False])
def test_batch_norm_matches_flax(shape, relu, use_scale):
  """The same variables, outputs, running statistics and gradients as
  nn.BatchNorm(use_fast_variance=False) (+ nn.relu)."""
  x = away_from_zero(shape)
  model = Norm(relu, use_scale)
  with layers.onednn_convs(False):
    variables = model.init(jax.random.key(2), x)
  with layers.onednn_convs(True):
    assert jax.tree.structure(model.init(jax.random.key(2), x)) == jax.tree.structure(variables)
  if use_scale:  # a scale other than the initial ones, positive so the ReLU mask stays put
    variables['params']['bn']['scale'] = 1.0 + jax.random.uniform(jax.random.key(3), shape[-1:])
  weights = jax.random.normal(jax.random.key(4), shape)

  def run(enabled):
    with layers.onednn_convs(enabled):
      def loss(params, x):
        y, stats = model.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
        return jnp.sum(jnp.sin(y) * weights), (y, stats)
      text = lowered(loss, variables['params'], x)
      (_, aux), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
          variables['params'], x)
    return text, aux, grads

  text, (y, stats), grads = run(True)
  want_text, (want_y, want_stats), want_grads = run(False)
  assert 'onednn_norm_forward' in text and 'onednn_norm_forward' not in want_text
  assert_close(y, want_y)
  if relu:
    assert np.all(np.asarray(y) >= 0)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(want_stats)):
    assert_close(a, b)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    assert_close(a, b, rtol=1e-4)


class Sum(nn.Module):
  """A residual block's sum: relu(batch_norm(x) + residual), and ||batch_norm(x)||."""

  @nn.compact
  def __call__(self, x, residual):
    return layers.batch_norm(True, 'bn', relu=True)(x, residual, with_norm=True)


@pytest.mark.parametrize('shape', [(16, 8, 8, 16), (4, 5, 7, 3)])
def test_batch_norm_add_relu_matches_flax(shape):
  """relu(norm(x) + residual), a residual block's sum, in one kernel: the same
  outputs, statistics and gradients (the residual's too) as nn.BatchNorm, + and
  nn.relu; its branch norm ||norm(x)|| (from the statistics) as jnp.linalg.norm's."""
  x = away_from_zero(shape)
  residual = 4.0 * jnp.roll(x, 1, axis=0)  # |residual| >= 2 > |norm(x)|: no sum near the kink
  weights = jax.random.normal(jax.random.key(4), shape)

  with layers.onednn_convs(False):
    variables = Sum().init(jax.random.key(2), x, residual)
  variables['params']['bn']['bias'] = jnp.linspace(-0.3, 0.3, shape[-1])

  def run(enabled):
    with layers.onednn_convs(enabled):
      def loss(params, x, residual):
        (y, branch_norm), stats = Sum().apply({**variables, 'params': params}, x, residual,
                                              mutable=['batch_stats'])
        return jnp.sum(jnp.sin(y) * weights), (y, branch_norm, stats)
      text = lowered(loss, variables['params'], x, residual)
      (_, aux), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
          variables['params'], x, residual)
    return text, aux, grads

  text, (y, branch_norm, stats), grads = run(True)
  want_text, (want_y, want_norm, want_stats), want_grads = run(False)
  assert 'onednn_norm_add_relu_forward' in text and 'onednn_norm' not in want_text
  assert_close(y, want_y)
  assert np.all(np.asarray(y) >= 0) and np.any(np.asarray(y) == 0)
  np.testing.assert_allclose(branch_norm, want_norm, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(want_stats)):
    assert_close(a, b)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    assert_close(a, b, rtol=1e-4)
  with pytest.raises(ValueError, match='before a ReLU'):
    kernels.batch_norm(x, jnp.ones(shape[-1]), jnp.zeros(shape[-1]), 1e-5, False, residual)


def test_fan_out_sums_gradients():
  """`fan_out` gives x twice; the two readers' gradients are summed by oneDNN."""
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))

  def loss(x):
    a, b = layers.fan_out(x, train=True)
    return jnp.sum(jnp.sin(a)) + jnp.sum(b * b)
  with layers.onednn_convs(True):
    assert 'onednn_add' in lowered(jax.grad(loss), x)
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(x), jnp.cos(x) + 2 * x, rtol=1e-6)
  with layers.onednn_convs(False):
    assert 'onednn_add' not in lowered(jax.grad(loss), x)


@pytest.mark.parametrize('block,shortcut,strides', [
    (arch.residual.BasicBlock, 'A', 1), (arch.residual.BasicBlock, 'A', 2),
    (arch.residual.BasicBlock, 'none', 1), (arch.residual.BottleneckBlock, 'B', 2)])
def test_residual_blocks_match_xla(block, shortcut, strides):
  """A residual block on oneDNN (its sum inside the norm kernel, its input's
  gradients summed by `fan_out`) computes what the pure-XLA block computes:
  outputs, running statistics, the sown branch ratio and every gradient."""
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 16))
  model = block(16, strides, shortcut)
  with layers.onednn_convs(False):
    variables = model.init(jax.random.key(1), x)

  def run(enabled):
    def loss(params, x):
      y, state = model.apply({**variables, 'params': params}, x, train=True,
                             mutable=['batch_stats', 'intermediates'])
      return jnp.sum(jnp.sin(y)), (y, state)
    step = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    with layers.onednn_convs(enabled):
      return lowered(step, variables['params'], x), jax.jit(step)(variables['params'], x)

  text, ((_, (y, state)), grads) = run(True)
  want_text, ((_, (want_y, want_state)), want_grads) = run(False)
  fused = shortcut != 'none'
  assert ('onednn_norm_add_relu_forward' in text) == fused and ('onednn_add' in text) == fused
  assert 'onednn' not in want_text
  assert_close(y, want_y, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want_state)):
    assert_close(a, b, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    assert_close(a, b, rtol=1e-3)


def test_batch_norm_routing():
  """ConvUnit's conv-BN-ReLU is one norm kernel in train mode; eval mode and pure
  XLA keep nn.BatchNorm."""
  unit = layers.ConvUnit(8)
  x = jnp.ones((2, 8, 8, 4))
  variables = unit.init(jax.random.key(0), x)
  # a new function each time: jit's trace cache does not see the switches
  train = lambda: lambda v, x: unit.apply(v, x, train=True, mutable=['batch_stats'])
  with layers.onednn_convs(True):
    assert 'onednn_norm_forward' in lowered(train(), variables, x)
    assert 'onednn_norm_forward' not in lowered(unit.apply, variables, x)
    with pytest.raises(ValueError, match='f32 NHWC'):
      unit.apply(jax.tree.map(lambda v: v.astype(jnp.bfloat16), variables),
                 x.astype(jnp.bfloat16), train=True, mutable=['batch_stats'])
    with layers.onednn_norms(False):
      assert 'onednn_norm_forward' not in lowered(train(), variables, x)
  with layers.onednn_convs(False):
    assert 'onednn_norm_forward' not in lowered(train(), variables, x)


def test_fusion_barrier():
  """`layers.materialize` on oneDNN is a custom call that aliases its input: the
  same values, gradients passed through, under jit, grad and vmap."""
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))
  loss = lambda x: jnp.sum(jnp.sin(layers.materialize(x * 2.0)))
  with layers.onednn_convs(True):
    assert 'fusion_barrier' in lowered(loss, x)
    np.testing.assert_array_equal(jax.jit(lambda x: layers.materialize(x * 2.0))(x), x * 2.0)
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(x), 2.0 * jnp.cos(2.0 * x), rtol=1e-6)
    np.testing.assert_array_equal(jax.jit(jax.vmap(layers.materialize))(x), x)
  with layers.onednn_convs(False):
    assert 'fusion_barrier' not in lowered(lambda x: layers.materialize(x * 2.0), x)


def test_bitwise_deterministic():
  """Kernel gradients sum over the batch across threads: the same bits every call,
  and from a second compilation (a resumed run's)."""
  x = jax.random.normal(jax.random.key(0), (128, 32, 32, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 16))
  loss = lambda x, w: jnp.sum(jnp.sin(kernels.conv(x, w, (1, 1), ((1, 1), (1, 1)))))
  first = jax.jit(jax.grad(loss, argnums=(0, 1)))
  second = jax.jit(jax.grad(lambda x, w: loss(x, w), argnums=(0, 1)))
  runs = [first(x, w), first(x, w), second(x, w)]
  for run in runs[1:]:
    for a, b in zip(run, runs[0]):
      np.testing.assert_array_equal(a, b)
  # The norm's statistics and its scale/shift gradients too.
  scale, bias = jnp.linspace(0.5, 1.5, 16), jnp.zeros(16)
  norm = lambda x, s, b: jnp.sum(jnp.sin(kernels.batch_norm(x, s, b, 1e-5, True)[0]))
  grad = jax.jit(jax.grad(norm, argnums=(0, 1, 2)))
  runs = [grad(x, scale, bias), grad(x, scale, bias)]
  for a, b in zip(*runs):
    np.testing.assert_array_equal(a, b)


def test_denormals_flush_to_zero_as_in_xla():
  """Denormal inputs count as zero in oneDNN's threads too, as in XLA:CPU (a guard:
  the same numbers, and no ~100x slow denormal arithmetic)."""
  x = jnp.asarray(np.full((128, 8, 8, 4), 1e-39, np.float32))  # a denormal, made by numpy
  w = jnp.ones((3, 3, 4, 8))
  pads = ((1, 1), (1, 1))
  ours = jax.jit(lambda x, w: kernels.conv(x, w, (1, 1), pads))(x, w)
  lax_out = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC')))(x, w)
  np.testing.assert_array_equal(ours, lax_out)
  assert not np.any(ours)


def test_scan_blocks_and_vmap():
  """Inside `nn.scan` bodies (custom calls in a while loop) and under `jax.vmap`
  (num_seeds: one call per replica), the same function as XLA's convs."""
  model = arch.build(dict(name='cifar_resnet', depth=14, scan_blocks=True))  # 1 scanned a stage
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  variables = model.init(jax.random.key(1), x)

  def grads():
    loss = lambda p: jnp.sum(model.apply({**variables, 'params': p}, x, train=True,
                                         mutable=['batch_stats'])[0] ** 2)
    text = lowered(jax.grad(loss), variables['params'])
    return jax.jit(jax.grad(loss))(variables['params']), text

  with layers.onednn_convs(False):
    want, _ = grads()
  with layers.onednn_convs(True):
    got, text = grads()
  assert 'stablehlo.while' in text and TARGET in text
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert_close(a, b, rtol=1e-4)

  w = jax.random.normal(jax.random.key(2), (3, 3, 3, 3, 8))  # 3 replicas' kernels
  conv = lambda w, f: f(x, w, (1, 1), ((1, 1), (1, 1)))
  lax_conv = lambda x, w, s, p: jax.lax.conv_general_dilated(
      x, w, s, p, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert_close(jax.jit(jax.vmap(lambda w: conv(w, kernels.conv)))(w),
               jax.vmap(lambda w: conv(w, lax_conv))(w))


def test_off_is_pure_xla():
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 8))
  conv = lambda x, w: layers.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  with layers.onednn_convs(False):
    text = lowered(conv, x, w)
  assert TARGET not in text and 'convolution' in text
  # Not routed even when on: grouped convs and other dtypes.
  with layers.onednn_convs(True):
    grouped = layers.Conv(8, (3, 3), feature_group_count=4)
    assert TARGET not in lowered(grouped.apply, grouped.init(jax.random.key(0), x), x)
    assert TARGET not in lowered(conv, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))


def test_missing_library_is_one_warning(caplog, tmp_path):
  with caplog.at_level(logging.WARNING):
    assert kernels.load(str(tmp_path / 'missing.so')) is False
  assert len(caplog.records) == 1 and 'pure XLA' in caplog.records[0].getMessage()
  assert kernels.available()  # the real library stays registered


def test_default_is_one_device_cpu():
  """On by default for one CPU device; off for meshes of several (see onednn_convs)."""
  assert layers._onednn_on() == (jax.device_count() == 1)
  code = 'import jax; from arch import layers; print(jax.device_count(), layers._onednn_on())'
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       env=clean_env(XLA_FLAGS='--xla_force_host_platform_device_count=2'))
  assert out.stdout.split() == ['2', 'False'], out.stderr
