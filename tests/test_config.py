import json

import pytest

from agcl_ds.config import ConfigError, load_config, resolve_ds_config

ROOT_DS = "ds_configs/zero3.json"


def write(tmp_path, text, name="x.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_demo_config_loads():
    cfg = load_config("configs/demo_synthetic.yaml")
    assert cfg.model.from_config.arch == "llama"
    assert cfg.model.tokenizer == "byte"  # from_config models get the built-in tokenizer
    assert cfg.data.tasks == ["dec", "add3", "mul3", "neg"]
    assert cfg.run_dir() == "runs/demo_synthetic/seq"


def test_overrides_are_typed_and_nested():
    cfg = load_config("configs/demo_synthetic.yaml", ["training.lr=3e-4", "data.tasks=[dec, swap]", "method.name=agcl",
                                           "logging.progress=false"])
    assert cfg.training.lr == pytest.approx(3e-4)
    assert cfg.data.tasks == ["dec", "swap"]
    assert cfg.run_dir() == "runs/demo_synthetic/agcl"
    assert cfg.logging.progress is False


@pytest.mark.parametrize("text, message", [
    ("model: {from_config: {}}\ntraining: {lrr: 1}\n", "config.training.lrr: unknown key"),
    ("model: {from_config: {}}\ntraining: {steps_per_task: ten}\n",
     "config.training.steps_per_task: expected an integer"),
    ("model: {from_config: {}}\ntraining: {precision: fp8}\n", "config.training.precision: expected one of"),
    ("model: {from_config: {}}\nlogging: {progress: 1}\n", "config.logging.progress: expected true or false"),
    ("model: {from_config: {}}\ndata: {tasks: dec}\n", "config.data.tasks: expected a list"),
    ("model: {}\n", "set exactly one of model.path, model.gguf_package or model.from_config"),
    ("model: {from_config: {}}\ndata: {source: trace}\n", "data.path is required"),
    ("model: {from_config: {}}\ndata: {tasks: [dec, dec]}\n", "listed twice"),
    ("model: {from_config: {}}\ntraining: {micro_batch_size: 0}\n",
     "training.micro_batch_size: expected an integer >= 1"),
    ("model: {from_config: {}, train_top_layers: 0}\n", "model.train_top_layers: expected an integer >= 1 or null"),
    ("model: {from_config: {}}\ndata: {max_input_chars: 0}\n", "data.max_input_chars: expected an integer >= 1"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value)
    assert str(e.value).startswith(path)
    assert "\n" not in str(e.value)


def test_bad_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "model:\n  from_config: {\n  bad: [\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line \d+\)"):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope.yaml")


def test_bad_override():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config("configs/demo_synthetic.yaml", ["training.lr"])
    with pytest.raises(ConfigError, match="config.training.nope: unknown key"):
        load_config("configs/demo_synthetic.yaml", ["training.nope=1"])


def ds(**zero):
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
            "zero_optimization": {"stage": 3, **zero}}


def test_auto_fields_are_filled_from_the_yaml():
    cfg = load_config("configs/demo_synthetic.yaml", ["training.gradient_accumulation=2", "training.precision=bf16"])
    with open(ROOT_DS) as f:
        out = resolve_ds_config(json.load(f), cfg, world_size=4, path=ROOT_DS)
    assert out["train_micro_batch_size_per_gpu"] == cfg.training.micro_batch_size
    assert out["gradient_accumulation_steps"] == 2
    assert out["train_batch_size"] == cfg.training.micro_batch_size * 2 * 4
    assert out["optimizer"]["params"]["lr"] == cfg.training.lr
    assert out["bf16"]["enabled"] is True and out["fp16"]["enabled"] is False


def test_ds_conflict_is_an_error_not_an_override():
    cfg = load_config("configs/demo_synthetic.yaml")
    bad = ds()
    bad["train_micro_batch_size_per_gpu"] = 7
    with pytest.raises(ConfigError, match=r"x.json.train_micro_batch_size_per_gpu = 7 conflicts with "
                                          r"training.micro_batch_size = 32"):
        resolve_ds_config(bad, cfg, 2, path="x.json")
    bad = ds()
    bad["optimizer"]["params"]["lr"] = 0.5
    with pytest.raises(ConfigError, match="optimizer.params.lr = 0.5 conflicts"):
        resolve_ds_config(bad, cfg, 2, path="x.json")
    bad = ds()
    bad["bf16"] = {"enabled": True}
    with pytest.raises(ConfigError, match="bf16.enabled = True conflicts with training.precision"):
        resolve_ds_config(bad, cfg, 2, path="x.json")


def test_ds_agreeing_concrete_values_pass_and_leftover_auto_fails():
    cfg = load_config("configs/demo_synthetic.yaml")
    ok = ds()
    ok["train_micro_batch_size_per_gpu"] = cfg.training.micro_batch_size
    assert resolve_ds_config(ok, cfg, 2)["train_micro_batch_size_per_gpu"] == cfg.training.micro_batch_size
    left = ds(stage3_prefetch_bucket_size="auto")
    with pytest.raises(ConfigError, match="zero_optimization.stage3_prefetch_bucket_size is \"auto\""):
        resolve_ds_config(left, cfg, 2, path="x.json")
    sched = ds()
    sched["scheduler"] = {"type": "WarmupLR"}
    with pytest.raises(ConfigError, match="scheduler: not supported"):
        resolve_ds_config(sched, cfg, 2, path="x.json")


def test_shipped_ds_configs_resolve():
    cfg = load_config("configs/demo_synthetic.yaml")
    for name in ("zero0", "zero2", "zero3", "zero3_offload"):
        with open(f"ds_configs/{name}.json") as f:
            out = resolve_ds_config(json.load(f), cfg, 2, path=name)
        assert out["zero_optimization"]["stage"] == {"zero0": 0, "zero2": 2}.get(name, 3)
