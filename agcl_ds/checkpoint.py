"""The resume contract: everything needed to continue a continual sequence, listed in one place.

A checkpoint is the folder `<run_dir>/checkpoints/<tag>/`, tag `t<task>-s<step>`, holding:

- model and optimizer shards (fp32 master, moments), per rank: DeepSpeed's `*_model_states.pt`
  and `*_optim_states.pt`, written by `engine.save_checkpoint` on every rank; the model states also
  carry the frozen parameters (ZeRO-2/3: their partitions), so base weights that changed while
  frozen (LoRA `per_task_merge` merges) come back too;
- method state (importance shards and R̄, Fisher, replay buffer, ...): whatever `Method.save`
  writes, every rank;
- RNG states (torch CPU and accelerator, Python): `rng/rank<r>.safetensors`, every rank;
- the loop position (task index, optimizer steps done in it), the score rows so far, the base
  row, the general-ability rows (`evaluation.general`), the config that shapes results, world
  size, ZeRO stage, method: `position.json`, rank 0;
- the sha256 of every file above: `manifest.json`, rank 0, written last.

The data order needs no state: it is a pure function of (seed, task, step) (`engine.BatchOrder`).

Saving is atomic: every rank writes into `.tmp-<tag>/`, the files are hashed, the folder is renamed
to `<tag>/`, and only then is the `latest` pointer replaced; the last `keep` checkpoints are kept.
Loading verifies the manifest first (each rank hashes a share of the files) and falls back to the
previous good checkpoint with a warning, so a truncated or altered file is never loaded.
DeepSpeed's own `.pt` files are unpickled by DeepSpeed; they are loaded only after their checksums
match the manifest that this package wrote.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from agcl_ds import distributed as D
from agcl_ds.config import ConfigError, ExperimentConfig, from_dict
from agcl_ds.fileio import sha256_file, write_json


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used, phrased for the user in one line."""


@dataclass
class Position:
    """Where the sequence stands: `step` optimizer steps of task `task` are done."""

    task: int
    step: int
    matrix: list[list[float]] = field(default_factory=list)
    base: list[float] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    zero_stage: int = 0
    method: str = ""
    general: list[list[float]] = field(default_factory=list)  # evaluation.general: before task 1, after each

    @property
    def tag(self) -> str:
        return f"t{self.task:03d}-s{self.step:07d}"


def _files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), folder)
            if rel != "manifest.json":
                out.append(rel)
    return sorted(out)


def _hash_share(folder: str, names: list[str]) -> dict[str, str]:
    """Hash this rank's share of the files; every rank gets the whole table."""
    mine = {n: sha256_file(os.path.join(folder, n)) for i, n in enumerate(names)
            if i % D.world_size() == D.rank() and os.path.isfile(os.path.join(folder, n))}
    return {k: v for p in D.all_gather_object(mine) for k, v in p.items()}


def _save_rng(folder: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.join(folder, "rng"), exist_ok=True)
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    py = json.dumps(random.getstate()).encode()
    state["python"] = torch.frombuffer(bytearray(py), dtype=torch.uint8)
    save_file(state, os.path.join(folder, "rng", f"rank{D.rank()}.safetensors"))


def _load_rng(folder: str, saved_world: int) -> None:
    """This rank's generators; a rank the checkpoint did not have (more ranks now) takes rank
    r mod saved-world's state (only dropout-like randomness uses it: the data order is stateless)."""
    from safetensors.torch import load_file

    path = os.path.join(folder, "rng", f"rank{D.rank() % max(1, saved_world)}.safetensors")
    state = load_file(path)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    py = json.loads(bytes(state["python"].tolist()).decode())
    random.setstate((py[0], tuple(py[1]), py[2]))


def save(root: str, engine, method, position: Position, keep: int) -> str:
    """Write one checkpoint atomically (collective: every rank calls it); return its folder."""
    tag = position.tag
    tmp_tag = f".tmp-{tag}"
    tmp = os.path.join(root, tmp_tag)
    if D.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(root, exist_ok=True)
    D.barrier()
    engine.save_checkpoint(root, tag=tmp_tag, save_latest=False)
    method.save(tmp)
    _save_rng(tmp)
    if D.is_main():
        write_json(os.path.join(tmp, "position.json"), position.__dict__)
    D.barrier()
    sums = _hash_share(tmp, _files(tmp))
    if D.is_main():
        write_json(os.path.join(tmp, "manifest.json"), {"files": sums})
        final = os.path.join(root, tag)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_json(os.path.join(root, "latest.json"), {"tag": tag})
        tags = sorted(t for t in os.listdir(root) if t.startswith("t") and os.path.isdir(os.path.join(root, t)))
        for old in tags[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    D.barrier()
    return os.path.join(root, tag)


def _verify(folder: str) -> str | None:
    """None when every file matches the manifest, else the reason (same answer on every rank)."""
    manifest = os.path.join(folder, "manifest.json")
    reason = None
    try:
        with open(manifest) as f:
            expected: dict[str, str] = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        reason = "manifest.json missing or unreadable"
        expected = {}
    if reason is None:
        missing = sorted(set(expected) - set(_files(folder)))
        if missing:
            reason = f"{missing[0]} is missing"
    if reason is None:
        actual = _hash_share(folder, sorted(expected))
        bad = sorted(n for n in expected if actual.get(n) != expected[n])
        if bad:
            reason = f"{bad[0]} does not match its checksum"
    return D.broadcast_object(reason)


def require_valid(folder: str) -> None:
    """Every file against the manifest before DeepSpeed unpickles any of it (collective under ranks)."""
    reason = _verify(folder)
    if reason is not None:
        raise CheckpointError(f"{folder}: unusable checkpoint ({reason})")


def candidates(root: str) -> list[str]:
    """Complete checkpoint folders, newest first (unfinished `.tmp-*` folders are ignored)."""
    if not os.path.isdir(root):
        return []
    tags = sorted((t for t in os.listdir(root) if t.startswith("t") and os.path.isdir(os.path.join(root, t))),
                  reverse=True)
    return [os.path.join(root, t) for t in tags]


def read_position(folder: str) -> Position:
    with open(os.path.join(folder, "position.json")) as f:
        return Position(**json.load(f))


def find_valid(root: str) -> tuple[str, Position] | None:
    """The newest checkpoint whose files all match their checksums; warns about each one skipped.

    When none is usable the one error names the newest's defect (no warnings before it: the
    user gets one line)."""
    found = candidates(root)
    skipped: list[tuple[str, str]] = []
    for folder in found:
        reason = _verify(folder)
        if reason is None:
            if D.is_main():
                for bad, why in skipped:
                    print(f"agcl: warning: checkpoint {bad} is unusable ({why}); trying the previous one",
                          file=sys.stderr, flush=True)
            return folder, read_position(folder)
        skipped.append((folder, reason))
    if found:
        newest, why = skipped[0]
        raise CheckpointError(f"{root}: no checkpoint passes its checksums (newest, {os.path.basename(newest)}: "
                              f"{why}); move the folder away to start over")
    return None


def universal_command(folder: str, out: str) -> str:
    """The DeepSpeed command that turns a ZeRO checkpoint into one any world size can load."""
    return f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {folder} --output_folder {out}"


def _to_universal(folder: str) -> str:
    """Convert `folder` into DeepSpeed's universal format (rank 0, once) beside it, in
    `<root>/.universal-<tag>/<tag>` (a dot name: never taken for a checkpoint); return that root.

    Universal checkpoints hold every parameter's fp32 master and Adam moments whole, so ZeRO can
    cut them for any number of ranks. The conversion runs DeepSpeed's own tool in a child process
    (it forks workers and prints progress); the folder goes away again after loading."""
    root, tag = os.path.split(folder)
    uroot = os.path.join(root, f".universal-{tag}")
    error = None
    if D.is_main():
        shutil.rmtree(uroot, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", folder,
               "--output_folder", os.path.join(uroot, tag), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            error = (f"{folder}: converting to DeepSpeed's universal format failed ({last}); run "
                     f"`{universal_command(folder, os.path.join(uroot, tag))}` to see why")
            shutil.rmtree(uroot, ignore_errors=True)
    error = D.broadcast_object(error)
    if error:
        raise CheckpointError(error)
    return uroot


def load(folder: str, engine, method) -> None:
    """Restore method, engine and RNG state from a verified checkpoint folder (collective).

    The method state goes first: it is small and checks which model it belongs to (the importance
    store's fingerprint), so a forced resume onto another model fails in one line before DeepSpeed
    reads gigabytes. A checkpoint written by another number of ranks is loaded through DeepSpeed's
    universal format (ZeRO-1/2/3: the optimizer partitions depend on the world size); the method
    state re-partitions itself (`ImportanceStore.load`)."""
    saved_world = read_position(folder).world_size
    try:
        method.load(folder)
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointError(f"{folder}: method state does not fit this run: {str(e).splitlines()[0]}") from None
    root, tag = os.path.split(folder)
    universal = saved_world != D.world_size() and engine.zero_optimization_stage() > 0
    if universal:
        if D.is_main():
            print(f"agcl: {folder} was saved by {saved_world} rank(s), this run has {D.world_size()}: loading it "
                  f"through DeepSpeed's universal checkpoint format", flush=True)
        root = _to_universal(folder)
        engine._config.load_universal_checkpoint = True  # read per call by engine.load_checkpoint
    try:
        path, _ = engine.load_checkpoint(root, tag=tag, load_lr_scheduler_states=False)
    except Exception as e:  # DeepSpeed raises a bare exception for a different data-parallel size
        if "world size" in str(e).lower():
            out = os.path.join(os.path.dirname(folder), f".universal-{tag}", tag)
            raise CheckpointError(f"{folder}: saved with another data-parallel world size "
                                  f"({str(e).splitlines()[0]}); resume with {saved_world} ranks, or convert it with "
                                  f"`{universal_command(folder, out)}` and load that") from None
        raise
    finally:
        if universal:
            engine._config.load_universal_checkpoint = False
            D.barrier()
            if D.is_main():
                shutil.rmtree(root, ignore_errors=True)
    if path is None:
        raise CheckpointError(f"{folder}: DeepSpeed could not load this checkpoint")
    _load_rng(folder, saved_world)


# --------------------------------------------------------------------------- finding one for a command


def resolve(path: str) -> tuple[str, Position]:
    """`<run_dir>/checkpoints/<tag>`, or `<run_dir>/checkpoints` or `<run_dir>` (then the tag in
    latest.json: the newest checkpoint)."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    latest = os.path.join(path, "latest.json")
    if os.path.isfile(latest):
        try:
            with open(latest) as f:
                path = os.path.join(path, json.load(f)["tag"])
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{latest}: unreadable; pass a checkpoint folder <run_dir>/checkpoints/<tag>") \
                from None
    if not os.path.isfile(os.path.join(path, "position.json")):
        raise CheckpointError(f"{path}: not a checkpoint folder (no position.json); expected "
                              f"<run_dir>/checkpoints/<tag>")
    try:
        return os.path.normpath(path), read_position(path)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}/position.json: unreadable ({str(e).splitlines()[0]})") from None


def run_dir_of(folder: str) -> str:
    """The run folder a checkpoint `<run_dir>/checkpoints/<tag>` belongs to."""
    return os.path.dirname(os.path.dirname(os.path.abspath(folder)))


def check_compatible(folder: str, pos: Position, cfg: ExperimentConfig, ds_config: dict[str, Any]) -> None:
    """The engine must be built like the one that saved the checkpoint: same model and ZeRO stage
    (another number of ranks is fine: checkpoint.load re-partitions). Checked before any rank starts."""
    saved = {k: v for k, v in pos.config.get("model", {}).items() if k != "pretrain"}
    now = {k: v for k, v in cfg.resume_view()["model"].items() if k != "pretrain"}
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            raise CheckpointError(f"{folder}: trained with model.{key} = {saved.get(key)!r}, the config has "
                                  f"{now.get(key)!r}")
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage != pos.zero_stage:
        raise CheckpointError(f"{folder}: saved under ZeRO stage {pos.zero_stage}, --ds has stage {stage}; use a "
                              f"DeepSpeed JSON with stage {pos.zero_stage}, or `agcl export` it and evaluate "
                              f"the exported folder")


def config_of(folder: str, pos: Position) -> ExperimentConfig:
    """The run's config as saved in position.json (everything that shapes the model)."""
    try:
        return from_dict(ExperimentConfig, pos.config, "config")
    except ConfigError as e:
        raise CheckpointError(f"{folder}/position.json: {e}") from None
