"""Quick exactness check: sigmoid carves exported to llama.cpp's glm4moe against brickwork's forward.

Run from the repository root: python bench/results/llama-cpp-smollm2/glm4moe-check/check.py SPEC [SPEC ...]
(SPEC a carve string, CarveConfig.from_string).
"""

import importlib.util
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

import brickwork as bw
from brickwork.benchmarks.harness import import_package
from brickwork.data.sources import token_windows
from brickwork.io.export import export

_spec = importlib.util.spec_from_file_location("llama_cpp_serving", "bench/llama_cpp_serving.py")
lcs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lcs)

lcpp = lcs.llama_cpp_dir(None)
os.environ["LLAMA_CPP_LIB_PATH"] = str(lcpp / "bin")
import_package(lcpp, "llama_cpp")
torch.set_num_threads(2)
model, tok = bw.load_model("smollm2-135m", progress=False)
windows = token_windows(tok, "botchan", 512, 2048)
work = Path(tempfile.mkdtemp())
for spec in sys.argv[1:]:
    cfg = replace(bw.CarveConfig.from_string(spec), calib_tokens=4096, router_samples=4096)
    bw.carve_(model, cfg, calib="wiki", tokenizer=tok, progress=False)
    out = work / "c.gguf"
    rep = export(model, out, "gguf", tok, validate_data="botchan", validate_tokens=1024)
    print(spec, "export validation (own reader)", rep.validation, flush=True)
    ref = lcs.brickwork_logprobs(model, windows)
    for kv in ("f32", "f16"):
        llm = lcs.open_llama(out, 512, 2, kv)
        print(spec, kv, lcs.compare(ref, lcs.llama_logprobs(llm, windows), windows), flush=True)
        del llm
    bw.uncarve_(model)
