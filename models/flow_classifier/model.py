"""The flow classifier's torch definition: used by train.py and by the torch backend.

``build(n_columns)`` returns the untrained module; the trained weights are
``model.pt`` (a plain ``state_dict``, loaded with ``torch.load(weights_only=True)``).
The module maps a float32 feature batch ``[n, n_columns]`` (manifest column
order) to the attack probability ``[n]``; ``model.onnx`` is this module exported.
"""

from __future__ import annotations

import torch

HIDDEN = (64, 32)


class FlowScorer(torch.nn.Module):
    """MLP logit -> sigmoid: attack probability of one flow."""

    def __init__(self, n_columns: int, hidden: tuple[int, ...] = HIDDEN):
        super().__init__()
        layers: list[torch.nn.Module] = []
        width = n_columns
        for h in hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
            width = h
        layers += [torch.nn.Linear(width, 1)]
        self.body = torch.nn.Sequential(*layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(x)).squeeze(-1)


def build(n_columns: int) -> torch.nn.Module:
    return FlowScorer(n_columns)
