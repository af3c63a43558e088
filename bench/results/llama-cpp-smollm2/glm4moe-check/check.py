"""Quick exactness check: a sigmoid carve exported to llama.cpp's glm4moe vs brickwork's forward."""
import os, sys, tempfile, torch
from pathlib import Path
sys.path.insert(0, "bench")
import llama_cpp_serving as L
import brickwork as bw
from brickwork.data.sources import token_windows
from brickwork.bricks import calibrate
from brickwork.io.export import export
lcpp = L.llama_cpp_dir(None)
os.environ["LLAMA_CPP_LIB_PATH"] = str(lcpp / "bin"); sys.path.insert(0, str(lcpp))
torch.set_num_threads(2)
model, tok = bw.load_model("smollm2-135m", progress=False)
windows = token_windows(tok, "botchan", 512, 2048)
work = Path(tempfile.mkdtemp())
for spec in sys.argv[1:]:
    from carving_quality import parse_config
    cfg = bw.CarveConfig(calib_tokens=4096, router_samples=4096, **parse_config(spec))
    bw.carve_(model, cfg, calib="wiki", tokenizer=tok, progress=False)
    out = work / "c.gguf"
    rep = export(model, out, "gguf", tok, validate_data="botchan", validate_tokens=1024)
    print(spec, "export validation (own reader)", rep.validation, flush=True)
    ref = L.brickwork_logprobs(model, windows)
    for kv in ("f32", "f16"):
        llm = L.open_llama(out, 512, 2, kv)
        print(spec, kv, L.compare(ref, L.llama_logprobs(llm, windows), windows), flush=True)
        del llm
    bw.uncarve_(model)
