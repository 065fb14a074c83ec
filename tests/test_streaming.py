"""Streaming text: DecodeStream chunks add up to the whole decode, UTF-8 intact, spaces kept."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from model.engine import StopStrings
from model.tokenizer import Tokenizer
from tests.conftest import CORPUS, train_tokenizer

TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(list("abc xyz  \n\t")),
        st.sampled_from(list("éüñçøß")),
        st.sampled_from(list("我们今天公园好")),
        st.sampled_from(["😀", "🎉", "👍", "\U0001F3FD", "✨", "🚀"]),
        st.characters(blacklist_categories=("Cs",)),
    ),
    max_size=60,
)


@pytest.fixture(scope="module", params=[300, 1000])
def tok(request, tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp(f"tok{request.param}")
    train_tokenizer(request.param).save(str(d / "tokenizer.json"))
    return Tokenizer(d)


def streamed(tok: Tokenizer, prompt_ids: list[int], ids: list[int]) -> str:
    stream = tok.stream(prompt_ids)
    return "".join(stream.push(i) for i in ids)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_ids_stream_to_the_full_decode(tok, data):
    n = tok.vocab_size
    ids = data.draw(st.lists(st.integers(3, n - 1), max_size=40))  # 0..2 are special tokens
    full = tok.decode(ids)
    assume("\ufffd" not in full)  # a sequence of stray bytes has no text to stream
    assert streamed(tok, [], ids) == full


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=TEXT, text=TEXT)
def test_valid_text_streams_exactly_after_a_prompt(tok, prompt, text):
    p = tok.encode(prompt)
    ids = tok.encode(prompt + text)[len(p) :] if tok.encode(prompt + text)[: len(p)] == p else tok.encode(text)
    out = streamed(tok, p, ids)
    assert "\ufffd" not in out
    assert tok.decode(p) + out == tok.decode(p + ids)


def test_first_generated_token_keeps_its_leading_space(tok):
    p = tok.encode("a fluffy blue")
    ids = tok.encode("a fluffy blue creature")[len(p) :]
    assert streamed(tok, p, ids) == " creature"


def test_multibyte_characters_are_never_split(tok):
    for text in CORPUS:
        ids = tok.encode(text)
        stream = tok.stream([])
        chunks = [stream.push(i) for i in ids]
        assert "".join(chunks) == text
        assert all("\ufffd" not in c for c in chunks)


def test_what_the_decoder_holds_at_the_end(tok):
    """DecodeStream waits while its text ends in U+FFFD (an unfinished character decodes so): at the end, `flush`
    gives a real U+FFFD (the character itself, or a byte that can start none), never the bytes of a cut character."""
    def ended(ids: list[int]) -> str:
        stream = tok.stream([])
        return "".join(stream.push(i) for i in ids) + stream.flush()

    for text in ("ok \ufffd", "ok \ufffd\ufffd"):
        assert ended(tok.encode(text)) == text
    cut = tok.encode("我")[:-1]  # (byte tokens here: the character's last byte never comes)
    assert cut and ended(tok.encode("ok ") + cut) == "ok "
    assert ended(tok.encode("ok ") + cut + tok.encode("\ufffd")) == "ok \ufffd\ufffd"  # a cut character in the middle is one U+FFFD


@given(text=st.text(max_size=40), stop=st.text(min_size=1, max_size=5), cuts=st.lists(st.integers(0, 40), max_size=8))
def test_stop_strings_found_across_chunk_boundaries(text, stop, cuts):
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    s = StopStrings([stop])
    shown = ""
    for a, b in zip(bounds, bounds[1:]):
        shown += s.push(text[a:b])
        if s.matched:
            break
    if s.matched is None:
        shown += s.flush()
    if stop in text:
        assert s.matched == stop and shown == text[: text.index(stop)]
    else:
        assert s.matched is None and shown == text


def test_stop_string_prefix_is_held_back_until_decided():
    s = StopStrings(["</end>"])
    assert s.push("hello </") == "hello "
    assert s.push("en") == ""
    assert s.push("tire") == "</entire"
