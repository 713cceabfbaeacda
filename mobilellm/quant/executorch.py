"""Export a converted cpu-scheme model to ExecuTorch (.pte, XNNPACK): int8 dynamic activations x int4 group-32.

The linear layers (LM head included) get torchao's IntxUnpackedToInt8Tensor weights built from OUR int4
values and scales (not re-quantized), with int8 asymmetric per-token activation quantization; XNNPACK's
partitioner lowers that pattern to its QD8 x QC4W GEMM. The embedding table is exported dequantized (float):
XNNPACK has no quantized gather. The int8 KV fake quantization stays in the graph (portable kernels).

Needs the optional `executorch` package (pip install -c constraints.txt 'mobilellm[executorch]'), which
installs beside torch 2.13 without replacing it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_file
from ..model import Transformer
from .config import QuantConfig
from .math import unpack_int4
from .modules import KVQuantAttention, QuantizedEmbedding, QuantizedLinear


def _require_executorch():
    try:
        import executorch  # noqa: F401
        import torchao  # noqa: F401
    except ImportError as err:
        raise ImportError("ExecuTorch export needs the `executorch` package: "
                          "pip install -c constraints.txt 'mobilellm[executorch]'") from err


def _torchao_weight(module: QuantizedLinear) -> nn.Parameter:
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor, IntxUnpackedToInt8TensorActivationQuantization)

    packed, scale = module.int4_rows()
    scale = scale.float()  # (N, K/group)
    tensor = IntxUnpackedToInt8Tensor(
        unpack_int4(packed), scale, torch.zeros(scale.shape, dtype=torch.int8), torch.int4,
        (1, module.group_size), torch.float32, IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN)
    return nn.Parameter(tensor, requires_grad=False)


def exportable_model(model: Transformer, config: QuantConfig) -> Transformer:
    """A plain Transformer with torchao int4 weights carrying our values (fp32 activations between)."""
    _require_executorch()
    if config.activations != "int8_dynamic":
        raise ValueError(f"ExecuTorch export covers the cpu scheme (int8 dynamic activations); got {config.scheme!r}")
    with torch.device("meta"):
        plain = Transformer(model.config.replace(tie_embeddings=False))
    plain.to_empty(device="cpu")
    floats = {k: v for k, v in model.state_dict().items() if v.is_floating_point() and not k.endswith("weight_scale")}
    plain.load_state_dict(floats, strict=False)  # the norms
    for name, module in model.named_modules():
        target = plain.get_submodule(name) if name else plain
        if isinstance(module, QuantizedLinear):
            target.weight = _torchao_weight(module)
        elif isinstance(module, QuantizedEmbedding):
            target.weight = nn.Parameter(module(torch.arange(module.num_embeddings)), requires_grad=False)
        elif isinstance(module, KVQuantAttention):
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, KVQuantAttention.from_attention(target))
    return plain.eval()


def export_pte(model: Transformer, config: QuantConfig, path: str | Path, seq_len: int) -> Path:
    """Write `path` (.pte): logits (1, seq_len, V) for tokens (1, seq_len), lowered to XNNPACK."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    plain = exportable_model(model, config)
    example = (torch.zeros(1, seq_len, dtype=torch.long),)
    with torch.no_grad():
        program = torch.export.export(plain, example, strict=False)
    buffer = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
    with atomic_file(path, "wb") as fh:
        fh.write(buffer)
    return Path(path)


def run_pte(path: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits from the ExecuTorch runtime (its XNNPACK delegate) for tokens (1, seq_len)."""
    _require_executorch()
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    # The loader reads the file itself. `_load_for_executorch_from_buffer(path.read_bytes())` keeps pointers
    # into the bytes without a reference to them: once they are freed, forward reads freed memory (the
    # segfault in `program.forward` of executorch 1.5.1).
    program = _load_for_executorch(str(path))
    return program.forward((tokens,))[0]
