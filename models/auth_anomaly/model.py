"""The auth anomaly detector's torch definition: used by train.py and by the torch backend.

``build(n_columns)`` returns the untrained module; the trained weights and the
calibration constants are ``model.pt`` (a plain ``state_dict``, loaded with
``torch.load(weights_only=True)``). ``model.onnx`` is this module exported.

The module is an autoencoder plus its calibration, so the served graph maps
features straight to the score:

    e     = mean((decode(encode(x)) - x)^2)                 reconstruction error
    score = sigmoid(k * (ln(e + 1e-6) - ln(e_ref)))         in (0, 1); 0.5 at e = e_ref
"""

from __future__ import annotations

import torch

HIDDEN = (32, 6)   # encoder widths; the decoder mirrors them
EPS = 1e-6


class AuthAutoencoder(torch.nn.Module):
    def __init__(self, n_columns: int, hidden: tuple[int, ...] = HIDDEN):
        super().__init__()
        enc: list[torch.nn.Module] = []
        width = n_columns
        for h in hidden:
            enc += [torch.nn.Linear(width, h), torch.nn.ReLU()]
            width = h
        dec: list[torch.nn.Module] = []
        for h in tuple(reversed(hidden))[1:] + (n_columns,):
            dec += [torch.nn.Linear(width, h), torch.nn.ReLU()]
            width = h
        dec.pop()  # linear output layer
        self.encoder = torch.nn.Sequential(*enc)
        self.decoder = torch.nn.Sequential(*dec)
        # calibration (set by train.py from benign held-out errors)
        self.register_buffer("log_e_ref", torch.tensor(0.0))
        self.register_buffer("k", torch.tensor(1.0))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def error(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row reconstruction error (mean squared error over the columns)."""
        return torch.mean((self.reconstruct(x) - x) ** 2, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.k * (torch.log(self.error(x) + EPS) - self.log_e_ref))


def build(n_columns: int) -> torch.nn.Module:
    return AuthAutoencoder(n_columns)
