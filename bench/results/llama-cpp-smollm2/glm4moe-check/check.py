"""Quick exactness check: sigmoid carves exported to llama.cpp's glm4moe against brickwork's forward.

Run from the repository root: python bench/results/llama-cpp-smollm2/glm4moe-check/check.py SPEC [SPEC ...]
(SPEC as bench/carving_quality.py's --config).
"""

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, "bench")
import llama_cpp_serving as lcs  # noqa: E402
from carving_quality import parse_config  # noqa: E402

import brickwork as bw  # noqa: E402
from brickwork.data.sources import token_windows  # noqa: E402
from brickwork.io.export import export  # noqa: E402

lcpp = lcs.llama_cpp_dir(None)
os.environ["LLAMA_CPP_LIB_PATH"] = str(lcpp / "bin")
sys.path.insert(0, str(lcpp))
torch.set_num_threads(2)
model, tok = bw.load_model("smollm2-135m", progress=False)
windows = token_windows(tok, "botchan", 512, 2048)
work = Path(tempfile.mkdtemp())
for spec in sys.argv[1:]:
    cfg = bw.CarveConfig(calib_tokens=4096, router_samples=4096, **parse_config(spec))
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
