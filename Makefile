# musicgen-finetune: every user-facing step is a target. `make help` lists them.
# Each target runs `make setup` first when needed (a fresh clone runs `make demo` or `make test` directly).

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

# The venv's bin first: its ffmpeg (when the system has none) and dora.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Never reach the Hugging Face hub (MUSICGEN_FT_ALLOW_HUB=1 to allow it).
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
ifdef OUTPUT
export MUSICGEN_FT_OUTPUT := $(abspath $(OUTPUT))
endif

# make train / manifests / doctor
MODEL ?=
NAME ?=
DATA ?=
T5 ?=
PRESET ?= finetune/musicgen_small
LORA ?=
FRESH ?=
PRIOR ?=
PRIOR_PROMPTS ?=
ARGS ?=
GPUS ?= 1
VALID ?= 0.2
SEGMENT ?= 30
SPLIT_SEED ?= 0
STRICT ?=
DESCRIBE ?= 1
TEMPO_RANGE ?=
AUGMENT ?=
AUGMENT_WEIGHT ?= 0.5
TEXT ?=
# make plan (SEGMENT: only when given; else NAME's dataset's or the preset's)
GPU_MEM ?=
GPU_NAME ?=
BATCHES ?=
# make grid
GRID ?=
# make eval / listen
BASE ?=
TUNED ?=
TUNED_PRIOR ?=
GENERAL ?=
CLAP ?=
REPORT ?=
PORT ?= 8000
# make board / runs
BOARD_PORT ?= 6006
JSON ?=
# make export / generate (XP: also make board)
XP ?=
OUT ?=
WHICH ?= best
ADAPTER ?=
PROMPTS ?=
# unset: the defaults of musicgen_finetune.generate.Sampling (duration 10 s, top-k 250 or all codes if fewer, top-p 0,
# temperature 1, CFG 3, batch 4), which the tools read
DURATION ?=
SEED ?= 0
TOP_K ?=
TOP_P ?=
TEMPERATURE ?=
CFG ?=
BATCH ?=
# make import-hf / export-hf
HF ?=
PAD_MODE ?=
BASE_HF ?=
# make demo
DEMO_MODEL ?= output/models/tiny-musicgen
DEMO_DATA ?= output/data/hiphop808
DEMO_NAME ?= hiphop808-demo
DEMO_GENERAL_DATA ?= output/data/chiptune
DEMO_GENERAL_NAME ?= chiptune-demo
DEMO_OUT ?= output/demo
# make test
PYTEST_ARGS ?=
# test processes (pytest-xdist): the suite is mostly tool subprocesses that start Python, torch and AudioCraft,
# so two share two cores well; 0 runs it in this process. Each test file runs whole in one process (loadfile), so
# a file's module fixtures (a trained base, a killed and resumed run) are made once, not once per process.
TEST_WORKERS ?= 2
# the longest files first (tests/conftest.py SLOWEST_FIRST), not xdist's most-tests-first; a test process that
# crashes ends the run, failed, rather than being replaced (its replacement may crash the same way, forever)
XDIST = -n $(TEST_WORKERS) $(if $(filter-out 0,$(TEST_WORKERS)),--dist loadfile --no-loadscope-reorder \
	--max-worker-restart 0)
# what make test runs: all but the `long` cases (the preset matrix, every kill point, two processes), which
# make test-all adds (pyproject.toml's markers)
TEST_SELECT ?= not long
ONLY ?=
# make bench
BENCH_ARGS ?=
# make mutate: module names of tests/mutation/scope.toml, comma-separated (default: all); RECORD=1 records the scores
MODULES ?=
RECORD ?=

# Every variable given on the command line must be one the goal reads (tools/check_make_vars.py), checked before
# anything runs: `make train ... EPOCH=2` would otherwise train the preset's epochs as a new experiment.
# Only the make a user typed: one started by a recipe (a test calling `make -n`) inherits its variables.
GIVEN_VARIABLES := $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v)))
ifeq ($(MAKELEVEL)$(if $(strip $(GIVEN_VARIABLES)),,none),0)
UNKNOWN_VARIABLE := $(shell python3 tools/check_make_vars.py --goals "$(MAKECMDGOALS)" $(GIVEN_VARIABLES))
ifneq ($(UNKNOWN_VARIABLE),)
$(error $(UNKNOWN_VARIABLE))
endif
endif

.PHONY: help setup demo test test-long test-all breaks mutate lint manifests plan train grid runs board eval listen export generate import-hf export-hf export-peft doctor bench smoke-full tiny-model demo-data \
	clean

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

setup:  ## .venv with the pinned stack, AudioCraft's source in audiocraft/, ffmpeg on PATH (seconds when done)
	@bash tools/setup.sh

# The demo's tools and the tiny model's codec training on one thread, as config/solver/finetune/cpu_tiny.yaml's runs:
# its matrices are small, and OpenMP threads on shared cores spin-wait (4.7x slower under load, one thread 1.35x
# slower idle).
demo tiny-model: export OMP_NUM_THREADS ?= 1
demo tiny-model: export MKL_NUM_THREADS ?= 1
demo: tiny-model  ## the whole job on the embedded tiny model and synthetic data, on the CPU: train, compare, listen
	@echo "== 1. a 'general' base: the random tiny model trained briefly on another style (chiptune)"
	$(PY) tools/manifests.py --data $(DEMO_GENERAL_DATA) --name $(DEMO_GENERAL_NAME) --model $(DEMO_MODEL) --segment 2 \
		--valid 0.25
	$(PY) tools/train.py --model $(DEMO_MODEL) --name $(DEMO_GENERAL_NAME) --preset finetune/cpu_tiny \
		--args="optim.epochs=12 $(ARGS)" --xp-file $(DEMO_OUT)/general.xp --fresh
	$(PY) tools/export.py --xp $$(cat $(DEMO_OUT)/general.xp) --out $(DEMO_OUT)/models/general
	@echo "== 2. fine-tune it on 808 beats: fully, with LoRA, and fully with prior preservation (PRIOR=1)"
	$(PY) tools/manifests.py --data $(DEMO_DATA) --name $(DEMO_NAME) --model $(DEMO_MODEL) --segment 2 --valid 0.25 \
		$(if $(AUGMENT),--augment "$(AUGMENT)" --augment-weight $(AUGMENT_WEIGHT))
	$(PY) tools/train.py --model $(DEMO_OUT)/models/general --name $(DEMO_NAME) --preset finetune/cpu_tiny \
		--args="$(ARGS)" --xp-file $(DEMO_OUT)/full.xp --fresh
	$(PY) tools/train.py --model $(DEMO_OUT)/models/general --name $(DEMO_NAME) --preset finetune/cpu_tiny_lora \
		--args="$(ARGS)" --xp-file $(DEMO_OUT)/lora.xp --fresh
	$(PY) tools/train.py --model $(DEMO_OUT)/models/general --name $(DEMO_NAME) --preset finetune/cpu_tiny --prior \
		--args="$(ARGS)" --xp-file $(DEMO_OUT)/prior.xp --fresh
	$(PY) tools/export.py --xp $$(cat $(DEMO_OUT)/full.xp) --out $(DEMO_OUT)/models/full
	$(PY) tools/export.py --xp $$(cat $(DEMO_OUT)/lora.xp) --out $(DEMO_OUT)/models/lora
	$(PY) tools/export.py --xp $$(cat $(DEMO_OUT)/prior.xp) --out $(DEMO_OUT)/models/prior
	@echo "== 3. compare base, full fine-tune, LoRA and prior preservation: style gained, ability kept, loss curves, players, blind A/B"
	$(PY) tools/eval.py --base $(DEMO_OUT)/models/general --tuned $(DEMO_OUT)/models/full \
		--adapter $(DEMO_OUT)/models/lora/adapters.safetensors --prior $(DEMO_OUT)/models/prior \
		--name $(DEMO_NAME) --general $(DEMO_GENERAL_NAME) \
		--prompts egs/hiphop808/prompts.txt --duration 2 --top-k 50 --out $(DEMO_OUT)/report
	@echo "Demo done: models in $(DEMO_OUT)/models/{general,full,lora,prior}; the comparison is" \
		"$(DEMO_OUT)/report/index.html (make listen REPORT=$(DEMO_OUT)/report for the blind A/B test)."
	@echo "Training curves and samples of every run: make board (TensorBoard); the runs' table: make runs."

test: setup lint  ## lint, then the test suite (real dora runs on a tiny model; under 10 minutes on 2 CPU cores)
	$(PY) -m pytest tests $(XDIST) -m "$(TEST_SELECT)" $(PYTEST_ARGS)

test-long: setup  ## only the long cases make test leaves out: every preset, every kill point, two processes
	$(PY) -m pytest tests $(XDIST) -m long $(PYTEST_ARGS)

test-all: test test-long smoke-full  ## make test, its long cases and make smoke-full (CI runs these, then make mutate and make breaks)

breaks: setup  ## [ONLY=<words>]: every known one-line break (tests/planted_breaks.toml) must fail make test
	$(PY) tests/planted_breaks.py --select "$(TEST_SELECT)" $(if $(ONLY),--only "$(ONLY)")

mutate: setup  ## [MODULES=config,prior,...] [RECORD=1]: mutation testing of the logic modules (mutmut); survivors by line, fails when a score drops
	$(PY) tools/mutate.py $(if $(MODULES),--modules "$(MODULES)") $(if $(filter 1 true yes,$(RECORD)),--record)

lint: setup  ## ruff: lint and format check (pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

manifests: setup  ## DATA=<folder> NAME=<dataset> [MODEL=] [SEGMENT=30] [VALID=0.2] [SPLIT_SEED=0] [TEXT=] [STRICT=1] [DESCRIBE=0] [TEMPO_RANGE=70-140] [AUGMENT=default] [FORCE=1]
	@test -n "$(DATA)" -a -n "$(NAME)" || { echo "usage: make manifests DATA=<folder> NAME=<dataset>"; exit 2; }
	$(PY) tools/manifests.py --data "$(DATA)" --name "$(NAME)" --segment $(SEGMENT) --valid $(VALID) --seed $(SPLIT_SEED) \
		$(if $(MODEL),--model "$(MODEL)") $(if $(TEXT),--text "$(TEXT)") $(if $(STRICT),--strict) \
		$(if $(filter 0,$(DESCRIBE)),--no-describe) $(if $(TEMPO_RANGE),--tempo-range "$(TEMPO_RANGE)") \
		$(if $(AUGMENT),--augment "$(AUGMENT)" --augment-weight $(AUGMENT_WEIGHT)) $(if $(filter-out 0,$(FORCE)),--force)

plan: setup  ## MODEL=<folder|musicgen-small|-medium|-large> [NAME=] [LORA=1] [PRESET=] [ARGS=] [GPU_MEM=] [BATCHES=] [SEGMENT=] [OUT=]: predicted GPU memory and time
	@test -n "$(MODEL)" || { echo "usage: make plan MODEL=<folder|musicgen-small|musicgen-medium|musicgen-large>"; exit 2; }
	$(PY) tools/plan.py --model "$(MODEL)" --preset "$(PRESET)" --args="$(ARGS)" $(if $(filter 1 true yes,$(LORA)),--lora) \
		$(if $(NAME),--name "$(NAME)") $(if $(GPU_MEM),--gpu-mem $(GPU_MEM)) $(if $(GPU_NAME),--gpu-name "$(GPU_NAME)") \
		$(if $(BATCHES),--batches $(BATCHES)) $(if $(filter command line environment,$(origin SEGMENT)),--segment $(SEGMENT)) \
		$(if $(OUT),--out "$(OUT)")

train: setup  ## MODEL=<musicgen folder> NAME=<dataset> [LORA=1] [T5=] [PRESET=] [ARGS='k=v ...'] [GPUS=N|all] [FRESH=1] [PRIOR=1] [PRIOR_PROMPTS=<file>] [GENERAL=<dataset>]
	@test -n "$(MODEL)" -a -n "$(NAME)" || { echo "usage: make train MODEL=<folder> NAME=<dataset> [ARGS='key=value ...']"; exit 2; }
	$(PY) tools/train.py --model "$(MODEL)" --name "$(NAME)" --preset "$(PRESET)$(if $(filter 1 true yes,$(LORA)),_lora)" --args="$(ARGS)" \
		$(if $(T5),--t5 "$(T5)") --gpus $(GPUS) $(if $(filter 1 true yes,$(FRESH)),--fresh) \
		$(if $(filter 1 true yes,$(PRIOR)),--prior) $(if $(PRIOR_PROMPTS),--prior-prompts "$(PRIOR_PROMPTS)") \
		$(if $(GENERAL),--general "$(GENERAL)")

grid: setup  ## GRID=<name> MODEL= NAME= [PRESET=] [GPUS=all]: a dora grid on this machine, then its table
	@test -n "$(GRID)" || { echo "usage: make grid GRID=<full_vs_lora|lora_rank_lr|...> MODEL=<folder> NAME=<dataset>"; exit 2; }
	MODEL="$(MODEL)" NAME="$(NAME)" T5="$(T5)" PRESET="$(PRESET)" $(PY) tools/grid.py "$(GRID)" --gpus $(GPUS)

runs: setup  ## [JSON=1]: every experiment in output/xps: model, dataset, full/LoRA, epochs, best epoch and CE, state
	$(PY) tools/runs.py $(if $(filter 1 true yes,$(JSON)),--json)

board: setup  ## [XP=<signature>] [BOARD_PORT=6006]: TensorBoard over output/xps (or one run) on localhost: curves, samples
	$(PY) tools/board.py $(if $(XP),--xp "$(XP)") --port $(BOARD_PORT)

eval: setup  ## BASE= NAME= [TUNED=] [ADAPTER=<ours or a PEFT folder>] [TUNED_PRIOR=] [GENERAL=] [PROMPTS=] [SEED=0] [DURATION=10] [CLAP=]: report in output/reports/NAME/
	@test -n "$(BASE)" -a -n "$(NAME)" || { echo "usage: make eval BASE=<model> NAME=<dataset> TUNED=<model> [ADAPTER=<adapters.safetensors or PEFT folder>]"; exit 2; }
	$(PY) tools/eval.py --base "$(BASE)" --name "$(NAME)" $(if $(TUNED),--tuned "$(TUNED)") \
		$(if $(ADAPTER),--adapter "$(ADAPTER)") $(if $(TUNED_PRIOR),--prior "$(TUNED_PRIOR)") \
		$(if $(GENERAL),--general "$(GENERAL)") $(if $(PROMPTS),--prompts "$(PROMPTS)") $(if $(DURATION),--duration $(DURATION)) --seed $(SEED) \
		$(if $(TOP_K),--top-k $(TOP_K)) \
		$(if $(CLAP),--clap "$(CLAP)") $(if $(T5),--t5 "$(T5)") $(if $(OUT),--out "$(OUT)")

listen: setup  ## REPORT=output/reports/<name> [PORT=8000]: serve a report; its blind A/B choices go to choices.json
	@test -n "$(REPORT)" || { echo "usage: make listen REPORT=output/reports/<name>"; exit 2; }
	$(PY) tools/listen.py "$(REPORT)" --port $(PORT)

export: setup  ## XP=<signature or folder> [OUT=] [WHICH=best|last]: a model folder in the musicgen-small layout (LoRA: + adapters, peft/)
	@test -n "$(XP)" || { echo "usage: make export XP=<signature> [OUT=<folder>] [WHICH=best|last]"; exit 2; }
	$(PY) tools/export.py --xp "$(XP)" --which $(WHICH) $(if $(OUT),--out "$(OUT)")

generate: setup  ## MODEL= PROMPTS=<file or "several words"> or TEXT=<prompt> [ADAPTER=<ours or a PEFT folder>] [DURATION=10] [SEED=0,1] [OUT=] [TOP_K TOP_P TEMPERATURE CFG BATCH]
	@test -n "$(MODEL)" -a -n "$(PROMPTS)$(TEXT)" || { echo "usage: make generate MODEL=<folder> PROMPTS=<file or text> (or TEXT=<prompt>)"; exit 2; }
	$(PY) tools/generate.py --model "$(MODEL)" $(if $(TEXT),--text "$(TEXT)",--prompts "$(PROMPTS)") --seeds $(SEED) \
		$(if $(DURATION),--duration $(DURATION)) $(if $(TOP_K),--top-k $(TOP_K)) $(if $(TOP_P),--top-p $(TOP_P)) \
		$(if $(TEMPERATURE),--temperature $(TEMPERATURE)) $(if $(CFG),--cfg $(CFG)) $(if $(BATCH),--batch $(BATCH)) \
		$(if $(ADAPTER),--adapter "$(ADAPTER)") $(if $(OUT),--out "$(OUT)") $(if $(T5),--t5 "$(T5)")

import-hf: setup  ## HF=<transformers MusicGen folder> [OUT=] [PAD_MODE=constant]: AudioCraft's layout, trainable as MODEL=
	@test -n "$(HF)" || { echo "usage: make import-hf HF=<transformers folder> [OUT=<folder>] [PAD_MODE=constant]"; exit 2; }
	$(PY) tools/import_hf.py --hf "$(HF)" $(if $(OUT),--out "$(OUT)") $(if $(PAD_MODE),--pad-mode $(PAD_MODE))

export-hf: setup  ## MODEL=<AudioCraft model folder> [OUT=] [BASE_HF=]: the transformers format (from_pretrained)
	@test -n "$(MODEL)" || { echo "usage: make export-hf MODEL=<folder> [OUT=<folder>] [BASE_HF=<transformers folder>]"; exit 2; }
	$(PY) tools/export_hf.py --model "$(MODEL)" $(if $(OUT),--out "$(OUT)") $(if $(BASE_HF),--base-hf "$(BASE_HF)")

export-peft: setup  ## ADAPTER=<adapters.safetensors> [OUT=] [BASE_HF=]: a PEFT LoRA folder for transformers' MusicGen
	@test -n "$(ADAPTER)" || { echo "usage: make export-peft ADAPTER=<adapters.safetensors> [OUT=<folder>] [BASE_HF=<transformers folder>]"; exit 2; }
	$(PY) tools/export_peft.py --adapter "$(ADAPTER)" $(if $(OUT),--out "$(OUT)") $(if $(BASE_HF),--base-hf "$(BASE_HF)")

doctor: setup  ## [MODEL=] [T5=]: checks GPU, ffmpeg, model files, T5, disk, write access; says what to fix
	$(PY) tools/doctor.py $(if $(MODEL),--model "$(MODEL)") $(if $(T5),--t5 "$(T5)")

bench: setup  ## [QUICK=1] [BENCH_ARGS='--arch tiny --batches 1,2,4 ...' or '--full-size-only']: speed, memory, full-size checkpoint and 50-clip projection to output/bench/
	$(PY) tools/bench.py $(if $(QUICK),--quick) $(BENCH_ARGS)

smoke-full: setup  ## every stage at musicgen-small's size on the CPU, random weights, offline: time and peak memory per stage
	$(PY) tools/smoke_full.py

tiny-model: demo-data  ## the demo's tiny model in DEMO_MODEL, its codec trained on the demo's clips (kept when up to date)
	$(PY) tools/tiny_model.py --out $(DEMO_MODEL) --train-codec-on $(DEMO_DATA) $(DEMO_GENERAL_DATA)

demo-data: setup  ## synthesise the demo's datasets: 808 beats (DEMO_DATA) and chiptune (DEMO_GENERAL_DATA)
	$(PY) egs/hiphop808/make_data.py --style chiptune --seed 7 --out $(DEMO_GENERAL_DATA)
	$(PY) egs/hiphop808/make_data.py --out $(DEMO_DATA)

clean:  ## remove outputs and manifests (keeps .venv and audiocraft/)
	rm -rf output manifests
