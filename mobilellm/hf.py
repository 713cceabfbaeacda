"""HF-format checkpoint folders in and out: config.json + safetensors (sharded with an index when large).

Our own checkpoints use the same layout plus `mobilellm_config.json`, the one source of truth for the
model shape; a folder without it (a download of facebook/MobileLLM-R1-950M, a converted SmolLM2) is
read from its HF `config.json`. Writes go to a temporary folder renamed into place, so a crash never
leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_folder
from .config import CONFIG_FILE, ConfigError, ModelConfig
from .model import Transformer

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the model."""


# ---- config.json <-> ModelConfig -------------------------------------------------------------------

def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", None):
        raise ConfigError(f"RoPE scaling {kind!r} is not supported (only plain RoPE)")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ConfigError("config.json gives no rope_theta")
    return float(theta)


def _eos(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


def config_from_hf(hf: dict, name: str = "hf") -> ModelConfig:
    """Read an HF config.json dict (Llama, Llama-4-text, MobileLLM-P1) into a ModelConfig."""
    if hf.get("model_type") == "llama4" and "text_config" in hf:
        hf = hf["text_config"]
    model_type = hf.get("model_type")
    if model_type not in ("llama", "llama4_text", "mobilellm_p1"):
        raise ConfigError(f"unsupported model_type {model_type!r}: expected llama, llama4_text or mobilellm_p1")
    required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"]
    missing = [k for k in required if k not in hf]
    if missing:
        raise ConfigError(f"config.json is missing fields {missing}")
    n_layers = hf["num_hidden_layers"]
    llama4 = model_type != "llama"
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("attention or MLP biases are not supported")
    if llama4 and hf.get("moe_layers"):
        raise ConfigError("mixture-of-experts layers are not supported (MobileLLM models are dense)")
    rope_layers = None
    if llama4:
        # HF's Llama-4-text default when the file is silent: every 4th layer NoPE with chunked attention.
        interval = hf.get("no_rope_layer_interval", 4)
        flags = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layers)]
        rope_layers = tuple(bool(x) for x in flags)  # HF: 1 = this layer uses RoPE
        default_types = ["full_attention" if r else "chunked_attention" for r in rope_layers]
        if all(rope_layers):
            rope_layers = None
    else:
        default_types = ["full_attention"] * n_layers
    layer_types = tuple(hf.get("layer_types") or default_types)
    return ModelConfig(
        name=name,
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=n_layers,
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size_mlp"] if llama4 else hf["intermediate_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        layer_types=layer_types,
        sliding_window=hf.get("sliding_window") if "sliding_attention" in layer_types else None,
        attention_chunk_size=hf.get("attention_chunk_size", 8192) if "chunked_attention" in layer_types else None,
        rope_theta=_rope_theta(hf),
        rope_layout="interleaved" if llama4 else "half",
        rope_layers=rope_layers,
        attn_temperature_tuning=bool(llama4 and rope_layers is not None and hf.get("attn_temperature_tuning", True)),
        attn_floor_scale=int(hf.get("floor_scale", 8192)),
        attn_scale=float(hf.get("attn_scale", 0.1)),
        qk_norm=bool(llama4 and hf.get("use_qk_norm", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        family="llama4" if llama4 else "llama",
        bos_id=hf.get("bos_token_id"),
        eos_ids=_eos(hf.get("eos_token_id")),
        pad_id=hf.get("pad_token_id"),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """The HF config.json that transformers' LlamaForCausalLM / Llama4ForCausalLM reads for this model."""
    common = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "bos_token_id": cfg.bos_id, "eos_token_id": list(cfg.eos_ids) if len(cfg.eos_ids) > 1 else
        (cfg.eos_ids[0] if cfg.eos_ids else None), "pad_token_id": cfg.pad_id,
    }
    if cfg.family == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "intermediate_size": cfg.ffn_dim,
                "mlp_bias": False, **common}
    rope = cfg.rope_layers or (True,) * cfg.n_layers
    hf = {"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", **common,
          "intermediate_size": cfg.ffn_dim, "intermediate_size_mlp": cfg.ffn_dim, "moe_layers": [],
          "num_local_experts": 0, "use_qk_norm": cfg.qk_norm, "no_rope_layers": [int(x) for x in rope],
          "attn_temperature_tuning": cfg.attn_temperature_tuning, "floor_scale": int(cfg.attn_floor_scale),
          "attn_scale": cfg.attn_scale, "attention_chunk_size": cfg.attention_chunk_size or cfg.max_seq_len,
          "layer_types": list(cfg.layer_types)}
    if "sliding_attention" in cfg.layer_types:  # MobileLLM-Pro's local/global layout (remote code upstream)
        hf["sliding_window"] = cfg.sliding_window
    return hf


# ---- state dict names ------------------------------------------------------------------------------

def to_hf_name(name: str, family: str) -> str:
    if name == "lm_head.weight":
        return name
    if family == "llama4":
        name = name.replace(".mlp.", ".feed_forward.")
    return "model." + name


def from_hf_name(name: str, family: str) -> str:
    if name == "lm_head.weight":
        return name
    if not name.startswith("model."):
        raise CheckpointError(f"unexpected tensor {name!r} in checkpoint")
    name = name[len("model."):]
    return name.replace(".feed_forward.", ".mlp.") if family == "llama4" else name


# ---- reading ---------------------------------------------------------------------------------------

def read_config(folder: str | Path) -> ModelConfig:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if (folder / CONFIG_FILE).exists():
        return ModelConfig.load(folder)
    hf_path = folder / "config.json"
    if not hf_path.exists():
        raise CheckpointError(f"{folder} has neither {CONFIG_FILE} nor config.json")
    try:
        hf = json.loads(hf_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"malformed JSON in {hf_path}: {err}") from None
    return config_from_hf(hf, name=folder.name)


def weight_files(folder: Path) -> list[Path]:
    if (folder / INDEX_FILE).exists():
        index = json.loads((folder / INDEX_FILE).read_text())
        return [folder / f for f in sorted(set(index["weight_map"].values()))]
    if (folder / WEIGHTS_FILE).exists():
        return [folder / WEIGHTS_FILE]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"no safetensors weights in {folder}")
    return found


def read_tensors(folder: Path, family: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in weight_files(folder):
        if not path.exists():
            raise CheckpointError(f"weight file {path} named in the index is missing")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    tensors[from_hf_name(key, family)] = t.to(dtype) if dtype is not None else t
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"cannot read {path} (corrupt or truncated safetensors?): {err}") from None
    return tensors


def check_state_dict(model: Transformer, tensors: dict[str, torch.Tensor]) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)  # some exporters write the tied head anyway
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(s)}"
             for k, s in expected.items() if k in tensors and tensors[k].shape != s]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if wrong:
        problems.append("shape mismatches " + "; ".join(wrong[:5]))
    if problems:
        raise CheckpointError(f"checkpoint does not fit config {model.config.name!r}: " + "; ".join(problems))


def load_pretrained(folder: str | Path, dtype: torch.dtype | None = torch.float32, device="cpu") -> Transformer:
    """Load a model from an HF-format folder (ours, or a transformers/hub download)."""
    folder = Path(folder)
    config = read_config(folder)
    tensors = read_tensors(folder, config.family, dtype)
    with torch.device("meta"):
        model = Transformer(config)
    check_state_dict(model, tensors)
    model.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(device)


# ---- writing ---------------------------------------------------------------------------------------

def save_pretrained(model: Transformer, folder: str | Path, max_shard_bytes: int = 2 * 1024**3,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json, mobilellm_config.json and safetensors (sharded past max_shard_bytes)."""
    folder = Path(folder)
    cfg = model.config
    state = {k: v for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][to_hf_name(key, cfg.family)] = tensor.detach().contiguous().cpu()
        size += nbytes
    with atomic_folder(folder) as tmp:
        cfg.save(tmp)
        dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps({**config_to_hf(cfg), "torch_dtype": dtype}, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if len(shards) == 1:
            save_file(shards[0], tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder
