"""The tokenizer side: tokenizer.json through `tokenizers`, sandboxed chat templates, streaming text."""

from __future__ import annotations

import codecs
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from model.config import read_json_object
from model.errors import AttnError


class Tokenizer:
    def __init__(self, path: Path) -> None:
        path = Path(path)
        f = path / "tokenizer.json"
        if not f.is_file():
            raise AttnError(f"{path}: no tokenizer.json")
        try:
            self.tk = HFTokenizer.from_file(str(f))
        except Exception as e:  # the Rust side raises plain Exceptions for every parse problem
            raise AttnError(f"{f}: unreadable tokenizer ({str(e).splitlines()[0][:200]})") from None
        self.config = read_json_object(path / "tokenizer_config.json")
        template = self.config.get("chat_template")
        if isinstance(template, list):  # a list of named templates: take the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja = path / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        self.chat_template: str | None = template or None
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.special_ids = {i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}
        self._byte_level = type(self.tk.decoder).__name__ == "ByteLevel"
        # SentencePiece's BPE (Llama 2, Mistral v0.1): ▁ for a space and <0xNN> pieces for raw bytes.
        self._sentencepiece = bool(getattr(self.tk.model, "byte_fallback", False))

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> tuple[list[int], list[str]]:
        """Ids and, for each, the exact piece of `text` it covers (empty for added special tokens)."""
        enc = self.tk.encode(text, add_special_tokens=add_special_tokens)
        pieces = []
        for i, (a, b) in zip(enc.ids, enc.offsets):
            pieces.append(text[a:b] if b > a else (self.tk.id_to_token(i) or ""))
        return enc.ids, pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_label(self, token_id: int) -> str:
        """A readable label for one token id (for tables, not for building text)."""
        one = [token_id]
        return self.tk.decode(one, skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (byte-level BPE maps each byte to one printable character)."""
        piece = self.tk.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level and all(c in _UNICODE_TO_BYTE for c in piece):
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback: one raw byte
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        if self._sentencepiece and token_id not in self.special_ids:
            # Decoding one piece alone would strip the space its ▁ stands for (the decoder drops the text's first space).
            return piece.replace("▁", " ").encode("utf-8")
        return self.token_label(token_id).encode("utf-8")

    def stream(self, prompt_ids: list[int]) -> "TextStream":
        return TextStream(self, prompt_ids)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat template applied to messages, in jinja2's sandbox (templates come from model files)."""
        if not self.chat_template:
            raise AttnError("this model has no chat template; use --raw")
        from jinja2 import TemplateError  # imported here: raw prompts never pay for jinja2
        from jinja2.exceptions import SecurityError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except SecurityError as e:
            raise AttnError(f"chat template refused by the sandbox: {e}") from None
        except TemplateError as e:
            raise AttnError(f"chat template failed: {e}") from None
        except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError, RecursionError) as e:  # (a template that is no string, a huge range, …)
            raise AttnError(f"chat template failed: {type(e).__name__}: {e}") from None


class TextStream:
    """Generated ids in, text chunks out: DecodeStream seeded with the prompt, so the first token keeps its space."""

    def __init__(self, tokenizer: "Tokenizer", prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ds = DecodeStream(ids=list(prompt_ids), skip_special_tokens=True)
        self.held: list[int] = []  # ids pushed since DecodeStream last gave text

    def push(self, token_id: int) -> str:
        out = self.ds.step(self.tokenizer.tk, token_id) or ""
        self.held = [] if out else [*self.held, token_id]
        return out

    def flush(self) -> str:
        """The text DecodeStream still holds when generation ends. It waits while its text ends in U+FFFD, as an
        unfinished character decodes: a token that is U+FFFD itself comes out here; bytes of a character the end
        cut short do not (they are no character)."""
        tk = self.tokenizer
        data = b"".join(tk.token_bytes(i) for i in self.held if i not in tk.special_ids)
        self.held = []
        return codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=False)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table, as byte-level BPE vocabularies use it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def _raise_exception(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def _token_str(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None
