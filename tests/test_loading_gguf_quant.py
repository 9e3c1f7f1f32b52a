"""Loading straight into int8 / int4 weights: each part is converted as soon as it is read
(the result equals loading fp32 and converting afterwards), and the load-size estimate knows
each codec's bytes."""
import pytest
import torch

from helpers import make_tiny_hf_llama, write_tiny_llama_gguf
from memlm.loading import estimate_load_bytes, load_model
from memlm.models.linear import set_weight_dtype


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    path = root / "tiny.gguf"
    write_tiny_llama_gguf(path, make_tiny_hf_llama(root / "hf", tie=True))
    return path


@pytest.mark.parametrize("weight_dtype, options", [("int8", {}), ("int4", {"group_size": 64}), ("bf16", {})])
def test_converting_on_load_equals_converting_after(gguf_path, weight_dtype, options):
    direct = load_model(gguf_path, weight_dtype=weight_dtype, **options)
    after = load_model(gguf_path)
    set_weight_dtype(after.model, weight_dtype, **options)
    assert direct.model.linear_method.name == weight_dtype and direct.model.cfg.tie_word_embeddings
    ids = torch.arange(1, 40).view(1, -1)
    with torch.inference_mode():
        a = direct.model.compute_logits(direct.model.forward_dense(ids)[0])
        b = after.model.compute_logits(after.model.forward_dense(ids)[0])
    assert torch.equal(a, b)
    assert direct.weight_bytes == after.model.weight_bytes()
    assert not any(p.dtype == torch.float32 and p.dim() == 2 for p in direct.model.parameters())


def test_every_part_is_converted_while_loading(gguf_path, monkeypatch):
    """Each decoder layer and the embedding are converted as soon as their tensors are in (the
    peak stays near the converted model), not all at the end."""
    from memlm.models.transformer import Transformer
    seen = []
    original = Transformer.process_weights_after_loading

    def record(self, done=frozenset()):
        seen.append((set(done), set(self.weight_parts())))
        original(self, done)
    monkeypatch.setattr(Transformer, "process_weights_after_loading", record)
    load_model(gguf_path, weight_dtype="int8")
    (done, parts), = seen
    assert done == parts == {"layers.0", "layers.1", "embed"}


@pytest.mark.parametrize("weight_dtype, options", [("int8", {}), ("int4", {"group_size": 32}),
                                                   ("int4", {"group_size": 128}), ("bf16", {})])
def test_the_load_estimate_knows_each_codec(gguf_path, weight_dtype, options):
    weights, largest = estimate_load_bytes(gguf_path, weight_dtype, **options)
    loaded = load_model(gguf_path, weight_dtype=weight_dtype, **options)
    held = loaded.weight_bytes
    if getattr(loaded.model.embed, "head_packed", None) is not None:   # bf16's tied-head copy:
        held -= loaded.model.embed.weight.numel() * 2                  # not in the estimate
    assert weights == held
    fp32_weights, fp32_largest = estimate_load_bytes(gguf_path)
    assert largest == fp32_largest and weights < 0.55 * fp32_weights


def test_info_shows_bytes_per_codec(gguf_path, capsys):
    from memlm.entrypoints.cli import main
    assert main(["info", "--model", str(gguf_path), "--weight-dtype", "int4", "--weight-group-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "by codec:" in out and "int4 g64" in out and "int8" in out and "fp32" in out
