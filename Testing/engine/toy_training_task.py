"""A tiny regression task with a known answer, for the training harness tests.

y = x @ W_true + b_true + small noise, x ~ N(0, 1) in 4 dimensions, y in 2. The model is a linear layer,
or an MLP with dropout when model.hidden > 0 (so the resume test covers RNG use inside a step).

Data sharding: each step draws ONE global batch of schedule.batch_size samples from a generator that
depends only on (seed, step); rank r of world_size takes the r-th equal slice. A DDP run therefore
averages the gradients of the two halves of exactly the batch a single process sees whole, so its weights
must equal the single-process ones: that is what proves the gradients were all-reduced.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from ultrasound_ai.core.training import step_generator

IN_FEATURES, OUT_FEATURES = 4, 2
W_TRUE = torch.tensor([[1.5, -2.0], [0.5, 1.0], [-1.0, 0.25], [2.0, -0.5]])
B_TRUE = torch.tensor([0.3, -0.7])
NOISE = 0.01
VAL_SEED, VAL_SIZE = 12345, 256


def make_samples(generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, IN_FEATURES, generator=generator)
    y = x @ W_TRUE + B_TRUE + NOISE * torch.randn(n, OUT_FEATURES, generator=generator)
    return x, y


def validation_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(VAL_SEED)
    return make_samples(g, VAL_SIZE)


def mean_predictor_mse() -> float:
    """The validation MSE of the best constant predictor: what a model that learnt nothing reaches."""
    _, y = validation_data()
    return float(((y - y.mean(0)) ** 2).mean())


class ToyRegressionTask:
    def __init__(self):
        self.steps_drawn: list[int] = []  # which steps' batches this instance made (tests check resumes)

    def build_model(self, config) -> nn.Module:
        hidden = int(config.model.get("hidden", 0))
        if hidden <= 0:
            return nn.Linear(IN_FEATURES, OUT_FEATURES)
        return nn.Sequential(
            nn.Linear(IN_FEATURES, hidden),
            nn.Tanh(),
            nn.Dropout(float(config.model.get("dropout", 0.0))),
            nn.Linear(hidden, OUT_FEATURES),
        )

    def parameter_groups(self, model, config):
        return None

    def batches(self, config, rank, world_size, start_step):
        global_batch = config.schedule["batch_size"]
        if global_batch % world_size:
            raise ValueError(f"schedule.batch_size {global_batch} must divide among {world_size} processes")
        part = global_batch // world_size
        for step in itertools.count(start_step):
            self.steps_drawn.append(step)
            # rank 0's generator for every rank: one global batch, sliced per rank (see module docstring)
            x, y = make_samples(step_generator(config.seed, 0, step), global_batch)
            yield x[rank * part : (rank + 1) * part], y[rank * part : (rank + 1) * part]

    def training_step(self, model, batch, device):
        x, y = (t.to(device) for t in batch)
        pred = model(x)
        loss = nn.functional.mse_loss(pred, y)
        return {"loss": loss, "mae": (pred - y).abs().mean()}

    def validate(self, model, config, device):
        x, y = validation_data()
        pred = model(x.to(device)).cpu()
        return {"mse": float(((pred - y) ** 2).mean()), "mae": float((pred - y).abs().mean())}

    def card(self, config, metrics):
        return {
            "method": "toy",
            "configuration": {"in_features": IN_FEATURES, "out_features": OUT_FEATURES, **config.model},
            "input": {"features": IN_FEATURES, "normalisation": "none"},
            "training": {"data": "y = x W + b + noise, x ~ N(0, 1)", "validation_seed": VAL_SEED},
        }
