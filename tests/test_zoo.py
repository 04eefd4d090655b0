"""VGG, Inception and depthwise-separable nets: exact counts, costs, block knobs, fwd+bwd.

Counts run under jax.eval_shape (nothing allocated). The forward+backward tests
compile one train-mode gradient per network; their parameters come from
`jax.eval_shape(model.init)` filled in numpy, because compiling the ~200
initializers of the bigger nets takes as long as compiling the gradient itself.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arch
from arch import inception, layers, separable
from experiments import zoo


@functools.lru_cache(maxsize=None)
def params_of(name, side, **knobs):
  return arch.count_params(arch.build(dict(name=name, **knobs)), (side, side, 3))


@functools.lru_cache(maxsize=None)
def macs_of(name, side, alpha=None):
  knobs = {} if alpha is None else dict(alpha=alpha)
  return arch.count_macs(arch.build(dict(name=name, **knobs)), (side, side, 3))


# name, input side, total (params + BN moving stats), trainable.
KERAS_COUNTS = [
    ('vgg16', 224, 138_357_544, 138_357_544),
    ('vgg19', 224, 143_667_240, 143_667_240),
    ('inception_v3', 299, 23_851_784, 23_817_352),
    ('xception', 299, 22_910_480, 22_855_952),
    ('mobilenet', 224, 4_253_864, 4_231_976),
    ('mobilenet_v2', 224, 3_538_984, 3_504_872),
    # Not a Keras net: Table 1 with conv/FC biases, no BN (see arch/inception.py).
    ('googlenet', 224, 6_998_552, 6_998_552),
]


@pytest.mark.parametrize('name,side,total,trainable', KERAS_COUNTS, ids=[c[0] for c in KERAS_COUNTS])
def test_exact_param_counts(name, side, total, trainable):
  counts = params_of(name, side)
  assert counts['total'] == total
  assert counts['params'] == trainable


@pytest.mark.parametrize('name,side,published', [
    ('mobilenet', 224, 569e6),   # MobileNet paper, Table 6
    ('vgg16', 224, 15.5e9),
    ('googlenet', 224, 1.5e9),
])
def test_macs_near_published(name, side, published):
  assert abs(macs_of(name, side) / published - 1) < 0.10


def macs(module, shape):
  return arch.count_macs(module, shape)


def test_separable_costs_one_over_n_plus_one_over_nine():
  m = n = 64
  shape = (16, 16, m)
  sep = macs(separable.SeparableConv(n, 3), shape)
  full = macs(layers.ConvUnit(n, 3), shape)
  assert sep == 16 * 16 * (9 * m + m * n)
  assert abs((sep / full) / (1 / n + 1 / 9) - 1) < 0.01


def test_naive_vs_reduced_inception():
  h = w = 28
  cin = 192
  shape = (h, w, cin)
  # GoogLeNet 3a: #1x1 64, #3x3 reduce 96, #3x3 128, #5x5 reduce 16, #5x5 32, pool proj 32.
  naive = macs(inception.NaiveInception(64, 128, 32), shape)
  reduced = macs(inception.InceptionV1(64, 96, 128, 16, 32, 32), shape)
  assert naive == h * w * cin * (64 + 9 * 128 + 25 * 32)
  assert reduced == h * w * (cin * (64 + 96 + 16 + 32) + 9 * 96 * 128 + 25 * 16 * 32)
  assert reduced < naive / 2  # 3a: 128M vs 303M multiply-adds
  # The naive module passes the pooled input through, so its width only grows.
  x = jnp.zeros((1, *shape))
  out_naive = jax.eval_shape(lambda: inception.NaiveInception(64, 128, 32).init_with_output(
      jax.random.key(0), x)[0])
  out_v1 = jax.eval_shape(lambda: inception.InceptionV1(64, 96, 128, 16, 32, 32).init_with_output(
      jax.random.key(0), x)[0])
  assert out_naive.shape[-1] == 64 + 128 + 32 + cin and out_v1.shape[-1] == 256


def test_two_3x3_cost_18_25_of_5x5():
  c = 32
  shape = (16, 16, c)
  full = macs(inception.SpatialConv(c, 5, 'none'), shape)
  stacked = macs(inception.SpatialConv(c, 5, 'stack3x3'), shape)
  assert stacked * 25 == full * 18
  # The same knob on GoogLeNet's module, at equal width (5x5 reduce == #5x5).
  plain = macs(inception.InceptionV1(16, 16, 16, c, c, 16), shape)
  factorized = macs(inception.InceptionV1(16, 16, 16, c, c, 16, factorize_5x5=True), shape)
  assert plain - factorized == full - stacked == 16 * 16 * 7 * c * c


@pytest.mark.parametrize('n', [3, 7])
def test_asymmetric_costs_2_over_n(n):
  shape = (17, 17, 48)
  full = macs(inception.SpatialConv(48, n, 'none'), shape)
  asym = macs(inception.SpatialConv(48, n, 'asymmetric'), shape)
  assert asym * n == full * 2


def test_inception_v3_knobs():
  base = params_of('inception_v3', 299)['params']
  assert params_of('inception_v3', 299, factorize_7x7=False)['params'] > base
  assert params_of('inception_v3', 299, factorize_5x5=True)['params'] < base


@pytest.mark.parametrize('alpha', [0.5, 0.75])
def test_mobilenet_cost_scales_as_alpha_squared(alpha):
  ratio = macs_of('mobilenet', 224, alpha) / macs_of('mobilenet', 224)
  assert abs(ratio / alpha**2 - 1) < 0.1


def test_mobilenet_v2_block_shapes():
  x = jnp.zeros((1, 8, 8, 16))

  def out_shape(block):
    out, _ = jax.eval_shape(lambda: block.init_with_output(jax.random.key(0), x))
    return out.shape

  assert out_shape(separable.InvertedResidual(16, 6, 1)) == (1, 8, 8, 16)
  assert out_shape(separable.InvertedResidual(24, 6, 2)) == (1, 4, 4, 24)
  # The expansion conv has t * C_in outputs; t == 1 has none.
  counts = arch.count_params(separable.InvertedResidual(16, 6, 1), (8, 8, 16))
  assert counts['params'] == (16 * 96 + 2 * 96) + (9 * 96 + 2 * 96) + (96 * 16 + 2 * 16)
  counts = arch.count_params(separable.InvertedResidual(16, 1, 1), (8, 8, 16))
  assert counts['params'] == (9 * 16 + 2 * 16) + (16 * 16 + 2 * 16)


def test_xception_mid_activation_adds_no_params():
  assert params_of('xception', 299, mid_act='elu') == params_of('xception', 299)


def test_summary_rows_are_blocks():
  rows, _ = arch.cost.summary_rows(arch.build(dict(name='mobilenet')), (224, 224, 3))
  assert [r['name'] for r in rows] == ['stem', *[f'block{i}' for i in range(1, 14)], 'head']


@pytest.mark.parametrize('kwargs,bad', [
    (dict(name='vgg16', num_classes=0), '0'),
    (dict(name='mobilenet', alpha=-1.0), '-1.0'),
    (dict(name='mobilenet_v2', dropout=1.5), '1.5'),
    (dict(name='xception', mid_act='tanh'), 'tanh'),
    (dict(name='googlenet', norm='layer'), 'layer'),
    (dict(name='inception_v3', min_input_size=-3), '-3'),
])
def test_builders_reject_bad_values(kwargs, bad):
  with pytest.raises(ValueError, match=bad):
    arch.build(kwargs)


@pytest.mark.parametrize('name', zoo.NAMES)
def test_zoo_configs_build(name):
  config = zoo.get_config(name)
  assert config.model.name == name and config.model.num_classes == 1000
  side = 299 if name in ('inception_v3', 'xception') else 224
  assert tuple(config.model.input_shape) == (side, side, 3)
  arch.build(config.model)  # every knob in the config is one the builder takes


def test_zoo_unknown_name_lists_valid_ones():
  with pytest.raises(ValueError, match='mobilenet_v2'):
    zoo.get_config('alexnet')


def numpy_variables(model, x):
  """Variables with `model.init`'s structure (via eval_shape), filled in numpy."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.RandomState(0)

  def fill(path, s):
    leaf = path[-1].key
    if leaf == 'kernel':
      return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(s.dtype)
    return (np.ones if leaf in ('scale', 'var') else np.zeros)(s.shape, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# 32x32x3 for every network, 8x8x1 for two (VGG is resized up to 32, MobileNet
# runs down to 1x1). InceptionV3 and Xception resize anything below 75/71, so
# one small input covers them.
FWD_BWD = [(n, (32, 32, 3)) for n in
           ('vgg16', 'vgg19', 'googlenet', 'inception_v3', 'xception', 'mobilenet', 'mobilenet_v2')]
FWD_BWD += [('vgg16', (8, 8, 1)), ('mobilenet', (8, 8, 1))]


@pytest.mark.parametrize('name,shape', FWD_BWD, ids=[f'{n}-{s[0]}x{s[1]}x{s[2]}' for n, s in FWD_BWD])
def test_forward_backward(name, shape):
  model = arch.build(dict(name=name, num_classes=10))
  x = jnp.asarray(np.random.RandomState(1).standard_normal((2, *shape)), jnp.float32)
  variables = numpy_variables(model, x)

  def loss(params):
    out, updates = model.apply({**variables, 'params': params}, x, train=True,
                               mutable=['batch_stats'])
    return jnp.mean(jax.nn.log_softmax(out)[:, 0]), (out, updates)

  grads, (out, updates) = jax.jit(jax.grad(loss, has_aux=True))(variables['params'])
  assert out.shape == (2, 10)
  grads = [np.asarray(g) for g in jax.tree_util.tree_leaves(grads)]
  assert all(np.isfinite(g).all() for g in grads)
  assert sum(float(np.abs(g).sum()) for g in grads) > 0
  assert jax.tree_util.tree_structure(updates.get('batch_stats', {})) == \
      jax.tree_util.tree_structure(variables.get('batch_stats', {}))
