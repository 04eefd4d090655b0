"""The CIFAR ResNet (He et al. 2015) in PyTorch, for `throughput.py --compare-torch`:
the same layers as arch.resnet.CifarResNet (option A or plain), SGD with momentum."""
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
