"""Trainer: bit-identical resume, checkpoints the loader reads, HF export, the teacher cache."""
import numpy as np
import pytest
import torch

from memlm.config import ModelConfig
from memlm.errors import MemlmError
from memlm.models import Transformer
from memlm.training import checkpoint
from memlm.training.data import TextTokenizer, WindowSampler
from memlm.training.distill import DistillConfig, DistillObjective
from memlm.training.teacher_cache import CachedTeacherBatches, TeacherCache
from memlm.training.trainer import TrainConfig, Trainer

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=48, max_position_embeddings=64)


def _tokens(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    return (np.cumsum(rng.integers(1, 3, n)) % 64).astype(np.uint16)   # learnable pattern


def _trainer(out=None, schedule="adaptive", cfg=CFG, objective=None, batches=None):
    torch.manual_seed(0)
    model = Transformer(cfg)
    tcfg = TrainConfig(steps=6, batch_size=2, seq_len=16, accum=2, lr=1e-2, schedule=schedule, warmup=2,
                       eval_every=2, eval_tokens=64, plateau_patience=1)
    batches = batches or WindowSampler(_tokens(), 2, 16, seed=3)
    return Trainer(model, tcfg, batches, _tokens(500, 1), objective=objective, out_dir=out)


@pytest.mark.parametrize("schedule", ["adaptive", "cosine"])
def test_resume_is_bit_identical(tmp_path, schedule):
    straight = _trainer(schedule=schedule)
    straight.train()
    first = _trainer(tmp_path / "ck", schedule=schedule)
    first.train(3)
    assert first.step == 3 and (tmp_path / "ck" / "train_state" / "state.json").exists()
    resumed = _trainer(tmp_path / "ck", schedule=schedule)
    resumed.resume(tmp_path / "ck")
    resumed.train()
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert straight.schedule.state_dict() == resumed.schedule.state_dict()
    assert [h["val_loss"] for h in straight.result.history] == [h["val_loss"] for h in resumed.result.history]


def test_training_lowers_validation_loss():
    t = _trainer()
    before = t.evaluate()
    t.train()
    assert t.result.history[-1]["val_loss"] < before


def test_resume_refuses_other_architecture(tmp_path):
    t = _trainer(tmp_path / "ck")
    t.train(1)
    other = _trainer(cfg=CFG.replace(hidden_size=48, intermediate_size=64))
    with pytest.raises(MemlmError, match="different architecture"):
        other.resume(tmp_path / "ck")
    with pytest.raises(MemlmError, match="not a resumable checkpoint"):
        checkpoint.load_train_state(tmp_path, optimizer=t.optimizer)


def _tok():
    return TextTokenizer.train(["to be or not to be, that is the question " * 20], vocab_size=280)


def test_checkpoint_loads_with_memlm_loader(tmp_path):
    loading = pytest.importorskip("memlm.loading")
    tok = _tok()
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
                      mixers=("attention", "recurrent"), layer_order=(0, 1, 1), eos_token_ids=tok.eos_token_ids)
    torch.manual_seed(0)
    model = Transformer(cfg)
    checkpoint.save_model(model, tmp_path / "m", tok)
    lm = loading.load_model(tmp_path / "m")
    assert lm.config == cfg and lm.tokenizer.encode("to be") == tok.encode("to be")
    ids = torch.tensor([tok.encode("to be or not")])
    assert torch.allclose(lm.model.forward_dense(ids), model.forward_dense(ids), atol=1e-6)


def test_export_hf_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = Transformer(CFG)
    checkpoint.export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        ref = hf(ids).logits[0]
        ours = model.compute_logits(model.forward_dense(ids)[0])
    assert torch.allclose(ours, ref, atol=1e-4)
    shared = Transformer(CFG.replace(num_layers=1, mixers=None, layer_order=(0, 0)))
    with pytest.raises(MemlmError, match="Llama-shaped"):
        checkpoint.export_hf(shared, tmp_path / "no")


def test_teacher_cache_round_trip_and_distill_step(tmp_path):
    torch.manual_seed(1)
    teacher = Transformer(CFG).eval()
    tokens = _tokens()
    cache = TeacherCache.build(teacher, tokens, tmp_path / "tc", seq_len=16, k=8, num_windows=10, chunk_windows=4)
    again = TeacherCache.open(tmp_path / "tc", tokens, seq_len=16)
    got = again.lookup(torch.tensor([9, 0]))
    x = torch.from_numpy(tokens[9 * 16:10 * 16].astype(np.int64))[None]
    with torch.no_grad():
        vals, ids = teacher.compute_logits(teacher.forward_dense(x)[0]).topk(8, dim=-1)
    assert torch.equal(got["teacher_ids"][0], ids)
    assert torch.allclose(got["teacher_logits"][0], vals, rtol=2e-3)        # stored as fp16
    assert got["teacher_lse"] is None                                       # no temperature asked
    with torch.no_grad():
        lse = torch.logsumexp(teacher.compute_logits(teacher.forward_dense(x)[0]) / 2, dim=-1)
    assert torch.allclose(again.lookup(torch.tensor([9]), 2.0)["teacher_lse"][0], lse, atol=1e-4)
    with pytest.raises(MemlmError, match="other tokens"):
        TeacherCache.open(tmp_path / "tc", tokens[::-1].copy(), seq_len=16)
    with pytest.raises(MemlmError, match="windows of 16"):
        TeacherCache.open(tmp_path / "tc", seq_len=32)
    assert TeacherCache.build(teacher, tokens, tmp_path / "tc", seq_len=16, k=8, num_windows=10,
                              chunk_windows=4).meta == cache.meta              # reused
    batches = CachedTeacherBatches(WindowSampler(tokens, 2, 16, aligned=True, num_windows=10), cache)
    obj = DistillObjective(DistillConfig(alpha=1.0, beta=0.5))
    t = _trainer(objective=obj, batches=batches)
    m = t.train_step()
    assert {"kl", "ce"} <= set(m) and np.isfinite(m["loss"])


def test_cache_with_hidden_states_feeds_the_cosine_term(tmp_path):
    torch.manual_seed(2)
    teacher = Transformer(CFG.replace(hidden_size=48, intermediate_size=64)).eval()
    tokens = _tokens()
    cache = TeacherCache.build(teacher, tokens, tmp_path / "tc", seq_len=16, k=4, num_windows=4,
                               store_hidden=True)
    batch = CachedTeacherBatches(WindowSampler(tokens, 2, 16, aligned=True, num_windows=4), cache).batch(0)
    assert batch["teacher_hidden"].shape == (2, 16, 48)
    obj = DistillObjective(DistillConfig(alpha=1.0, beta=0.0, gamma=1.0), student_hidden=32, teacher_hidden=48)
    loss, parts = obj(Transformer(CFG), batch)
    assert set(parts) == {"kl", "cos"} and 0 < parts["cos"] < 2
    assert float(loss.detach()) == pytest.approx(parts["kl"] + parts["cos"], rel=1e-5)
    loss.backward()
    assert obj.projection.weight.grad is not None           # the projection trains with the student


def test_shared_lr_scale_gives_a_shared_block_lr_over_its_uses():
    from memlm.training.trainer import param_groups
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=48, layer_order=(0, 0, 0, 1))
    model = Transformer(cfg)
    groups = param_groups([model], 0.1, shared_lr_scale=True)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["layers.0.attn.q_proj.weight"])] == pytest.approx(1 / 3)
    assert scale[id(named["layers.0.attn_norm.weight"])] == pytest.approx(1 / 3)
    assert scale[id(named["layers.1.mlp.up_proj.weight"])] == 1.0 and scale[id(named["embed.weight"])] == 1.0
    assert {g["weight_decay"] for g in groups if id(named["layers.0.attn_norm.weight"]) in map(id, g["params"])} == {0.0}
    torch.manual_seed(0)
    t = Trainer(Transformer(cfg), TrainConfig(steps=1, batch_size=2, seq_len=16, lr=3e-3, warmup=0,
                                              schedule="constant", shared_lr_scale=True),
                WindowSampler(_tokens(), 2, 16, seed=3))
    t.train_step()
    assert sorted(g["lr"] for g in t.optimizer.param_groups) == pytest.approx([1e-3, 1e-3, 3e-3, 3e-3])
    both = param_groups([model], 0.1, shared_lr_scale=True, layer_lr_scale=0.5)
    scale = {id(p): g["lr_scale"] for g in both for p in g["params"]}
    assert scale[id(named["layers.0.mlp.up_proj.weight"])] == pytest.approx(0.5 / 3)
    assert scale[id(named["layers.1.mlp.up_proj.weight"])] == 0.5 and scale[id(named["final_norm.weight"])] == 1.0
    with pytest.raises(MemlmError, match="layer_lr_scale"):
        TrainConfig(layer_lr_scale=0)


def test_plain_param_groups_are_unchanged_by_the_sharing_option():
    from memlm.training.trainer import param_groups
    model = Transformer(CFG)
    plain, flagged = param_groups([model], 0.1), param_groups([model], 0.1, shared_lr_scale=True)
    assert [[id(p) for p in g["params"]] for g in plain] == [[id(p) for p in g["params"]] for g in flagged]


def test_bf16_model_dir_loads_and_matches(tmp_path):
    loading = pytest.importorskip("memlm.loading")
    tok = _tok()
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
                      eos_token_ids=tok.eos_token_ids)
    torch.manual_seed(0)
    model = Transformer(cfg)
    checkpoint.save_model(model, tmp_path / "m", tok, dtype=torch.bfloat16)
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(str(tmp_path / "m" / "model.safetensors")).values()} == {torch.bfloat16}
    lm = loading.load_model(tmp_path / "m")
    ids = torch.tensor([tok.encode("to be or not")])
    ref = Transformer(cfg)
    ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    assert torch.equal(lm.model.forward_dense(ids), ref.forward_dense(ids))
