"""Per-block diagnostics for the ResNet paper's two arguments.

- Gradient norm per block: shortcuts should carry gradient to early blocks
  directly, so a plain-56's early blocks see far smaller gradients than ResNet-56's.
- Residual-branch ratio ||F(x)|| / ||x|| per block (sown by the residual blocks):
  residual blocks should learn to keep F(x) small relative to the identity.
"""
import jax
import jax.numpy as jnp


def block_grad_norms(grads):
  """{top-level module name: L2 norm of its gradient} for the blocks of a net."""
  return {name: float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(sub))))
          for name, sub in grads.items() if 'block' in name}


def branch_ratios(model, variables, x):
  """{block name: ||F(x)|| / ||x||} on the batch `x`, in eval mode."""
  _, state = model.apply(variables, x, train=False, mutable=['intermediates'])
  found = state.get('intermediates', {})
  return {name: float(sub['branch_ratio'][0]) for name, sub in found.items()
          if 'branch_ratio' in sub}
