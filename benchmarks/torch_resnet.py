"""The CIFAR ResNet (He et al. 2015) in PyTorch, for `throughput.py --compare-torch`:
the same layers as arch.resnet.CifarResNet (option A or plain), SGD with momentum.

Run as a script it is the timing child `throughput.py` starts: it builds the
net in both layouts, prints `ready`, then for each number of steps read from
stdin times that many steps of each layout and prints the seconds per step as
one JSON line. A process of its own, because oneDNN's OpenMP runtime (arch/
kernels) and PyTorch's slow each other 1.3-2.6x when they share one.
"""
import json
import sys
import time

import torch
import torch.nn as tnn
import torch.nn.functional as F


class Block(tnn.Module):
  def __init__(self, cin, cout, stride, shortcut):
    super().__init__()
    self.c1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.b1 = tnn.BatchNorm2d(cout)
    self.c2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.b2 = tnn.BatchNorm2d(cout)
    self.shortcut, self.stride, self.extra = shortcut, stride, cout - cin

  def forward(self, x):
    y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
    if self.shortcut:  # option A: subsample, zero-pad the new channels
      x = x[:, :, ::self.stride, ::self.stride]
      y = y + (F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x)
    return F.relu(y)


class CifarResNet(tnn.Module):
  def __init__(self, n, in_channels, shortcut=True, num_classes=10):
    super().__init__()
    self.stem = tnn.Sequential(tnn.Conv2d(in_channels, 16, 3, 1, 1, bias=False),
                               tnn.BatchNorm2d(16), tnn.ReLU())
    blocks, c = [], 16
    for stage, f in enumerate((16, 32, 64)):
      for i in range(n):
        blocks.append(Block(c, f, 2 if stage and not i else 1, shortcut))
        c = f
    self.blocks = tnn.Sequential(*blocks)
    self.head = tnn.Linear(64, num_classes)

  def forward(self, x):
    return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def train_step(net, x, y):
  opt = torch.optim.SGD(net.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)

  def step():
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    opt.step()
  return step


def serve(n, in_channels, shortcut, batch, hw):
  torch.manual_seed(0)
  steps = {}
  for layout in ('nchw', 'channels_last'):
    net = CifarResNet(n, in_channels, shortcut=shortcut)
    x = torch.randn(batch, in_channels, hw, hw)
    if layout == 'channels_last':
      net = net.to(memory_format=torch.channels_last)
      x = x.contiguous(memory_format=torch.channels_last)
    steps[layout] = train_step(net, x, torch.randint(0, 10, (batch,)))
    steps[layout]()  # warm-up
  print('ready', flush=True)
  for line in sys.stdin:
    times = {}
    for layout, step in steps.items():
      t = time.perf_counter()
      for _ in range(int(line)):
        step()
      times[layout] = (time.perf_counter() - t) / int(line)
    print(json.dumps(times), flush=True)


if __name__ == '__main__':
  serve(**json.loads(sys.argv[1]))
