"""Per-block diagnostics for the ResNet paper's two arguments, logged at eval steps.

- Gradient norm per block: shortcuts should carry gradient to early blocks
  directly, so a plain-56's early blocks see far smaller gradients than ResNet-56's.
- Residual-branch ratio ||F(x)|| / ||x|| per block, sown by the residual blocks:
  residual blocks should learn to keep F(x) small relative to the identity.

Both come out of the training step itself (its gradients, and the blocks'
sown ratios in train mode), so they cost a few reductions and no extra compile.
"""
import re

import optax


def block_stats(grads, intermediates):
  """{block: {'grad_norm', 'branch_ratio'?}} for the top-level modules named *block*."""
  stats = {name: dict(grad_norm=optax.tree.norm(sub)) for name, sub in grads.items()
           if 'block' in name}
  for name, sown in intermediates.items():
    if name in stats and 'branch_ratio' in sown:
      stats[name]['branch_ratio'] = sown['branch_ratio'][0]
  return stats


def network_order(name):
  """'stage1_block10' after 'stage1_block2' (pytrees sort keys as strings)."""
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def lines(step, stats):
  """diagnostics.jsonl lines, one per block, in network order."""
  return [dict(step=step, block=name, **{k: float(v) for k, v in stats[name].items()})
          for name in sorted(stats, key=network_order)]
