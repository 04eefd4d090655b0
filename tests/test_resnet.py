"""ResNet family: exact parameter counts, paper multiply-adds, shortcut semantics, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

import arch

CIFAR = (32, 32, 3)


def cifar(depth, shortcut='A', **kw):
  return arch.build(ConfigDict(dict(name='cifar_resnet', depth=depth, shortcut=shortcut, **kw)))


# He et al. 2015, Table 6; conv without bias, BN scale and bias, FC 64x10+10.
@pytest.mark.parametrize('depth,params', [
    (20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018), (110, 1_727_962),
    (1202, 19_421_274)])
def test_cifar_params_exact(depth, params):
  assert arch.count_params(cifar(depth), CIFAR)['params'] == params
  # Plain nets are the same layers without the additions: identical counts.
  assert arch.count_params(cifar(depth, 'none'), CIFAR)['params'] == params


def test_cifar_shortcut_b_and_c():
  assert arch.count_params(cifar(20, 'B'), CIFAR)['params'] == 272_474
  # C projects in every block: 9 blocks, 7 of them 1x1 convs at equal width, plus BN.
  c = arch.count_params(cifar(20, 'C'), CIFAR)['params']
  assert c == 269_722 + 3 * (16 * 16 + 32) + 16 * 32 + 64 + 2 * (32 * 32 + 64) + 32 * 64 + 128 \
      + 2 * (64 * 64 + 128)


@pytest.mark.parametrize('name,total', [('resnet50', 25_636_712), ('resnet50_v2', 25_613_800)])
def test_keras_resnet_totals(name, total):
  """Keras counts params plus BN moving mean and variance."""
  assert arch.count_params(arch.build(dict(name=name)), (224, 224, 3))['total'] == total


@pytest.mark.parametrize('name,shape,published', [
    ('resnet50', (224, 224, 3), 3.9e9),
    (20, CIFAR, 41e6),
    (56, CIFAR, 126e6)])
def test_macs_match_papers(name, shape, published):
  model = cifar(name) if isinstance(name, int) else arch.build(dict(name=name))
  assert abs(arch.count_macs(model, shape) / published - 1) < 0.10


def test_width_multiplier_scales_params():
  base = arch.count_params(cifar(20), CIFAR)['params']
  wide = arch.count_params(cifar(20, width=2.0), CIFAR)['params']
  assert 3.8 < wide / base < 4.1  # conv weights grow as width^2


@pytest.mark.parametrize('depth', [21, 7, 2, 20.0, '20'])
def test_bad_depth_is_a_clear_error(depth):
  with pytest.raises(ValueError, match='6n\\+2'):
    cifar(depth)


def test_bad_knobs_are_clear_errors():
  with pytest.raises(ValueError, match="unknown shortcut 'D'"):
    cifar(20, 'D')
  with pytest.raises(ValueError, match='width must be > 0'):
    cifar(20, width=0)
  with pytest.raises(ValueError, match="unknown model 'resnet21'.*cifar_resnet"):
    arch.build(dict(name='resnet21'))
  with pytest.raises(ValueError, match="does not take colour"):
    arch.build(dict(name='cifar_resnet', colour=1))


def test_shortcut_a_is_identity_plus_zero_padding():
  """With the residual branch's last BN scale at zero, an option-A block is relu(pad(x))."""
  block = arch.residual.BasicBlock(32, strides=2, shortcut='A')
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  variables = block.init(jax.random.key(1), x)
  params = jax.tree_util.tree_map(lambda p: p, variables['params'])
  params['conv2']['bn']['scale'] = jnp.zeros_like(params['conv2']['bn']['scale'])
  params['conv2']['bn']['bias'] = jnp.zeros_like(params['conv2']['bn']['bias'])
  y = block.apply({**variables, 'params': params}, x)
  expected = jnp.pad(jax.nn.relu(x[:, ::2, ::2]), ((0, 0), (0, 0), (0, 0), (0, 16)))
  np.testing.assert_allclose(y, expected, atol=1e-6)
  assert 'shortcut' not in params  # option A has no parameters


def test_plain_block_ignores_its_input_path():
  """shortcut='none' is a plain block: zeroing the branch zeroes the output."""
  block = arch.residual.BasicBlock(16, shortcut='none')
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  variables = block.init(jax.random.key(1), x)
  params = jax.tree_util.tree_map(jnp.zeros_like, variables['params'])
  assert float(jnp.abs(block.apply({**variables, 'params': params}, x)).max()) == 0.0


@pytest.mark.parametrize('config', [
    dict(name='cifar_resnet', depth=8, shortcut='A'),
    dict(name='cifar_resnet', depth=8, shortcut='none'),
    dict(name='cifar_resnet', depth=8, shortcut='C', block='preact', width=0.5),
    dict(name='resnet50', num_classes=10),
    dict(name='resnet50_v2', num_classes=10),
])
@pytest.mark.parametrize('shape', [(8, 8, 1), (32, 32, 3)])
def test_forward_backward_small_inputs(config, shape):
  if config['name'] != 'cifar_resnet' and shape == (32, 32, 3):
    pytest.skip('the ImageNet nets run once, at 8x8')
  check_forward_backward(arch.build(config), shape, config.get('num_classes', 10))


def check_forward_backward(model, shape, num_classes):
  x = jax.random.normal(jax.random.key(0), (2, *shape))
  variables = model.init(jax.random.key(1), x)

  def loss(params):
    logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                            mutable=['batch_stats'])
    return jnp.mean(logits ** 2), logits

  grads, logits = jax.grad(loss, has_aux=True)(variables['params'])
  assert logits.shape == (2, num_classes)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))


def test_scanned_net_costs_what_the_unrolled_one_does():
  unrolled, scanned = cifar(110), cifar(110, scan_blocks=True)
  assert arch.count_macs(scanned, CIFAR) == arch.count_macs(unrolled, CIFAR)
  assert arch.count_params(scanned, CIFAR) == arch.count_params(unrolled, CIFAR)
