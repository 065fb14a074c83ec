"""`attn explore` and its page, in a real headless browser (Debian's chromium driven by Playwright):
the page loads from file:// with no errors and no request, shows what `attn inspect --format json`
prints within the precision it states, follows the keyboard and the URL fragment, shows masked keys
as masked, and answers a click on a 2,048-token page in under 200 ms. The real model: a 256-token
page of every layer stays ≤ 20 MB, and the screenshots in docs/ are made here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from cli.explore import max_tokens
from model.tokenizer import Tokenizer

SENTENCE = "a fluffy blue creature roamed the verdant forest"
CHROMIUM = os.environ.get("ATTN_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The page states: scores within ±1/512, weights and value norms within 0.4%, shown to 4 significant
# digits (scores to 3 decimals). Tolerances: storage + display rounding.
REL = 0.004 + 0.0005
SCORE_ABS = 1 / 512 + 0.0005


# --- no browser ----------------------------------------------------------------------------------


def test_every_layer_is_kept_up_to_256_tokens_of_the_default_model():
    assert max_tokens(30, 9) == 256


def test_usage_errors_are_one_line(attn, tiny_llama, tmp_path):
    def one_line(r, *needles):
        assert r.code == 2 and r.out == "", r
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("attn: error: "), r.err
        assert all(n in lines[0] for n in needles), lines[0]

    one_line(attn(["explore", "-m", str(tiny_llama), SENTENCE, "-o", str(tmp_path / "x.svg")]), ".html")
    one_line(attn(["explore", "-m", str(tiny_llama), SENTENCE, "-l", "5", "-o", str(tmp_path / "x.html")]), "--layer 5")
    assert not list(tmp_path.iterdir())


def page_meta(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    return json.loads(re.search(r'<script type="application/json" id="attn-meta">(.*?)</script>', text, re.S).group(1))


def test_past_the_budget_only_the_asked_layers_are_kept(attn, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr("cli.explore.ENTRY_BUDGET", 100)  # 4 heads × 2 layers × T(T+1)/2 pairs is over it
    out = tmp_path / "p.html"
    r = attn(["explore", "-m", str(tiny_llama), SENTENCE, "-o", str(out)])
    assert r.code == 2 and "--layer" in r.err and not out.exists(), r
    r = attn(["explore", "-m", str(tiny_llama), SENTENCE, "-l", "-1", "-o", str(out)])
    assert r.code == 0 and r.out == "" and "1 of 2 layers" in r.err, r
    meta = page_meta(out)
    assert meta["layers"] == [1] and meta["stored"].startswith("layer 1 of 2 only")


def test_wheel_carries_the_page_assets(tmp_path):
    """A non-editable install has the template, script and style (package data)."""
    root = Path(__file__).resolve().parents[1]
    try:
        import setuptools  # noqa: F401
    except ImportError:  # pragma: no cover
        pytest.skip("setuptools is not installed")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("attn-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"cli/assets/explorer.html", "cli/assets/explorer.js", "cli/assets/explorer.css"} <= names


# --- the browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium (Debian's) for the module, with a fresh profile; a 1280×800 viewport."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium; .ci/run does)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS[1:], viewport={"width": 1280, "height": 800}
        )
        yield ctx
        ctx.close()


class Opened:
    """A page opened from file://, with its console errors, uncaught errors and requests recorded."""

    def __init__(self, ctx, path: Path, fragment: str = "") -> None:
        self.url = path.as_uri()
        self.page = ctx.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(self.url + fragment)
        self.page.wait_for_selector("body[data-ready='1']", timeout=60_000)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.page.close()

    def shown(self) -> list[str]:
        """What hovering each token of the strip shows: the part of its tooltip after the dash."""
        titles = self.page.eval_on_selector_all("#strip .tok", "els => els.map(e => e.title)")
        return [t.rsplit(" — ", 1)[1] for t in titles]

    def fragment(self) -> dict[str, str]:
        from urllib.parse import parse_qsl

        return dict(parse_qsl(self.page.evaluate("location.hash").lstrip("#")))

    def click_head(self, layer: int, head: int, **kw) -> None:
        box = self.page.evaluate("([l, h]) => attnExplorer.headBox(l, h)", [layer, head])
        self.page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, **kw)


def number(shown: str) -> float:
    return float(shown.split()[-1])


GEN = ["--generate", "4", "--temp", "0", "--ignore-eos"]


@pytest.fixture(scope="module")
def tiny_page(tmp_path_factory, tiny_models):
    """The tiny GQA Llama's page for the sentence and 4 greedy tokens (2 layers × 4 heads, 2 KV heads)."""
    from tests.conftest import run_cli

    path = tiny_models["llama"][0]
    out = tmp_path_factory.mktemp("page") / "page.html"
    r = run_cli(["explore", "-m", str(path), SENTENCE, *GEN, "-o", str(out)])
    assert r.code == 0 and r.out == "" and "wrote" in r.err, r
    return path, out


def test_page_loads_from_file_with_no_error_and_no_request(browser, tiny_page):
    path, out = tiny_page
    text = out.read_text(encoding="utf-8")
    assert "default-src 'none'" in text  # the page forbids itself any fetch
    for ref in ("http://", "https://", "<link", "src=", "@import", "url("):
        assert ref not in text, ref
    with Opened(browser, out) as o:
        assert o.errors == []
        assert o.requests == [o.url]  # the file itself, nothing else
        meta = page_meta(out)
        n_prompt = len(Tokenizer(path).encode(SENTENCE))
        assert meta["prompt_tokens"] == n_prompt and len(meta["ids"]) == n_prompt + 4
        gen = o.page.eval_on_selector_all("#strip .tok.gen", "els => els.map(e => +e.dataset.i)")
        assert gen == list(range(n_prompt, n_prompt + 4))  # generated tokens marked apart
        assert o.page.locator("#strip .sep").count() == 1
        assert "␣" in o.page.inner_text("#strip") and "\ufffd" not in o.page.inner_text("#strip")
        assert "0.4%" in o.page.inner_text("#precision")  # the precision is stated on the page
        assert o.page.evaluate("location.hash").startswith("#t=")


def test_tokens_are_shown_by_the_one_label_rule(attn, browser, tiny_llama, tmp_path):
    """␣ for a space, ↵ for a newline, a byte of a character the token does not hold whole as <0xE7>."""
    from cli.tokens import show, text_of

    out = tmp_path / "cat.html"
    assert attn(["explore", "-m", str(tiny_llama), "a 猫\nsat", "-o", str(out)]).code == 0
    raw = [bytes.fromhex(h) for h in page_meta(out)["bytes"]]
    with Opened(browser, out) as o:
        shown = o.page.eval_on_selector_all("#strip .tok", "els => els.map(e => e.textContent)")
        assert shown == [show(text_of(b)) for b in raw]
        assert "<0xE7>" in shown and "↵" in "".join(shown) and "␣" in "".join(shown)
        assert "\ufffd" not in o.page.inner_text("body")
        o.page.fill("#find", "猫")  # --find matches the bytes of a character split over tokens
        assert o.page.eval_on_selector_all("#strip .tok.found", "els => els.length") == 3
        assert o.errors == []


@pytest.mark.parametrize("token, layer, head", [(5, 1, 2), (-2, 0, 1)])
def test_clicks_show_what_inspect_prints(attn, browser, tiny_page, token, layer, head):
    path, out = tiny_page
    with Opened(browser, out) as o:
        n = len(page_meta(out)["ids"])
        i = token % n
        o.page.click(f'#strip .tok[data-i="{i}"]')
        o.click_head(layer, head)
        for view in ("weights", "scores", "value-norms"):
            o.page.click(f'#view button[data-v="{view}"]')
            for direction in ("from", "to"):
                o.page.click(f'#dir button[data-v="{direction}"]')
                for skip in (False, True):
                    if o.page.is_checked("#skip") != skip:
                        o.page.click("#skip")
                    args = ["inspect", "-m", str(path), SENTENCE, *GEN, "--token", str(i), "--layer", str(layer), "--head", str(head)]
                    args += ["--values", view, "--direction", direction, "--format", "json"] + (["--skip-first"] if skip else [])
                    r = attn(args)
                    assert r.code == 0, r
                    d = json.loads(r.out)
                    assert [t["id"] for t in d["tokens"]] == page_meta(out)["ids"]
                    (h,) = d["heads"]
                    shown = o.shown()
                    where = f"{view} {direction} skip={skip}"
                    for p, want in zip(d["positions"], h["values"]):
                        got = number(shown[p])
                        tol = SCORE_ABS if view == "scores" else REL * abs(want) + 1e-30
                        assert abs(got - want) <= tol, (where, p, got, want)
                    left = set(range(n)) - set(d["positions"])
                    assert all(not re.match(r"^(weight|score|value norm) ", shown[p]) for p in left), where
                    share = o.page.inner_text("#details").split("first-token share")[1]
                    assert re.search(rf"L{layer} h{head}\s+{re.escape(short(h['first_token_share']))}", share), (where, share)
        assert o.errors == []


def short(x: float) -> str:
    s = f"{x:.2f}"
    return s[1:] if s.startswith("0.") else s


def test_keyboard_moves_token_layer_and_head(browser, tiny_page):
    _, out = tiny_page
    with Opened(browser, out, "#t=5&h=0.0") as o:
        page = o.page
        page.keyboard.press("ArrowRight")
        assert o.fragment()["t"] == "6" and page.locator('#strip .tok.q').get_attribute("data-i") == "6"
        page.keyboard.press("ArrowLeft")
        page.keyboard.press("ArrowLeft")
        assert o.fragment()["t"] == "4"
        page.keyboard.press("ArrowDown")
        assert o.fragment()["h"] == "1.0" and "layer 1 head 0" in page.inner_text("#matrix-caption")
        page.keyboard.press("Shift+ArrowRight")
        assert o.fragment()["h"] == "1.1"
        page.keyboard.press("Shift+ArrowLeft")
        page.keyboard.press("Shift+ArrowLeft")
        assert o.fragment()["h"] == "1.3"  # wraps around
        page.keyboard.press("ArrowUp")
        assert o.fragment()["h"] == "0.3"
        page.keyboard.press("End")
        assert o.fragment()["t"] == str(len(page_meta(out)["ids"]) - 1)
        page.keyboard.press("Home")
        page.keyboard.press("d")
        page.keyboard.press("v")
        page.keyboard.press("s")
        f = o.fragment()
        assert (f["t"], f["dir"], f["view"], f["skip"]) == ("0", "to", "scores", "1")
        assert page.get_attribute('#dir button[data-v="to"]', "aria-pressed") == "true"
        page.keyboard.press("m")
        assert o.fragment()["big"] == "1" and page.locator("#grid-panel").is_hidden()
        page.keyboard.press("Escape")
        assert "big" not in o.fragment() and page.locator("#grid-panel").is_visible()
        assert o.errors == []


def test_hover_previews_a_token_until_a_click_locks_one(browser, tiny_page):
    _, out = tiny_page
    with Opened(browser, out, "#t=5") as o:
        page, q = o.page, lambda: o.page.locator("#strip .tok.q").get_attribute("data-i")
        page.hover('#strip .tok[data-i="8"]')
        assert q() == "8" and o.fragment()["t"] == "5"  # a preview: the address keeps the chosen token
        page.mouse.move(5, 5)  # off the strip: back to the chosen token
        assert q() == "5"
        page.click('#strip .tok[data-i="3"]')
        page.hover('#strip .tok[data-i="9"]')
        assert q() == "3" and o.fragment()["t"] == "3" and "locked" in page.inner_text("#strip-caption")
        page.click('#strip .tok[data-i="3"]')  # the locked token again: unlocked
        page.hover('#strip .tok[data-i="9"]')
        assert q() == "9"
        assert o.errors == []


def test_url_fragment_restores_a_view(attn, browser, tiny_page):
    path, out = tiny_page
    with Opened(browser, out, "#t=9&h=1.2&dir=to&view=value-norms&skip=1&find=blue&theme=dark") as o:
        page = o.page
        assert page.locator("#strip .tok.q").get_attribute("data-i") == "9"
        assert page.get_attribute('#view button[data-v="value-norms"]', "aria-pressed") == "true"
        assert page.get_attribute('#dir button[data-v="to"]', "aria-pressed") == "true"
        assert page.is_checked("#skip") and page.input_value("#find") == "blue"
        assert page.evaluate("document.documentElement.dataset.theme") == "dark"
        assert "layer 1 head 2" in page.inner_text("#matrix-caption")
        args = ["inspect", "-m", str(path), SENTENCE, *GEN, "-t", "9", "-l", "1", "--head", "2", "--direction", "to"]
        d = json.loads(attn(args + ["--values", "value-norms", "--skip-first", "--format", "json"]).out)
        shown = o.shown()
        for p, want in zip(d["positions"], d["heads"][0]["values"]):
            assert abs(number(shown[p]) - want) <= REL * want + 1e-30
        # --find in the page ranks heads as `attn inspect --find` does (here in --direction to: tokens after 9).
        ranked = page.eval_on_selector_all("#ranking button", "bs => bs.map(b => [+b.dataset.l, +b.dataset.h])")
        ref = attn(args[:-4] + ["--direction", "to", "--values", "value-norms", "--skip-first", "--find", "blue", "--format", "json"])
        if ref.code == 0:
            want = [[h["layer"], h["head"]] for h in json.loads(ref.out)["heads"]][: len(ranked)]
            assert ranked == want
        else:  # no "blue" after token 9: the page says so too
            assert "matches only" in page.inner_text("#ranking")
        assert o.errors == []


def test_find_ranks_heads_as_inspect_does(attn, browser, tiny_page):
    path, out = tiny_page
    with Opened(browser, out, "#t=12") as o:
        o.page.fill("#find", "blue")
        ranked = o.page.eval_on_selector_all("#ranking button", "bs => bs.map(b => [+b.dataset.l, +b.dataset.h])")
        d = json.loads(attn(["inspect", "-m", str(path), SENTENCE, *GEN, "-t", "12", "--find", "blue", "--format", "json"]).out)
        assert ranked == [[h["layer"], h["head"]] for h in d["heads"]]
        found = o.page.eval_on_selector_all("#strip .tok.found", "els => els.map(e => +e.dataset.i)")
        assert found == d["find"]["positions"]
        assert o.fragment()["find"] == "blue"
        o.page.click("#ranking button >> nth=1")
        assert o.fragment()["h"] == "{}.{}".format(*ranked[1])
        o.page.click("#skip")  # with --skip-first: renormalised values, heads with almost nothing off the first token last
        ranked = o.page.eval_on_selector_all("#ranking button", "bs => bs.map(b => [+b.dataset.l, +b.dataset.h])")
        d = json.loads(attn(["inspect", "-m", str(path), SENTENCE, *GEN, "-t", "12", "--find", "blue", "--skip-first", "--format", "json"]).out)
        assert ranked == [[h["layer"], h["head"]] for h in d["heads"]]


def test_masked_keys_show_as_masked_not_zero(attn, browser, tiny_models, tmp_path):
    """A sliding window (the tiny Mistral's: 6 keys) reaches the page as masked keys, never as zero weights."""
    path = tiny_models["mistral_window"][0]
    out = tmp_path / "window.html"
    assert attn(["explore", "-m", str(path), SENTENCE, "-o", str(out)]).code == 0
    with Opened(browser, out, "#t=10&h=1.1") as o:
        shown = o.shown()
        assert [s == "masked" for s in shown[:11]] == [True] * 5 + [False] * 6  # keys 5..10 are the window of query 10
        assert sum(number(s) for s in shown[5:11]) == pytest.approx(1.0, abs=5e-3)
        assert o.page.locator("#strip .tok.masked").count() == 5
        d = json.loads(attn(["inspect", "-m", str(path), SENTENCE, "-t", "10", "-l", "1", "--head", "1", "--format", "json"]).out)
        assert [v is None for v in d["heads"][0]["values"]] == [True] * 5 + [False] * 6  # as inspect says: null
        for p, want in zip(d["positions"][5:], d["heads"][0]["values"][5:]):
            assert abs(number(shown[p]) - want) <= REL * want + 1e-30
        box = o.page.locator("#matrix").bounding_box()
        cell = box["width"] / len(page_meta(out)["ids"])
        o.page.mouse.move(box["x"] + 2.5 * cell, box["y"] + 10.5 * cell)  # query 10, key 2
        assert "outside the layer's attention window" in o.page.inner_text("#readout")
        o.page.mouse.move(box["x"] + 12.5 * cell, box["y"] + 10.5 * cell)  # query 10, key 12
        assert "causal mask" in o.page.inner_text("#readout")
        o.page.mouse.move(box["x"] + 9.5 * cell, box["y"] + 10.5 * cell)
        assert "weight 0." in o.page.inner_text("#readout")
        assert o.errors == []


# --- a long prompt ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory, tokenizer_json) -> Path:
    """A tiny Llama shaped like the default model's attention (9 query heads on 3 KV heads), with a context for 2,048 tokens."""
    import transformers as tf

    from tests.conftest import SPECIALS

    vocab = len(json.loads(tokenizer_json.read_text())["model"]["vocab"]) + len(SPECIALS)
    cfg = tf.LlamaConfig(
        vocab_size=vocab, hidden_size=72, intermediate_size=128, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2304, tie_word_embeddings=True, bos_token_id=None, eos_token_id=0,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("long")
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(out, safe_serialization=True)
    shutil.copy(tokenizer_json, out / "tokenizer.json")
    return out


def prompt_of(path: Path, n: int, source: str) -> str:
    """A text of exactly n tokens for the model at `path`, cut from `source` repeated."""
    tk = Tokenizer(path)
    ids = tk.encode(source * (1 + 4 * n // max(1, len(tk.encode(source)))), add_special_tokens=False)[:n]
    text = tk.decode(ids)
    while len(tk.encode(text, add_special_tokens=False)) > n:
        text = text[:-1]
    assert len(tk.encode(text, add_special_tokens=False)) == n
    return text


CLICK_MS = """async (i) => {
  const el = document.querySelector(`#strip .tok[data-i="${i}"]`);
  const t0 = performance.now();
  el.click();
  await new Promise((done) => requestAnimationFrame(() => setTimeout(done, 0)));  // until the frame is drawn
  return performance.now() - t0;
}"""


def test_2048_tokens_one_layer_answers_a_click_within_200_ms(attn, browser, long_llama, tmp_path, capsys):
    from tests.conftest import CORPUS

    text = prompt_of(long_llama, 2048, " ".join(CORPUS[:2]) + " ")
    out = tmp_path / "long.html"
    r = attn(["explore", "-m", str(long_llama), text, "-l", "1", "-o", str(out)])
    assert r.code == 0, r
    meta = page_meta(out)
    assert len(meta["ids"]) == 2048 and meta["layers"] == [1]
    with Opened(browser, out) as o:
        assert "layer 1 of 2 only" in o.page.inner_text("#summary")
        load = o.page.evaluate("attnExplorer.loadMs")
        o.page.evaluate(CLICK_MS, 10)  # the first click also compiles the handlers: not counted
        times = [o.page.evaluate(CLICK_MS, i) for i in (1024, 2047, 3, 1500, 700)]
        o.click_head(1, 7)
        times.append(o.page.evaluate(CLICK_MS, 1800))
        assert o.page.locator("#strip .tok.q").get_attribute("data-i") == "1800"
        assert o.errors == []
    size = out.stat().st_size / 1e6
    median = sorted(times)[len(times) // 2]
    with capsys.disabled():
        print(f"\n[explorer] 2,048 tokens × 1 layer × 9 heads: page {size:.1f} MB, load {load:.0f} ms, click "
              f"{min(times):.0f} / {median:.0f} / {max(times):.0f} ms min / median / max (performance.now(), to the next frame)")
    # The median: on 2 shared cores a test run next door can stall one click (the figures above say so).
    assert median < 200, times


# --- the real default model -------------------------------------------------------------------------

REPEATED = "The quick brown fox jumps over the lazy dog while the old cat sleeps by the warm fire."
SHOTS = [  # (file, page, fragment): the page of the sentence + 16 greedy tokens, or of a sentence said twice
    ("explorer-tokens.png", "forest", "#t=3&h=16.0"),
    ("explorer-heads.png", "forest", "#t=3&h=4.2&find=fluffy&theme=dark"),
    ("explorer-matrix.png", "repeated", "#t=30&h=18.6&big=1"),  # the strongest induction head of `attn heads`
]


@pytest.mark.slow
def test_real_model_page_of_256_tokens_is_at_most_20_mb(attn, browser, real_model_dir, tmp_path, capsys):
    text = prompt_of(real_model_dir, 256, Path(__file__).with_name("test_explorer.py").read_text().split('"""')[1])
    out = tmp_path / "real.html"
    r = attn(["explore", "-m", str(real_model_dir), text, "-o", str(out)])
    assert r.code == 0, r
    meta = page_meta(out)
    assert len(meta["ids"]) == 256 and meta["layers"] == list(range(30)) and meta["stored"] == "every layer"
    size = out.stat().st_size
    with Opened(browser, out) as o:
        load = o.page.evaluate("attnExplorer.loadMs")
        click = o.page.evaluate(CLICK_MS, 200)
        assert o.errors == []
    with capsys.disabled():
        print(f"\n[explorer] default model, 256 tokens × 30 layers × 9 heads: page {size / 1e6:.1f} MB, load {load:.0f} ms, click {click:.0f} ms")
    assert size <= 20_000_000


@pytest.mark.slow
def test_real_model_screenshots(attn, browser, real_model_dir, tmp_path):
    """The README's pictures: 1280×800, the token view, the head grid (dark), one matrix large.

    ATTN_SCREENSHOTS=docs writes them into docs/ (how the checked-in ones were made)."""
    pages = {"forest": [SENTENCE, "--generate", "16", "--temp", "0"], "repeated": [f"{REPEATED} {REPEATED}"]}
    for name, args in pages.items():
        r = attn(["explore", "-m", str(real_model_dir), *args, "-o", str(tmp_path / f"{name}.html")])
        assert r.code == 0, r
    where = Path(os.environ.get("ATTN_SCREENSHOTS") or tmp_path)
    for shot, name, fragment in SHOTS:
        with Opened(browser, tmp_path / f"{name}.html", fragment) as o:
            o.page.screenshot(path=str(where / shot))
            png = (where / shot).read_bytes()
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (1280, 800)
        assert o.errors == []
