"""A few seconds of deep metric learning: embed scikit-learn's bundled digits with a small MLP
trained by a triplet loss, and watch the loss fall.

Run:  python examples/quickstart.py
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn

from deepmetric import distances, losses


def main(steps: int = 100, seed: int = 0) -> None:
    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train = y < 6  # classes 6-9 stay unseen, for evaluation later

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    loss_fn = losses.TripletMarginLoss(margin=0.2, distance=distances.LpDistance())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    x_train, y_train = x[train], y[train]
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        batch = torch.randperm(len(x_train), generator=generator)[:128]
        loss = loss_fn(model(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % 10 == 0:
            print(f"step {step:3d}  triplet loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
