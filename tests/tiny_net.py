"A tiny deterministic embedding model shared by the extraction tests (in-process and in subprocesses)."
import torch
from torch import nn


class Net(nn.Module):
    "Conv -> pool -> linear: 8-d embeddings, the same weights in every process (seeded)"
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 8))

    def extract_feature(self, x): return self.body(x)
