from __future__ import annotations

import random

import pytest
import torch

from brickwork.models.tiny import TINY_MODEL_TYPES, build_tiny_model, build_tiny_tokenizer

CAUSAL_TYPES = tuple(t for t in TINY_MODEL_TYPES if t != "bert")

_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "brick",
    "neuron",
    "expert",
    "router",
    "layer",
    "token",
    "model",
    "carve",
    "profile",
    "stream",
    "window",
    "heavy",
    "light",
    "river",
    "stone",
    "bread",
    "salt",
    "rain",
]


def synthetic_text(words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    paragraphs = []
    while words > 0:
        n = min(words, rng.randint(20, 60))
        paragraphs.append(" ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + ".")
        words -= n
    return "\n\n".join(paragraphs) + "\n"


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(synthetic_text(1500))
    return path


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """A fresh BRICKWORK_HOME so tests never see (or write) the user's cache."""
    home = tmp_path / "home"
    monkeypatch.setenv("BRICKWORK_HOME", str(home))
    return home


def tiny(model_type: str = "llama", seed: int = 0):
    return build_tiny_model(model_type, seed)


def carved_tiny(text_file, tokenizer, model_type: str = "llama", **config):
    """A tiny model carved as ``config`` says (random grouping and small calibration unless overridden)."""
    import brickwork as bw

    model = tiny(model_type).eval()
    options = dict(method="random", calib_tokens=512, router_samples=256, window=64) | config
    bw.carve_(model, bw.CarveConfig(**options), calib=str(text_file), tokenizer=tokenizer, progress=False)
    return model
