"""Run logging: JSONL events, TensorBoard and offline wandb files, the progress bar, the per-task table."""

import glob
import json
import os

from agcl_ds.config import load_config
from agcl_ds.runlog import RunLog

TASKS = ["dec", "rot2inc", "swap"]
MATRIX = [[0.9, 0.1, 0.0], [0.7, 0.85, 0.05]]  # after dec, after rot2inc
TABLE = """\
task 2/3 rot2inc: trained in 12.3 s, mean loss 0.4321
task       learned      now   change
dec          0.900    0.700   -0.200
rot2inc      0.850    0.850   +0.000  <- just learned
swap             -    0.050"""


def test_task_summary_table(tmp_path, capsys):
    log = RunLog(str(tmp_path), load_config("configs/demo_synthetic.yaml", ["logging.progress=false"]))
    text = log.task_summary("rot2inc", MATRIX, TASKS, 12.34, 0.43214)
    log.close()
    assert text == TABLE
    assert capsys.readouterr().out == TABLE + "\n"
    events = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert events[-1]["event"] == "task_summary" and events[-1]["task"] == "rot2inc"
    assert events[-1]["accuracies"] == dict(zip(TASKS, MATRIX[-1], strict=True))
    assert events[-1]["seconds"] == 12.34 and events[-1]["mean_loss"] == 0.43214


def test_jsonl_tensorboard_and_offline_wandb(tmp_path, monkeypatch):
    # conftest sets WANDB_MODE=disabled: the YAML's offline mode must win, and nothing leaves the machine
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config("configs/demo_synthetic.yaml",
                      ["logging.progress=false", "logging.wandb=true", "logging.tensorboard=true"])
    assert cfg.logging.wandb_mode == "offline"  # the default
    log = RunLog(str(tmp_path), cfg)
    log.event("train", task="dec", step=4, loss=1.5)
    log.scalars(4, loss=1.5, lr=1e-3)
    log.scalars(8, loss=1.25, lr=1e-3)
    log.task_summary("dec", MATRIX[:1], TASKS, 1.0, 1.375)
    log.close()
    events = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [e["event"] for e in events] == ["train", "task_summary"]
    assert events[0]["loss"] == 1.5 and isinstance(events[0]["time"], float)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(files[0])
    acc.Reload()
    assert [(s.step, s.value) for s in acc.Scalars("loss")] == [(4, 1.5), (8, 1.25)]
    assert [(s.step, round(s.value, 3)) for s in acc.Scalars("acc/dec")] == [(8, 0.9)]  # at the last step

    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1 and glob.glob(os.path.join(runs[0], "run-*.wandb"))


def test_progress_bar_shows_task_step_loss_and_eta(tmp_path, capsys):
    log = RunLog(str(tmp_path), load_config("configs/demo_synthetic.yaml", ["logging.jsonl=false"]))
    log.progress(3, "[seq] task 1/2 dec")
    for loss in (0.9, 0.8, 0.7):
        log.advance(loss=f"{loss:.4f}", lr="1.00e-03")
    log.close()
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("[seq] task 1/2 dec | step 3/3 |")
    assert "ETA" in last and "loss=0.7000" in last and "lr=1.00e-03" in last
    assert not (tmp_path / "log.jsonl").exists()


def test_only_rank_0_writes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("agcl_ds.runlog.is_main", lambda: False)
    log = RunLog(str(tmp_path / "r1"), load_config("configs/demo_synthetic.yaml", ["logging.tensorboard=true"]))
    log.event("train", loss=1.0)
    log.progress(2, "x")
    log.advance(loss="1")
    log.task_summary("dec", MATRIX[:1], TASKS, 1.0, None)
    log.close()
    assert not (tmp_path / "r1").exists()
    assert capsys.readouterr() == ("", "")
