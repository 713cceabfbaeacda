"""HF-format checkpoint folders in and out: config.json + safetensors (sharded with an index when large).

Our own checkpoints use the same layout plus `mobilellm_config.json`, the one source of truth for the
model shape; a folder without it (a download of facebook/MobileLLM-R1-950M, a converted SmolLM2) is
read from its HF `config.json`. Writes go to a temporary folder renamed into place, so a crash never
leaves a half-written checkpoint.

Tools that touch every tensor stream them: `TensorReader` reads one tensor at a time, `ShardWriter` writes
each shard as it fills, and `model_from_tensors` is the one place a model is built (and its head tied)
from tensors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_folder
from .config import CONFIG_FILE, ConfigError, ModelConfig
from .errors import UserError
from .model import Transformer
from .schema import Schema, read_json_object

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, or does not fit the model."""


# ---- config.json <-> ModelConfig -------------------------------------------------------------------

INT, NUMBER, OPT_INT = (int,), (int, float), (int, type(None))
_HF_FIELDS = {"vocab_size": INT, "hidden_size": INT, "num_hidden_layers": INT, "num_attention_heads": INT,
              "intermediate_size": INT, "intermediate_size_mlp": INT, "num_key_value_heads": OPT_INT,
              "head_dim": OPT_INT, "layer_types": (list, type(None)), "sliding_window": OPT_INT,
              "attention_chunk_size": OPT_INT, "rope_theta": (int, float, type(None)),
              "rope_parameters": (dict, type(None)), "rope_scaling": (dict, type(None)),
              "rms_norm_eps": NUMBER, "tie_word_embeddings": (bool,), "max_position_embeddings": INT,
              "no_rope_layers": (list, type(None)), "no_rope_layer_interval": INT, "use_qk_norm": (bool,),
              "attn_temperature_tuning": (bool,), "floor_scale": NUMBER, "attn_scale": NUMBER,
              "bos_token_id": OPT_INT, "eos_token_id": (int, list, type(None)), "pad_token_id": OPT_INT,
              "model_type": (str,), "text_config": (dict,)}
_HF_COMMON = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
# The fields the converter reads, per architecture (Llama-4-text names its dense FFN intermediate_size_mlp).
HF_SCHEMAS = {model_type: Schema(_HF_FIELDS, _HF_COMMON + (ffn,), fix="fix the file or download the model again")
              for model_type, ffn in (("llama", "intermediate_size"), ("llama4_text", "intermediate_size_mlp"),
                                      ("mobilellm_p1", "intermediate_size_mlp"))}


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


def config_from_hf(hf: dict, name: str = "hf", origin: str | Path = "config.json") -> ModelConfig:
    """Read an HF config.json dict (Llama, Llama-4-text, MobileLLM-P1) into a ModelConfig."""
    if not isinstance(hf, dict):
        raise ConfigError(f"{origin}: expected a JSON object")
    if hf.get("model_type") == "llama4" and isinstance(hf.get("text_config"), dict):
        hf, origin = hf["text_config"], f"{origin} (text_config)"
    model_type = hf.get("model_type")
    if model_type not in HF_SCHEMAS:
        raise ConfigError(f"{origin}: unsupported model_type {model_type!r}: expected llama, llama4_text or "
                          "mobilellm_p1")
    try:
        HF_SCHEMAS[model_type].check(hf, origin)
    except UserError as err:
        raise ConfigError(str(err)) from None
    try:
        return _config_from_hf(hf, name, model_type)
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from None


def _config_from_hf(hf: dict, name: str, model_type: str) -> ModelConfig:
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
    hf_path = folder / "config.json"
    hf = None
    if hf_path.exists():  # read and checked even beside ours: a broken one would break HF tools on export
        try:
            hf = config_from_hf(read_json_object(hf_path, fix="fix the file or delete it"), folder.name, hf_path)
        except UserError as err:
            raise ConfigError(str(err)) from None
    if (folder / CONFIG_FILE).exists():
        return ModelConfig.load(folder)
    if hf is None:
        raise CheckpointError(f"{folder} has neither {CONFIG_FILE} nor config.json")
    return hf


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those its index names, else model.safetensors, else any."""
    index_path = folder / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"malformed {index_path}: {err!r}") from None
        return [folder / f for f in sorted(set(weight_map.values()))]
    if (folder / WEIGHTS_FILE).exists():
        return [folder / WEIGHTS_FILE]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"no safetensors weights in {folder}")
    return found


@contextmanager
def _safetensors(path: Path) -> Iterator:
    """safe_open(path), its failures as a CheckpointError naming the file."""
    if not path.exists():
        raise CheckpointError(f"weight file {path} named in the index is missing")
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"cannot read {path} (corrupt or truncated safetensors?): {err}") from None


class TensorReader:
    """The tensors of a checkpoint folder (one safetensors file, or shards and their index) under our names,
    read one at a time, so a tool that touches every tensor (merge, convert) never holds the whole model:

        reader = TensorReader(folder, config.family)
        for name, tensor in reader.items():
            ...

    Opening reads only the files' headers. A tensor read from safetensors is a view of its file's memory map,
    whose pages stay resident while the file is open or the tensor alive, so each `get` opens the file anew:
    resident memory follows the tensors the caller keeps. Float tensors are cast to `dtype` when given.
    """

    def __init__(self, folder: str | Path, family: str, dtype: torch.dtype | None = None):
        self.folder, self.dtype = Path(folder), dtype
        self._where: dict[str, tuple[Path, str]] = {}  # our name -> (file, its name in the file)
        self._shapes: dict[str, tuple[int, ...]] = {}
        for path in weight_files(self.folder):
            with _safetensors(path) as f:
                for key in f.keys():
                    name = from_hf_name(key, family)
                    if name in self._where:
                        raise CheckpointError(f"tensor {key!r} is in both {self._where[name][0]} and {path}")
                    self._where[name] = (path, key)
                    self._shapes[name] = tuple(f.get_slice(key).get_shape())

    def keys(self) -> list[str]:
        return list(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor `name`, or only its `rows` (a slice of the first dimension, read alone from the file)."""
        path, key = self._where[name]
        with _safetensors(path) as f:
            tensor = f.get_tensor(key) if rows is None else f.get_slice(key)[rows]
        return tensor.to(self.dtype) if self.dtype is not None and tensor.is_floating_point() else tensor

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every tensor, file by file."""
        for name in self._where:
            yield name, self.get(name)


def read_tensors(folder: Path, family: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All the tensors of a checkpoint at once (TensorReader streams them)."""
    return dict(TensorReader(folder, family, dtype).items())


def check_state_dict(model: Transformer, tensors: dict[str, torch.Tensor], context: str | None = None) -> None:
    """Raise a CheckpointError `context: problems` naming missing, unexpected and misshapen tensors (and any
    integer tensor where the model holds a float one, or the reverse). A tied head may be stored or not."""
    expected = model.state_dict()
    given = set(tensors)
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight", None)
        given.discard("lm_head.weight")  # some exporters write the tied head anyway
    missing = sorted(set(expected) - given)
    unexpected = sorted(given - set(expected))
    shared = [k for k in expected if k in given]
    wrong_shape = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in shared if tensors[k].shape != expected[k].shape]
    wrong_kind = [f"{k}: checkpoint {tensors[k].dtype} vs model {expected[k].dtype}"
                  for k in shared if tensors[k].is_floating_point() != expected[k].is_floating_point()]

    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if wrong_shape:
        problems.append("shape mismatches " + "; ".join(wrong_shape[:5]))
    if wrong_kind:
        problems.append("dtype mismatches " + "; ".join(wrong_kind[:5]))
    if problems:
        context = context or f"checkpoint does not fit config {model.config.name!r}"
        raise CheckpointError(f"{context}: " + "; ".join(problems))


def model_from_tensors(model: ModelConfig | Transformer, tensors: dict[str, torch.Tensor],
                       dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                       context: str | None = None) -> Transformer:
    """A model whose weights are `tensors` (our names), never allocated twice: built from a config on the meta
    device (or `model`, a skeleton already there, such as a quantized one), checked (check_state_dict, with
    `context` heading its error), assigned, and a tied float head pointed back at the embedding (a quantized
    skeleton's shared head is quant.checkpoint's to tie). Float tensors are cast to `dtype` when given; the
    model moves to `device` when given."""
    if isinstance(model, ModelConfig):
        with torch.device("meta"):
            model = Transformer(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    check_state_dict(model, tensors, context)
    model.load_state_dict(tensors, strict=False, assign=True)  # strict but for a tied head: checked above
    if model.config.tie_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.embed_tokens.weight
    return model if device is None else model.to(device)


def load_pretrained(folder: str | Path, dtype: torch.dtype | None = torch.float32, device="cpu") -> Transformer:
    """Load a model from an HF-format folder (ours, or a transformers/hub download)."""
    folder = Path(folder)
    config = read_config(folder)
    tensors = read_tensors(folder, config.family, dtype)  # cast one tensor at a time
    return model_from_tensors(config, tensors, device=device,
                              context=f"checkpoint {folder} does not fit config {config.name!r}")


# ---- writing ---------------------------------------------------------------------------------------

class ShardWriter:
    """Write a checkpoint folder tensor by tensor (our names), atomically: a shard file is written as soon as
    the next tensor would take it past `max_shard_bytes`, so at most one shard is held in memory.

        with ShardWriter(out, config, extra_files=tokenizer_files) as writer:
            for name, tensor in TensorReader(src, config.family).items():
                writer.add(name, tensor)

    On close one shard becomes model.safetensors; several become model-0000i-of-0000N.safetensors with
    HF's index. config.json (torch_dtype: the first tensor's dtype), mobilellm_config.json and `extra_files`
    are written beside them. A tied LM head is the embedding: it is not stored. On error nothing changes.
    """

    def __init__(self, folder: str | Path, config: ModelConfig, max_shard_bytes: int = 2 * 1024**3,
                 extra_files: dict[str, str] | None = None):
        self.folder, self.config, self.max_shard_bytes = Path(folder), config, max_shard_bytes
        self.extra_files = dict(extra_files or {})
        self.shards: list[list[str]] = []  # HF names in each shard written so far
        self.total_bytes = 0
        self.dtype: torch.dtype | None = None
        self._shard: dict[str, torch.Tensor] = {}  # the shard being filled, by HF name
        self._shard_bytes = 0
        self._added: set[str] = set()

    def __enter__(self) -> "ShardWriter":
        with ExitStack() as stack:  # kept open past this block only if the config files could be written
            self.tmp = stack.enter_context(atomic_folder(self.folder))
            self.config.save(self.tmp)
            for name, text in self.extra_files.items():
                (self.tmp / name).write_text(text)
            self._folder = stack.pop_all()
        return self

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.config.tie_embeddings and name == "lm_head.weight":
            return
        if name in self._added:
            raise ValueError(f"tensor {name!r} was added twice")
        self._added.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._shard and self._shard_bytes + nbytes > self.max_shard_bytes:
            self._write_shard()
        self._shard[to_hf_name(name, self.config.family)] = tensor.detach().contiguous().cpu()
        self._shard_bytes += nbytes
        self.total_bytes += nbytes
        if self.dtype is None:
            self.dtype = tensor.dtype

    def _write_shard(self) -> None:
        save_file(self._shard, self.tmp / f".shard-{len(self.shards):05d}", metadata={"format": "pt"})
        self.shards.append(list(self._shard))
        self._shard, self._shard_bytes = {}, 0

    def _finish(self) -> None:
        if not self._added:
            raise ValueError(f"no tensors were added to {self.folder}")
        if self._shard:
            self._write_shard()
        n = len(self.shards)
        names = [WEIGHTS_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            (self.tmp / f".shard-{i:05d}").rename(self.tmp / name)
        if n > 1:
            weight_map = {key: name for name, keys in zip(names, self.shards) for key in keys}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        dtype = str(self.dtype).removeprefix("torch.")
        hf = {**config_to_hf(self.config), "torch_dtype": dtype}
        (self.tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            return self._folder.__exit__(exc_type, exc, tb)  # removes the temp folder
        with self._folder:  # renamed into place, or removed if finishing fails
            self._finish()
        return False


def save_pretrained(model: Transformer, folder: str | Path, max_shard_bytes: int = 2 * 1024**3,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json, mobilellm_config.json and safetensors (sharded past max_shard_bytes)."""
    with ShardWriter(folder, model.config, max_shard_bytes, extra_files) as writer:
        for name, tensor in model.state_dict().items():
            writer.add(name, tensor)
    return Path(folder)
