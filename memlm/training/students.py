"""Students composed from a spec: presets, a spec parser, and the `--fit` budget search.

Owns: turning "layers=6,hidden=256,heads=4,kv_heads=2,mixers=AAR,share=repeat2" or a preset name
into a `ModelConfig`, and picking the largest preset that fits a memory target.
Does not know: training, loading, or bytes per dtype (`memlm.dtypes`); the student is a plain
`Transformer(cfg)`, so an attention-only student runs in the engine and a recurrent one on the
reference path.

Spec keys (all optional next to a preset; `preset=` picks the base):
    layers    depth (layers executed per token)        hidden   width
    heads     query heads        kv_heads  K/V heads (GQA)      ffn      MLP inner size
    mixers    one letter per unique layer, A=attention R=recurrent, cycled ("AR" -> A R A R ..)
    share     none | all (one block for every depth, ALBERT) | repeatN (each unique block runs
              N times in place, MobileLLM)
    mlp       swiglu | gelu | none          tie   1 | 0 (tied input/output embeddings)
    per_depth unshared extras for shared blocks, "+"-joined (e.g. share=all,per_depth=norms+gates):
              norms  one RMSNorm weight per depth (H params per norm per depth)
              gates  learned scalars on the attention and MLP outputs per depth, init 1
              Each is a `ModelConfig` field, so checkpoints round-trip; the engine runs such a
              student through the plain (unfused) `DecoderLayer.forward`. The trainer gives
              these per-depth rows the base lr, not a shared block's scaled one.
"""
from __future__ import annotations

from dataclasses import dataclass

from memlm import dtypes
from memlm.config import ModelConfig, format_size, parse_size
from memlm.errors import MemlmError

# name: (depth, hidden, heads, kv_heads, ffn)  — smallest first; ffn ≈ 8/3 hidden (SwiGLU)
STUDENT_PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "nano":   (2, 64, 2, 1, 176),
    "micro":  (4, 96, 3, 1, 256),
    "tiny":   (4, 128, 4, 2, 344),
    "mini":   (6, 192, 6, 2, 512),
    "small":  (8, 256, 8, 4, 688),
    "base":   (10, 320, 8, 4, 864),
    "medium": (12, 384, 8, 4, 1024),
    "large":  (16, 512, 8, 4, 1376),
    "xl":     (24, 576, 9, 3, 1536),
}
DEFAULT_STUDENT = "tiny"
STUDENT_POSITIONS = 2048        # position embeddings of a student unless its context needs more

_SPEC_KEYS = {"preset", "layers", "hidden", "heads", "kv_heads", "ffn", "mixers", "share", "mlp", "tie",
              "per_depth"}
PER_DEPTH = {"norms": "depth_norms", "gates": "depth_gates"}


def _per_depth(value: str) -> dict[str, bool]:
    """'norms+gates' -> {"depth_norms": True, "depth_gates": True} (ModelConfig fields)."""
    names = [v for v in value.replace(" ", "").split("+") if v and v != "none"]
    unknown = set(names) - set(PER_DEPTH)
    if unknown:
        raise MemlmError(f"per_depth={value!r}: use a +-joined subset of {sorted(PER_DEPTH)}, e.g. norms+gates")
    return {PER_DEPTH[n]: True for n in names}


def _mixers(letters: str, n: int) -> tuple[str, ...]:
    letters = letters.replace(".", "").upper()
    if not letters or set(letters) - {"A", "R"}:
        raise MemlmError(f"mixers={letters!r}: use letters A (attention) and R (recurrent), e.g. AAR")
    return tuple("attention" if letters[i % len(letters)] == "A" else "recurrent" for i in range(n))


def _sharing(share: str, depth: int) -> tuple[int, tuple[int, ...]]:
    """-> (unique layers, layer_order per depth)."""
    if share in ("", "none"):
        return depth, tuple(range(depth))
    if share == "all":
        return 1, (0,) * depth
    if share.startswith("repeat") and share[6:].isdigit() and int(share[6:]) > 0:
        n = int(share[6:])
        if depth % n:
            raise MemlmError(f"share={share}: depth {depth} is not a multiple of {n}")
        return depth // n, tuple(i // n for i in range(depth))
    raise MemlmError(f"share={share!r}: use none, all, or repeatN (e.g. repeat2)")


def parse_student(spec: str, vocab_size: int, max_position_embeddings: int = STUDENT_POSITIONS,
                  eos_token_ids: tuple[int, ...] = (), bos_token_id: int | None = None) -> ModelConfig:
    """A preset name or a "key=value,..." spec -> ModelConfig with the teacher's vocabulary.

    Raises:
        MemlmError: unknown preset or key, or values that do not make a valid model.
    """
    spec = spec.strip()
    fields: dict[str, str] = {}
    if spec in STUDENT_PRESETS:
        fields["preset"] = spec
    elif spec:
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in _SPEC_KEYS:
                raise MemlmError(f"bad student spec item {part!r}: use a preset {sorted(STUDENT_PRESETS)} "
                                 f"or key=value with keys {sorted(_SPEC_KEYS)}")
            fields[key.strip()] = value.strip()
    preset = fields.get("preset", DEFAULT_STUDENT)
    if preset not in STUDENT_PRESETS:
        raise MemlmError(f"unknown student preset {preset!r}: use one of {list(STUDENT_PRESETS)}")
    depth, hidden, heads, kv_heads, ffn = STUDENT_PRESETS[preset]
    try:
        depth = int(fields.get("layers", depth))
        hidden = int(fields.get("hidden", hidden))
        heads = int(fields.get("heads", heads))
        kv_heads = int(fields.get("kv_heads", kv_heads if "heads" not in fields else heads))
        ffn = int(fields.get("ffn", ffn if "hidden" not in fields else 8 * hidden // 3))
    except ValueError as e:
        raise MemlmError(f"bad number in student spec {spec!r}: {e}") from None
    n_unique, order = _sharing(fields.get("share", "none"), depth)
    try:
        return ModelConfig(vocab_size=vocab_size, hidden_size=hidden, num_layers=n_unique, num_heads=heads,
                           num_kv_heads=kv_heads, intermediate_size=ffn, mlp=fields.get("mlp", "swiglu"),
                           mixers=_mixers(fields.get("mixers", "A"), n_unique), layer_order=order,
                           tie_word_embeddings=fields.get("tie", "1") not in ("0", "false", "no"),
                           max_position_embeddings=max_position_embeddings, arch="memlm-student",
                           eos_token_ids=tuple(eos_token_ids), bos_token_id=bos_token_id,
                           **_per_depth(fields.get("per_depth", "")))
    except ValueError as e:
        raise MemlmError(f"student spec {spec!r} is not a valid model: {e}") from None


def init_weights(model, std: float = 0.02) -> None:
    """GPT-2 style init for a student trained from scratch: N(0, std) weights, zero biases, and
    residual output projections scaled by 1/sqrt(2*depth) (torch's defaults give tied-embedding
    logits in the tens, a validation loss far above ln(vocab) at step 0)."""
    import math

    import torch
    out_std = std / math.sqrt(2 * model.cfg.depth)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2:
                if name.endswith("bias"):
                    p.zero_()
                continue
            p.normal_(0.0, out_std if name.endswith(("o_proj.weight", "down_proj.weight", "out_proj.weight")) else std)


def init_embedding_from_teacher(model, teacher_embedding, std: float = 0.02) -> None:
    """Initialize a student's (tied) embedding from the teacher's, projected onto the teacher
    embedding's top principal directions (uncentered PCA: the leading eigenvectors of E^T E),
    rescaled to the random init's standard deviation so logits start at the same scale.

    A student of width H < Ht then starts with the teacher's token geometry (similar tokens
    close) instead of random vectors; every other weight keeps `init_weights`.

    Args:
        teacher_embedding: (V, Ht) with the student's vocabulary V and Ht >= the student's width.
    Raises:
        MemlmError: vocabularies differ or the teacher is narrower than the student.
    """
    import torch
    E = teacher_embedding.detach().float()                                  # (V, Ht)
    V, H = model.embed.weight.shape
    if E.shape[0] != V or E.shape[1] < H:
        raise MemlmError(f"teacher embedding {tuple(E.shape)} cannot initialize a student embedding ({V}, {H}): "
                         "it needs the same vocabulary and at least the student's width")
    _, vecs = torch.linalg.eigh(E.T @ E)                                    # ascending eigenvalues
    proj = E @ vecs[:, -H:].flip(-1)                                        # (V, H), largest first
    with torch.no_grad():
        model.embed.weight.copy_(proj * (std / proj.std()))


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of `Transformer(cfg)` computed from the config alone (no allocation)."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    norm = H if cfg.norm == "rms" else 2 * H
    mlp = {"swiglu": 3 * H * I, "gelu": 2 * H * I, "none": 0}[cfg.mlp]
    mixer = {"attention": H * q + 2 * H * kv + q * H,
             "recurrent": H * 3 * H + 3 * H + H * H}
    per_layer = []
    for i, m in enumerate(cfg.mixers):
        uses = cfg.layer_order.count(i)
        n_norm = norm * (uses if cfg.depth_norms else 1)
        gates = uses * (2 if cfg.mlp != "none" else 1) if cfg.depth_gates else 0
        per_layer.append(mixer[m] + n_norm + (mlp + n_norm if cfg.mlp != "none" else 0) + gates)
    embed = cfg.vocab_size * H * (1 if cfg.tie_word_embeddings else 2)
    pos = cfg.max_position_embeddings * H if cfg.position == "learned" else 0
    return embed + pos + sum(per_layer) + norm


FIT_DEPTHS = (2, 4, 6, 8, 10, 12, 16, 20, 24, 30)
FIT_CONTEXT = 2048                                       # tokens of KV (batch 1) a fit reserves
FIT_DTYPES = ("fp32", "fp16", "bf16", "int8", "int4")    # weight dtypes a fit can assume
FIT_WEIGHT_DTYPE = "fp32"


def body_parameters(cfg: ModelConfig) -> int:
    """Parameters outside the embedding / LM head."""
    return count_parameters(cfg) - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)


@dataclass(frozen=True)
class FitChoice:
    name: str
    cfg: ModelConfig
    weight_bytes: int
    kv_bytes: int

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_bytes


def parse_weight_dtype(value: str) -> str:
    """Canonical name of a `--weight-dtype` (one of `FIT_DTYPES` or an alias such as float32)."""
    try:
        return dtypes.parse(value, allowed=FIT_DTYPES, what="--weight-dtype")
    except ValueError as e:
        raise MemlmError(str(e)) from None


def fit_student(target: str | int, vocab_size: int, context: int = FIT_CONTEXT, weight_dtype: str = FIT_WEIGHT_DTYPE,
                **cfg_kwargs) -> tuple[FitChoice, list[FitChoice]]:
    """The largest student (by non-embedding parameters) of the preset widths x `FIT_DEPTHS` grid whose
    weights + KV for `context` tokens (batch 1) fit.

    Returns: (choice, all candidates considered, smallest first).
    Raises:
        MemlmError: the target is below the smallest candidate (names its size), or `weight_dtype`
            is not one of `FIT_DTYPES` (aliases such as float32 are accepted).
    """
    budget = parse_size(target)
    weight_dtype = parse_weight_dtype(weight_dtype)
    per_weight = dtypes.bytes_per_element(weight_dtype)
    candidates = []
    for preset in STUDENT_PRESETS:                 # each preset's width at every depth
        for depth in FIT_DEPTHS:
            name = f"{preset},layers={depth}"
            cfg = parse_student(f"preset={name}", vocab_size, max_position_embeddings=max(context, STUDENT_POSITIONS),
                                **cfg_kwargs)
            candidates.append(FitChoice(name, cfg, int(count_parameters(cfg) * per_weight),
                                        cfg.kv_bytes_per_token * context))
    candidates.sort(key=lambda c: c.total)
    fitting = [c for c in candidates if c.total <= budget]
    if not fitting:
        small = min(candidates, key=lambda c: c.total)
        raise MemlmError(f"--fit {format_size(budget)} is smaller than the smallest student "
                         f"({small.name}: {format_size(small.total)} = {format_size(small.weight_bytes)} "
                         f"{weight_dtype} weights + {format_size(small.kv_bytes)} KV for {context} tokens)")
    # Rank by non-embedding parameters: with a 49k vocabulary the embedding is a fixed cost that
    # adds little capacity, and ranking by total would pick 2-layer wide models (MobileLLM:
    # deep-and-thin wins at equal size). Ties go to the larger total.
    return max(fitting, key=lambda c: (body_parameters(c.cfg), count_parameters(c.cfg))), candidates


def describe_fit(choice: FitChoice, budget: str | int, context: int, weight_dtype: str = FIT_WEIGHT_DTYPE) -> str:
    """The message `memlm distill --fit` prints: what it picked and why."""
    cfg, b = choice.cfg, parse_size(budget)
    return (f"fit {format_size(b)}: picked student '{choice.name}' (layers={cfg.depth}, hidden={cfg.hidden_size}, "
            f"heads={cfg.num_heads}, kv_heads={cfg.num_kv_heads}, ffn={cfg.intermediate_size}, "
            f"{count_parameters(cfg) / 1e6:.2f}M params, {body_parameters(cfg) / 1e6:.2f}M outside the embedding): weights {format_size(choice.weight_bytes)} "
            f"({weight_dtype}) + KV {format_size(choice.kv_bytes)} ({context} tokens, batch 1) = "
            f"{format_size(choice.total)} of {format_size(b)}; no other width x depth in the grid that fits has more non-embedding parameters")
