"""The vLLM side of bench/vllm_serving.py. Runs in vLLM's own virtual environment (scripts/setup_vllm.sh), never
in brickwork's: it imports vLLM and the standard library only.

    python bench/_vllm_worker.py job.json result.json

``job.json``: ``{"models": {name: folder}, "prompts": [[token ids]], "windows": [[token ids]], "new_tokens": N,
"rounds": R, "decode_tokens": D, "max_model_len": L, "threads": T}``. For each model, greedy continuations of the
prompts (stopping at the end-of-sequence token, as transformers' generate does) and, for each window, the log
probability of every actual next token with the rank-1 token at that position (vLLM's ``prompt_logprobs``, raw
logits, float32). Then batch-1 decode speed: for each of R rounds, every model in turn generates D tokens
(``ignore_eos``) and 1 token from the same prompt; decode tokens/s = (D - 1) / (t_D - t_1). All models stay loaded
so that the rounds interleave them. Everything is given and returned as token ids: no tokenization here.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time


def main() -> None:
    job_path, result_path = sys.argv[1], sys.argv[2]
    with open(job_path) as f:
        job = json.load(f)
    # one process, no engine core subprocess (needed for prompt logprobs timing and memory here)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    greedy = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"])
    scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    result: dict = {"vllm": vllm.__version__, "models": {}}
    engines = {}
    # MoE models first: vLLM sets up its parallel groups once per process, with the first model, and creates the
    # expert-parallel group only for a MoE model; Mixtral loaded after the dense parent then fails with "expert
    # parallel group is not initialized" (Qwen2-MoE does not ask for it), and loads fine first or alone.
    order = sorted(job["models"], key=lambda name: name == "dense")
    for name in order:
        folder = job["models"][name]
        entry: dict = {}
        result["models"][name] = entry
        started = time.perf_counter()
        try:
            llm = LLM(
                model=folder,
                tokenizer=folder,
                dtype="float32",
                enforce_eager=True,
                max_model_len=job["max_model_len"],
                seed=0,
                kv_cache_memory_bytes=256 << 20,  # the windows need ~100 MB; every model stays loaded
            )
        except Exception as error:  # a refusal is a result: record why
            entry["error"] = f"{type(error).__name__}: {error}"[-4000:]
            print(f"[vllm] {name}: load failed: {entry['error'][-500:]}", flush=True)
            gc.collect()
            continue
        entry["load_seconds"] = time.perf_counter() - started
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], greedy, use_tqdm=False
        )
        entry["greedy"] = [list(o.outputs[0].token_ids) for o in outputs]
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=w) for w in job["windows"]], scoring, use_tqdm=False
        )
        actual, top1 = [], []
        for window, output in zip(job["windows"], outputs, strict=True):
            rows = output.prompt_logprobs[1:]  # position 0 has no prediction
            actual.append([row[token].logprob for token, row in zip(window[1:], rows, strict=True)])
            top1.append([next(t for t, lp in row.items() if lp.rank == 1) for row in rows])
        entry["window_logprobs"], entry["window_top1"] = actual, top1
        print(f"[vllm] {name}: loaded in {entry['load_seconds']:.1f} s, scored", flush=True)
        engines[name] = llm
        dump(result, result_path)

    prompt = TokensPrompt(prompt_token_ids=job["prompts"][0])
    decode = SamplingParams(temperature=0.0, max_tokens=job["decode_tokens"], ignore_eos=True)
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    for llm in engines.values():  # warm-up (the greedy and scoring calls above already ran every path)
        llm.generate([prompt], first, use_tqdm=False)
    for _ in range(job["rounds"]):
        for name, llm in engines.items():
            started = time.perf_counter()
            llm.generate([prompt], first, use_tqdm=False)
            t_first = time.perf_counter() - started
            started = time.perf_counter()
            llm.generate([prompt], decode, use_tqdm=False)
            t_all = time.perf_counter() - started
            rate = (job["decode_tokens"] - 1) / max(t_all - t_first, 1e-9)
            result["models"][name].setdefault("decode_tokens_per_s", []).append(rate)
            result["models"][name].setdefault("first_token_seconds", []).append(t_first)
        print(
            "[vllm] round:",
            {
                n: round(e["decode_tokens_per_s"][-1], 1)
                for n, e in result["models"].items()
                if "decode_tokens_per_s" in e
            },
            flush=True,
        )
    result["complete"] = True
    dump(result, result_path)


def dump(result: dict, path: str) -> None:
    """Written after every model and every speed round, so that a run stopped midway keeps what it measured."""
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
