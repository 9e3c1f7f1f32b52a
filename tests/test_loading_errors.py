"""Every bad input to a loader becomes a memlm error naming the problem; nothing is unpickled."""
import json
import pickle
import struct

import numpy as np
import pytest

from helpers import make_tiny_hf_llama, write_tiny_llama_gguf
from memlm.errors import MemlmError, ModelLoadError, UnsupportedModelError
from memlm.loading import load_gguf, load_hf_dir, load_model
from memlm.loading.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    hf = make_tiny_hf_llama(root / "hf")
    write_tiny_llama_gguf(root / "tiny.gguf", hf)
    return hf, root / "tiny.gguf"


class _Bomb:
    """Unpickling this calls pytest.fail: the loader must never do it."""

    def __reduce__(self):
        return (pytest.fail, ("a pickle checkpoint was unpickled",))


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    import torch

    def refuse(*a, **k):
        raise AssertionError("unpickling attempted")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelLoadError, match="smollm2-135m-instruct"):
        load_model("no-such-model")


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, np.random.default_rng(0).bytes(4096)],
                         ids=["empty", "zeros", "random"])
def test_not_a_gguf(tmp_path, content):
    path = tmp_path / "junk.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(str(path))


def test_random_bytes_after_header(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + np.random.default_rng(1).bytes(4096))
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_gguf(path)
    path.write_bytes(b"GGUF" + struct.pack("<I", 1) + bytes(64))
    with pytest.raises(UnsupportedModelError, match="GGUF version 1 is not supported"):
        load_gguf(path)


@pytest.mark.parametrize("fraction", [1 / 3, 0.9])
def test_truncated_gguf(tiny, tmp_path, fraction):
    data = tiny[1].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_gguf(path)


def test_unsupported_gguf_architecture(tiny, tmp_path):
    path = tmp_path / "mamba.gguf"
    write_tiny_llama_gguf(path, tiny[0], arch="mamba")
    with pytest.raises(UnsupportedModelError, match="'mamba' is not supported"):
        load_gguf(path)


def test_unsupported_tensor_type(tiny, tmp_path):
    import gguf

    path = tmp_path / "int.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    src = gguf.GGUFReader(tiny[1])
    w.add_block_count(2); w.add_embedding_length(64); w.add_feed_forward_length(128)
    w.add_head_count(4); w.add_head_count_kv(2); w.add_context_length(256)
    for name in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        value = src.fields[name].contents()
        w.add_string(name, value) if isinstance(value, str) else w.add_array(name, value)
    for t in src.tensors:
        data = np.asarray(t.data)
        if t.name == "blk.0.ffn_up.weight":
            data = np.zeros(data.shape, dtype=np.int8)         # an integer tensor as a weight
        w.add_tensor(t.name, data)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(UnsupportedModelError, match="I8"):
        load_gguf(path)


def test_quant_type_gguf_cannot_dequantize(tiny, monkeypatch):
    import gguf.quants

    def not_implemented(data, qtype):
        raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")
    monkeypatch.setattr(gguf.quants, "dequantize", not_implemented)
    with pytest.raises(UnsupportedModelError, match="F32.*cannot dequantize"):
        load_gguf(tiny[1])


def test_unsupported_hf_architecture(tiny, tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "hidden_size": 64}))
    with pytest.raises(UnsupportedModelError, match="'BertModel' is not supported"):
        load_model(str(d))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.ckpt"])
def test_pickle_checkpoints_are_refused(tmp_path, name):
    data = pickle.dumps(_Bomb())
    d = tmp_path / "pickled"
    d.mkdir()
    (d / name).write_bytes(data)
    with pytest.raises(ModelLoadError, match="pickle.*safe_serialization=True"):
        load_model(str(d / name))
    with pytest.raises(ModelLoadError, match="pickle.*safe_serialization=True"):
        load_model(str(d))                      # a dir with only a pickle checkpoint
    (d / "config.json").write_text((make_tiny_hf_llama(tmp_path / "x") / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="pickle.*safe_serialization=True"):
        load_hf_dir(d)                          # config.json but weights only as a pickle


def test_corrupt_safetensors(tiny, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((tiny[0] / f).read_bytes())
    (d / "model.safetensors").write_bytes((tiny[0] / "model.safetensors").read_bytes()[:500])
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        load_hf_dir(d)


def test_missing_tensor_is_reported(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "partial"
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((tiny[0] / f).read_bytes())
    state = load_file(str(tiny[0] / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="lacks tensors.*layers.1.mlp.up_proj.weight"):
        load_hf_dir(d)


def test_chat_template_missing(tiny):
    tok = Tokenizer.from_hf_dir(tiny[0])
    tok.chat_template = None
    with pytest.raises(MemlmError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_raise_exception_becomes_memlm_error(tiny):
    tok = Tokenizer.from_hf_dir(tiny[0])
    tok.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    with pytest.raises(MemlmError, match="no system role"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


def test_config_missing_key_and_file_inside_dir(tiny, tmp_path):
    d = tmp_path / "nokey"
    d.mkdir()
    cfg = json.loads((tiny[0] / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="lacks 'hidden_size'"):
        load_model(str(d))
    assert load_model(str(tiny[0] / "model.safetensors")).format == "hf"   # a file names its dir
