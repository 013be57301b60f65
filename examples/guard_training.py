"""Guard a training loop: stop at the first non-finite step, with the model as it
was before that step, and the op that went first.

The third batch holds a NaN feature, as a data pipeline with a missing value would.
Run it: python examples/guard_training.py
"""
import torch
import torch.nn.functional as F
from torch import nn

import nanlab

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
batches = [(torch.randn(32, 3), torch.randn(32, 1)) for _ in range(5)]
batches[2][0][7, 1] = float("nan")


def step(x, y):
    """One training step. It takes its batch as arguments, so the guard can replay it."""
    optimizer.zero_grad()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


guarded = nanlab.guard(step, model, optimizer)
try:
    for x, y in batches:
        print(f"step {guarded.step}: loss {guarded(x, y).item():.4f}")
except nanlab.NonFiniteError as err:
    print(f"stopped: non-finite {err.quantity} at step {err.step}")
    print("first bad op:", err.event.describe())
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    print("parameters restored to before that step, all finite:", finite)
