"""Do the fast kernel paths and the reference path give the same model? Per carve of the speed benchmark:
greedy generation on both paths from several prompts, and the next-token distributions of both paths over
held-out windows (KL, top-1 agreement, perplexity on each).

Each layer's fast path matches the reference to float rounding (tests/test_kernels.py); this measures what the
rounding differences do over a whole model, where a near-tie in a top-k selection can flip. Carves that sum in
float64 (``accumulate``, the default for neuron-level carves) are also run with float32 sums, for comparison.
"""

from __future__ import annotations

import copy

import torch

import brickwork as bw
from brickwork.benchmarks.harness import Bench
from brickwork.benchmarks.speed import SpeedBenchConfig, _configs
from brickwork.bricks.module import BrickFFN
from brickwork.carving import calibrate
from brickwork.data.corpora import corpus_path
from brickwork.evaluation.perplexity import score_logprobs


def both_paths(fn):
    """fn() with the kernels, then on the reference path."""
    out = []
    for use in (True, False):
        BrickFFN.use_kernels = use
        try:
            with torch.no_grad():
                out.append(fn())
        finally:
            BrickFFN.use_kernels = True
    return out


def main() -> None:
    parser = BENCH.parser(__doc__, out="bench/results/path-agreement")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", default="lee-news")
    parser.add_argument("--data", default="botchan")
    parser.add_argument("--windows", type=int, default=2, help="512-token held-out windows")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.replot is not None:
        return BENCH.replot(args.out)
    results = BENCH.start(args)
    results["settings"]["tokens"] = 512 * args.windows

    torch.manual_seed(0)
    dense, tokenizer = bw.load_model(args.model)
    speed = SpeedBenchConfig(model=args.model)
    first = bw.find_ffns(dense)[0]
    calibration = calibrate(dense, tokenizer, speed.calib, bw.CarveConfig(calib_tokens=speed.calib_tokens))
    text = corpus_path(args.prompts).read_text()
    prompts = [
        tokenizer(text[s : s + 400], return_tensors="pt").input_ids[:, :32]
        for s in (0, 3000, 9000, 20000, 40000)
    ]
    held = tokenizer(corpus_path(args.data).read_text()[:100_000], return_tensors="pt").input_ids
    ids = held[:, : 512 * args.windows].reshape(args.windows, 512)
    rows = []
    runs = []
    for name, kwargs in _configs(speed, first.d_ff, first.read().d_model, first.is_gated).items():
        runs.append((name, kwargs))
        if bw.CarveConfig(**kwargs).resolved_accumulate() == "float64":
            runs.append((f"{name}, float32 sums", {**kwargs, "accumulate": "float32"}))
    for name, kwargs in runs:
        carved = copy.deepcopy(dense)
        bw.carve_(
            carved,
            bw.CarveConfig(calib_tokens=speed.calib_tokens, **kwargs),
            calibration=calibration,
            progress=False,
        )
        carved.eval()
        first_differences = []
        for p in prompts:
            fast, ref = both_paths(
                lambda p=p, carved=carved: carved.generate(
                    p,
                    attention_mask=torch.ones_like(p),
                    max_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )[0, p.shape[1] :]
            )
            differ = (fast != ref).nonzero()
            first_differences.append(None if len(differ) == 0 else int(differ[0]))
        fast_logits, ref_logits = both_paths(lambda carved=carved: carved(input_ids=ids).logits)
        fast, ref = fast_logits.log_softmax(-1), ref_logits.log_softmax(-1)

        def ppl(lp):
            return score_logprobs([(ids, lp[:, :-1], None)]).perplexity

        rows.append(
            {
                "name": name,
                "config": kwargs,
                "accumulate": bw.CarveConfig(**kwargs).resolved_accumulate(),
                "greedy_identical": sum(d is None for d in first_differences),
                "prompts": len(prompts),
                "first_differing_new_token": first_differences,
                "kl_reference_to_fast": float((ref.exp() * (ref - fast)).sum(-1).mean()),
                "top1_agreement": float((fast.argmax(-1) == ref.argmax(-1)).float().mean()),
                "perplexity_fast": ppl(fast),
                "perplexity_reference": ppl(ref),
                "logits_identical_positions": float((fast_logits == ref_logits).all(-1).float().mean()),
                "max_abs_logit_difference": float((fast_logits - ref_logits).abs().max()),
            }
        )
        print(rows[-1], flush=True)
    results["rows"] = rows
    print(BENCH.write(args.out, results))


def render(results: dict) -> str:
    s, rows = results["settings"], results["rows"]
    prompts = rows[0]["prompts"] if rows else 0
    lines = [
        f"# Fast kernel paths vs the reference path ({s['model']})",
        "",
        f"commit `{results['machine']['commit']}`, {results['machine']['date']}; greedy: {prompts} prompts of 32 "
        f"{s['prompts']} tokens, {s['new_tokens']} new tokens; distributions over {s['tokens']} {s['data']} "
        "tokens in 512-token windows.",
        "",
        "| carve | sums | greedy identical | first differing new token | KL(reference \\|\\| fast) | top-1 agreement | "
        "perplexity fast / reference | positions with identical logits | max abs logit difference |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['accumulate']} | {r['greedy_identical']} / {r['prompts']} | "
            f"{', '.join('-' if d is None else str(d) for d in r['first_differing_new_token'])} | "
            f"{r['kl_reference_to_fast']:.2e} | {r['top1_agreement']:.2%} | "
            f"{r['perplexity_fast']:.3f} / {r['perplexity_reference']:.3f} | "
            f"{r['logits_identical_positions']:.2%} | {r['max_abs_logit_difference']:.2e} |"
        )
    return "\n".join(lines)


BENCH = Bench("path_agreement", render)


if __name__ == "__main__":
    main()
