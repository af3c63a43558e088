from __future__ import annotations

import hashlib
import http.server
import random
import threading
from pathlib import Path

import pytest
import torch

from brickwork.models.tiny import TINY_MODEL_TYPES, build_tiny_model, build_tiny_tokenizer

CAUSAL_TYPES = tuple(t for t in TINY_MODEL_TYPES if t != "bert")
EXAMPLE_ROUTER = Path(__file__).resolve().parents[1] / "docs" / "examples" / "weight_norm_router.py"


def pytest_configure(config):
    """Register the README's example router (one file, outside the package), so that every battery that iterates
    over the router registry runs it too."""
    import importlib.util
    import sys

    if "weight_norm_router" not in sys.modules:
        spec = importlib.util.spec_from_file_location("weight_norm_router", EXAMPLE_ROUTER)
        module = importlib.util.module_from_spec(spec)
        sys.modules["weight_norm_router"] = module
        spec.loader.exec_module(module)


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


@pytest.fixture
def tiny_dir(tmp_path, tokenizer):
    """A tiny random Llama saved as a Hugging Face model directory, with the test tokenizer."""
    path = tmp_path / "tiny-llama"
    build_tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny(model_type: str = "llama", seed: int = 0):
    return build_tiny_model(model_type, seed)


def carved_tiny(text_file, tokenizer, model_type: str = "llama", **config):
    """A tiny model carved as ``config`` says (random grouping and small calibration unless overridden)."""
    import brickwork as bw

    model = tiny(model_type).eval()
    options = dict(method="random", calib_tokens=512, router_samples=256, window=64) | config
    bw.carve_(model, bw.CarveConfig(**options), calib=str(text_file), tokenizer=tokenizer, progress=False)
    return model


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """A PEP 503 index on 127.0.0.1 serving ``root/<project>/index.html`` and files; yields ``root``."""
    root = tmp_path / "index"
    root.mkdir()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_address[1]}/simple")
    yield root
    server.shutdown()


def publish(root: Path, project: str, filename: str, data: bytes, fragment: str | None = None) -> str:
    """Put ``data`` on the local index as ``filename``; return its sha256."""
    digest = hashlib.sha256(data).hexdigest()
    (root / "files").mkdir(exist_ok=True)
    (root / "files" / filename).write_bytes(data)
    page = root / "simple" / project
    page.mkdir(parents=True, exist_ok=True)
    frag = digest if fragment is None else fragment
    (page / "index.html").write_text(
        f'<html><body><a href="../../files/{filename}#sha256={frag}">{filename}</a><br/></body></html>'
    )
    return digest


def cli_carved(tmp_path, tiny_dir, text_file) -> Path:
    """``brickwork carve`` of the tiny Llama (8 experts, 1 shared, top-4) into ``tmp_path / "carved"``."""
    from brickwork.cli.main import main as cli

    out = tmp_path / "carved"
    carve = (
        f"carve {tiny_dir} --calib {text_file} --experts 8 --shared 1 --active 4 --method random "
        f"--calib-tokens 512 --router-samples 256 --window 64 --out {out} -q"
    )
    assert cli(carve.split()) == 0
    return out


def bpe_tokenizer(text_file, vocab_size: int):
    """A small byte-level BPE tokenizer (GPT-2 style, as SmolLM and Qwen use) trained on the test text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False
    )
    bpe.train([str(text_file)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
