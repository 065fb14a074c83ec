"""The explorer page: the attention of every token, layer and head of a prompt in one HTML file.

The page's markup, script and style are package data (cli/assets/explorer.{html,js,css}); writing a
page fills the template with the tokens (JSON) and the matrices (one zlib stream, base64), which the
browser inflates with its own DecompressionStream. Nothing is fetched: it opens from file://.

What is stored, per stored layer and head (the browser derives the rest):
- scores of the lower triangle (query i, key j ≤ i) as 16-bit steps of 1/256 below the row's
  maximum, `MASKED` where the mask hides a key (a sliding window), so masked never reads as 0;
- each row's maximum score (float32), giving back scores within ±1/512;
- ‖v_j·W_O^h‖ per source (float32), so value norms are α_ij·‖v_j·W_O^h‖.
Weights are the softmax of the stored scores, computed in the page in float64: each rounding moves
a score by at most 1/512, so a weight (and a renormalised weight) is within a factor e^(±2/512) of
float32's, 0.4%. 16 bits per pair compress to ≈ 11.5 bits; the default model's 30 × 9 heads at
256 tokens make a ≈ 17 MB page.
"""

from __future__ import annotations

import base64
import html
import json
import re
import zlib
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from cli.common import write_file
from model.errors import check_finite

STEP = 256  # score steps per unit: |error| ≤ 1/512
MASKED = 0xFFFF  # the key is hidden from this query (score -inf, weight 0)
FAR = 0xFFFE  # 256 or more below the row's maximum (weight ≤ e^-256 of the largest): clamped there
# Every layer is stored while layers × heads × T(T+1)/2 stays under this (the default model: 256
# tokens, ≈ 17 MB); past it only the layers asked for with --layer.
ENTRY_BUDGET = 8_900_000
# Past this many stored pairs (≈ 240 MB of page) browsers struggle to load the file at all.
ENTRY_LIMIT = 128_000_000
PRECISION = (
    "scores within ±1/512 (16-bit steps below each row's maximum); weights, computed in the page as the softmax of "
    "those scores, within 0.4% (relative) of float32's, as are value norms (float32 ‖v·W_O‖ × weight); "
    "shown to 4 significant digits (scores to 3 decimals)"
)


def triangle(T: int) -> int:
    """Stored pairs of one head: query i sees keys 0..i."""
    return T * (T + 1) // 2


class PageStore:
    """A MatrixSink (model/matrices.py) that keeps the page's compact copy of the probed layers."""

    def __init__(self, layers: list[int], n_heads: int, T: int) -> None:
        self.layers = list(layers)
        self.slot = {layer: n for n, layer in enumerate(self.layers)}
        self.T = T
        shape = (len(self.layers), n_heads)
        self.codes = np.empty((*shape, triangle(T)), dtype=np.uint16)  # (nL, H, T(T+1)/2), rows one after another
        self.row_max = np.empty((*shape, T), dtype=np.float32)  # (nL, H, T)
        self.value_norms = np.empty((*shape, T), dtype=np.float32)  # (nL, H, T)

    def rows(self, layer: int, first: int, scores: torch.Tensor) -> None:
        b = scores.shape[2]  # rows first..b-1 against keys 0..b-1
        lower = torch.arange(b, device=scores.device)[None, :] <= torch.arange(first, b, device=scores.device)[:, None]  # (n, b)
        row = lower.nonzero()[:, 0]  # (pairs,): the row of each kept pair, in row-major order
        top = scores.amax(dim=-1)  # (H, n): finite, every row sees at least its own key
        kept = scores[:, lower]  # (H, pairs): the lower triangle, row after row
        check_finite(f"layer {layer}'s attention", kept)
        steps = (top[:, row] - kept).mul_(STEP).round_().clamp_(max=FAR)  # -inf scores became +inf, clamped to FAR…
        steps.masked_fill_(torch.isneginf(kept), MASKED)  # …and are marked masked instead
        lo = triangle(first)
        self.codes[self.slot[layer], :, lo : lo + steps.shape[1]] = steps.to(torch.int32).cpu().numpy()
        self.row_max[self.slot[layer], :, first:b] = top.cpu().numpy()

    def norms(self, layer: int, norms: torch.Tensor) -> None:
        self.value_norms[self.slot[layer]] = norms.float().cpu().numpy()

    def blob(self) -> tuple[bytes, list[dict]]:
        """The zlib stream and the sections it holds, float32 ones first (so each is 4-byte aligned)."""
        parts, sections, at = [], [], 0
        for name, arr in (("row_max", self.row_max), ("value_norms", self.value_norms), ("codes", self.codes)):
            raw = arr.reshape(-1)
            if arr.dtype == np.uint16:
                # Low bytes, then high bytes: the high bytes (distance to the row's max) repeat a lot,
                # and deflate finds that far better when they are not interleaved with the noisy low ones.
                data = raw.view(np.uint8).reshape(-1, 2).T.tobytes()
            else:
                data = raw.tobytes()
            sections.append({"name": name, "offset": at, "count": int(raw.size), "type": str(arr.dtype), "planes": arr.itemsize if arr.dtype == np.uint16 else 1})
            parts.append(data)
            at += len(data)
        return zlib.compress(b"".join(parts), 6), sections


def page_html(meta: dict, blob: bytes) -> str:
    """The template with the style, script, tokens and data filled in (one pass: nothing is re-read)."""
    assets = files("cli").joinpath("assets")
    template = assets.joinpath("explorer.html").read_text(encoding="utf-8")
    fill = {
        "TITLE": html.escape(meta["title"]),
        "STYLE": assets.joinpath("explorer.css").read_text(encoding="utf-8"),
        "SCRIPT": assets.joinpath("explorer.js").read_text(encoding="utf-8"),
        # "<" escaped: a token's text could otherwise close the <script> element that holds the JSON.
        "META": json.dumps(meta, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c"),
        "DATA": base64.b64encode(blob).decode("ascii"),
    }
    return re.sub(r"@(TITLE|STYLE|SCRIPT|META|DATA)@", lambda m: fill[m.group(1)], template)


def write_page(path: Path, meta: dict, store: PageStore) -> int:
    """Write the page atomically; its size in bytes."""
    blob, sections = store.blob()
    meta = {**meta, "sections": sections, "precision": PRECISION, "step": STEP, "masked": MASKED}
    text = page_html(meta, blob).encode("utf-8")
    write_file(path, text)
    return len(text)
