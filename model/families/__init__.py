"""The families attn runs, one file each: a config.json reader and a weight-name table (see common.py).

    gpt2.py      GPT-2                       learned positions, Conv1D weights
    llama.py     Llama, Mistral, Qwen2       the Llama layout (and the GGUF name table)
    qwen3.py     Qwen3                       + q/k RMSNorm per head
    gemma.py     Gemma 2, Gemma 3 (text)     four norms, (1 + w), soft-caps, local/global layers
    phi3.py      Phi-3, Phi-4-mini           fused weights, LongRoPE, partial rotary
    olmo2.py     OLMo 2                      norms after sublayers, q/k RMSNorm over the projection
    gpt_neox.py  GPT-NeoX, Pythia            parallel residual, partial rotary, per-head fused q|k|v
"""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig
from model.errors import AttnError
from model.families import gemma, gpt2, gpt_neox, llama, olmo2, phi3, qwen3
from model.families.common import Family, GgufArch

FAMILIES: dict[str, Family] = {mt: f.FAMILY for f in (gpt2, llama, qwen3, gemma, phi3, olmo2, gpt_neox) for mt in f.FAMILY.model_types}
SUPPORTED_TYPES = tuple(FAMILIES)

# GGUF `general.architecture` → how its files convert (weights/gguf.py reads these; so does int4 loading).
GGUF_ARCHITECTURES: dict[str, GgufArch] = {**llama.GGUF}


def family(model_type: str) -> Family:
    f = FAMILIES.get(model_type)
    if f is None:
        raise AttnError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_TYPES)}")
    return f


def read_config(d: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from a config.json dict, by its model_type's family; one clear error for a missing key."""
    mt = d.get("model_type")
    f = family(mt)
    try:
        return f.read_config(d)
    except KeyError as e:
        raise AttnError(f"config.json: missing key {e.args[0]!r} for model_type {mt!r}") from None
    except (TypeError, ValueError) as e:  # a string where a number belongs, and the like
        raise AttnError(f"config.json: a value of the wrong type for model_type {mt!r} ({e})") from None
