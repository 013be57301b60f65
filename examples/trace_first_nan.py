"""Name the first op that went non-finite in a model of your own.

A small attention model whose last query has nothing to attend to: its row of
scores is masked entirely, softmax of all -inf is 0/0, and NaN spreads from there.
Run it: python examples/trace_first_nan.py
"""
import torch
from torch import nn

import nanlab


class TinyAttention(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, mask):
        scores = self.query(x) @ self.key(x).T
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        return weights @ self.value(x)


torch.manual_seed(0)
model = TinyAttention()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
x = torch.randn(5, 4)
mask = torch.ones(5, 5, dtype=torch.bool)
mask[4] = False  # the last query may attend to nothing: a fully masked row

with nanlab.trace() as tr:  # forward, backward and the optimizer step, op by op
    loss = model(x, mask).pow(2).mean()
    loss.backward()
    optimizer.step()

print("loss:", loss.item())
print("first non-finite op:", tr.first.describe())
print("op:", tr.first.op, "| phase:", tr.first.phase, "| module:", tr.first.module, "| kind:", tr.first.kind)
