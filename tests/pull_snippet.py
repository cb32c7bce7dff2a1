"""Run in an environment with torch and mlflow only: sample the champion both ways.

python pull_snippet.py models:/NAME@champion LATENT_DIM     (MLFLOW_TRACKING_URI set)
"""

import importlib.util
import sys

import mlflow
import numpy as np
import torch

model_uri, latent_dim = sys.argv[1], int(sys.argv[2])
print("stablegan importable:", importlib.util.find_spec("trainer") is not None)

# The README's snippet: a torch.export graph, no stablegan classes needed.
G = mlflow.pytorch.load_model(model_uri)
with torch.no_grad():
    x = G(torch.randn(8, latent_dim))
assert x.min() >= -1 and x.max() <= 1
print("pytorch:", tuple(x.shape), "in [-1, 1]")

y = mlflow.pyfunc.load_model(model_uri).predict(np.random.randn(8, latent_dim).astype(np.float32))
assert y.min() >= -1 and y.max() <= 1
print("pyfunc:", tuple(y.shape), "in [-1, 1]")
