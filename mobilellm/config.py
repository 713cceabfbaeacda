"""Named model configs: one dataclass, saved beside every checkpoint and read back from it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import write_text_atomic
from .errors import UserError
from .schema import Schema, read_json

LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
ROPE_LAYOUTS = ("half", "interleaved")  # Llama 2/3 rotate-half; Llama-4-text complex pairs
FAMILIES = ("llama", "llama4")  # checkpoint layout on disk (HF key names and config.json)
CONFIG_FILE = "mobilellm_config.json"


class ConfigError(UserError):
    """A model config that is malformed, incomplete or inconsistent."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int
    layer_types: tuple[str, ...]
    sliding_window: int | None = None
    attention_chunk_size: int | None = None
    rope_theta: float = 10_000.0
    rope_layout: str = "half"
    rope_layers: tuple[bool, ...] | None = None  # False = NoPE layer (Llama-4-text); None = RoPE everywhere
    attn_temperature_tuning: bool = False  # Llama-4 query scaling on NoPE layers
    attn_floor_scale: int = 8192
    attn_scale: float = 0.1
    qk_norm: bool = False  # parameter-free L2 norm of q and k on RoPE layers (Llama-4-text)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    family: str = "llama"
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int | None = None
    init_std: float = 0.02
    extra: dict = field(default_factory=dict, compare=False)  # unknown HF fields kept for round-trips

    def __post_init__(self):
        self.validate()

    # ---- checks -------------------------------------------------------------------------------
    def validate(self) -> None:
        problems = []
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim", "max_seq_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                problems.append(f"{key} must be a positive integer, got {value!r}")
        if not problems and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if len(self.layer_types) != self.n_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            problems.append(f"unknown layer types {unknown}; expected {LAYER_TYPES}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            problems.append("sliding_attention layers need sliding_window")
        if "chunked_attention" in self.layer_types and not self.attention_chunk_size:
            problems.append("chunked_attention layers need attention_chunk_size")
        if self.rope_layout not in ROPE_LAYOUTS:
            problems.append(f"rope_layout must be one of {ROPE_LAYOUTS}, got {self.rope_layout!r}")
        if self.rope_layers is not None and len(self.rope_layers) != self.n_layers:
            problems.append(f"rope_layers has {len(self.rope_layers)} entries for {self.n_layers} layers")
        if self.family not in FAMILIES:
            problems.append(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.head_dim % 2:
            problems.append(f"head_dim must be even for RoPE, got {self.head_dim}")
        if problems:
            raise ConfigError(f"invalid config {self.name!r}: " + "; ".join(problems))

    # ---- derived ------------------------------------------------------------------------------
    def uses_rope(self, layer: int) -> bool:
        return self.rope_layers is None or self.rope_layers[layer]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- (de)serialization --------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["layer_types"] = list(self.layer_types)
        data["eos_ids"] = list(self.eos_ids)
        if self.rope_layers is not None:
            data["rope_layers"] = list(self.rope_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict, origin: str | Path = "model config") -> "ModelConfig":
        """Validated against the dataclass's fields and types; errors name `origin` (the file)."""
        try:
            Schema.of_dataclass(cls).check(data, origin)
        except UserError as err:
            raise ConfigError(str(err)) from None
        data = dict(data)
        data["layer_types"] = tuple(data["layer_types"])
        data["eos_ids"] = tuple(data.get("eos_ids", ()))
        if data.get("rope_layers") is not None:
            data["rope_layers"] = tuple(bool(x) for x in data["rope_layers"])
        try:
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(f"{origin}: {err}") from None

    def save(self, folder: str | Path) -> Path:
        return write_text_atomic(Path(folder) / CONFIG_FILE, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder_or_file: str | Path) -> "ModelConfig":
        path = Path(folder_or_file)
        if path.is_dir():
            path = path / CONFIG_FILE
        if not path.exists():
            raise ConfigError(f"no model config at {path}")
        try:
            data = read_json(path, fix="restore it from the checkpoint it came from")
        except UserError as err:
            raise ConfigError(str(err)) from None
        return cls.from_dict(data, origin=path)

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        if name not in CONFIGS:
            raise ConfigError(f"unknown model config {name!r}; known: {', '.join(sorted(CONFIGS))}")
        return CONFIGS[name]


def local_global_pattern(n_layers: int, global_every: int, last_global: bool = False) -> tuple[str, ...]:
    """Every `global_every`-th layer (from 0) global, the rest sliding; optionally the last layer global too."""
    types = ["full_attention" if i % global_every == 0 else "sliding_attention" for i in range(n_layers)]
    if last_global:
        types[-1] = "full_attention"
    return tuple(types)


def all_global(n_layers: int) -> tuple[str, ...]:
    return ("full_attention",) * n_layers


def _llama(name, vocab, dim, n_layers, n_heads, n_kv, ffn, theta=10_000.0, ctx=2048, **kw) -> ModelConfig:
    return ModelConfig(name=name, vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                       ffn_dim=ffn, head_dim=kw.pop("head_dim", dim // n_heads),
                       layer_types=kw.pop("layer_types", all_global(n_layers)),
                       rope_theta=theta, max_seq_len=ctx, **kw)


def _r1(name, n_layers, n_heads, n_kv, dim, ffn) -> ModelConfig:
    # MobileLLM-R1: HF Llama4ForCausalLM, Llama 3 vocab, interleaved RoPE, L2 q/k norm (SPEC.md 1).
    return _llama(name, 128_256, dim, n_layers, n_heads, n_kv, ffn, theta=8_000_000.0, ctx=32_768, head_dim=64,
                  rope_layout="interleaved", qk_norm=True, family="llama4",
                  bos_id=128_000, eos_ids=(128_001, 128_009), pad_id=128_004)


CONFIGS: dict[str, ModelConfig] = {c.name: c for c in [
    # MobileLLM-Pro (MobileLLM-P1): 1,084,453,120 parameters. RoPE theta is unpublished (SPEC.md): Llama-4's 500k.
    _llama("pro-1b", 202_048, 1280, 30, 20, 4, 6144, theta=500_000.0, ctx=131_072, head_dim=64,
           layer_types=local_global_pattern(30, 4, last_global=True), sliding_window=512,
           rope_layout="interleaved", family="llama4",
           bos_id=200_000, eos_ids=(200_001, 200_007, 200_008), pad_id=200_018),
    _r1("r1-140m", 15, 9, 3, 576, 2048),
    _r1("r1-360m", 15, 16, 4, 1024, 4096),
    _r1("r1-950m", 22, 24, 6, 1536, 6144),
    # The original MobileLLM (Llama layout, 32k SentencePiece vocab).
    _llama("mobilellm-125m", 32_000, 576, 30, 9, 3, 1536, bos_id=1, eos_ids=(2,)),
    _llama("mobilellm-350m", 32_000, 960, 32, 15, 5, 2560, bos_id=1, eos_ids=(2,)),
    _llama("mobilellm-600m", 32_000, 1152, 40, 18, 6, 3072, bos_id=1, eos_ids=(2,)),
    _llama("mobilellm-1b", 32_000, 1280, 54, 20, 5, 3584, bos_id=1, eos_ids=(2,)),
    _llama("mobilellm-1.5b", 32_000, 1600, 54, 25, 5, 4352, bos_id=1, eos_ids=(2,)),
    # The real small model the tests and the README run (SPEC.md 5).
    _llama("smollm2-135m", 49_152, 576, 30, 9, 3, 1536, theta=100_000.0, ctx=8192, bos_id=1, eos_ids=(2,), pad_id=2),
    # Tiny configs that drive the tests: the pro-1b layout shrunk.
    _llama("tiny", 256, 64, 4, 4, 2, 160, theta=10_000.0, ctx=256, head_dim=16,
           layer_types=local_global_pattern(4, 2, last_global=True), sliding_window=8,
           rope_layout="interleaved", family="llama4", bos_id=1, eos_ids=(2,), pad_id=0),
    _llama("tiny-llama", 256, 64, 2, 4, 2, 160, ctx=256, head_dim=16, bos_id=1, eos_ids=(2,), pad_id=0),
    # The starter student of the README's recipe: pro-1b's local/global layout at laptop scale, with
    # SmolLM2's tokenizer (vocab 49,152) so that the real SmolLM2-135M can teach it.
    _llama("starter-student", 49_152, 256, 8, 4, 2, 768, theta=100_000.0, ctx=2048, head_dim=64,
           layer_types=local_global_pattern(8, 4, last_global=True), sliding_window=128,
           rope_layout="interleaved", family="llama4", bos_id=1, eos_ids=(2,), pad_id=2),
]}
