"""Tests for model_shards.tokenizer: ByteTokenizer layout and round trips, HFTokenizer on a
small byte-level BPE built here, load_tokenizer, and the streaming IncrementalDecoder."""

import json

import pytest

from model_shards.tokenizer import (
    ASSISTANT_TOKEN, BOS_TOKEN, EOS_TOKEN, MIN_BYTE_VOCAB, SPECIAL_TOKENS, THINK_END,
    THINK_START, USER_TOKEN, ByteTokenizer, HFTokenizer, IncrementalDecoder, Tokenizer,
    load_tokenizer,
)

TEXTS = [
    "hello, world",
    "你好，世界！深度求索",
    "emoji: 👍🏽 🇫🇷 👨‍👩‍👧",
    f"{BOS_TOKEN}{USER_TOKEN}hi 你好{ASSISTANT_TOKEN}{THINK_START}r🙂{THINK_END}ok{EOS_TOKEN}",
    "",
]


def test_special_token_strings_are_exact():
    assert BOS_TOKEN == "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
    assert EOS_TOKEN == "<\uff5cend\u2581of\u2581sentence\uff5c>"
    assert USER_TOKEN == "<｜User｜>" and "\uff5c" in USER_TOKEN
    assert len(set(SPECIAL_TOKENS)) == len(SPECIAL_TOKENS) == 13
    assert "<｜read_url｜>" in SPECIAL_TOKENS and "<｜latest_reminder｜>" in SPECIAL_TOKENS


def test_byte_tokenizer_layout():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert MIN_BYTE_VOCAB == tok.vocab_size == 288
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.encode(BOS_TOKEN + EOS_TOKEN + USER_TOKEN) == [0, 1, 2]
    assert tok.encode("A\x00\u00ff") == [32 + 65, 32, 32 + 0xC3, 32 + 0xBF]
    for i in range(288):
        name = tok.id_to_token(i)
        assert name is not None and tok.token_to_id(name) == i
        assert tok.is_special(i) == (i < 32)
    assert tok.id_to_token(32 + 0x41) == "<0x41>"
    assert tok.id_to_token(288) is None and tok.token_to_id("nope") is None


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allow_special=False)) == text


def test_byte_special_handling():
    tok = ByteTokenizer()
    text = f"{USER_TOKEN}hi{THINK_END}"
    assert tok.encode(text) == [2, 32 + ord("h"), 32 + ord("i"), SPECIAL_TOKENS.index(THINK_END)]
    plain = tok.encode(text, allow_special=False)
    assert all(i >= 32 for i in plain) and len(plain) == len(text.encode())
    assert tok.decode(tok.encode(text), skip_special=True) == "hi"
    # reserved and out-of-range ids decode to nothing
    assert tok.decode([31, 32 + ord("a"), 288, 10_000, -1]) == "a"


def test_byte_invalid_utf8_is_replaced():
    tok = ByteTokenizer()
    e4 = 32 + 0xE4  # first byte of a 3-byte sequence
    assert tok.decode([e4]) == "\ufffd"
    assert tok.decode([e4, 32 + ord("a")]) == "\ufffda"
    # a special token ends a byte run
    assert tok.decode([e4, 0, 32 + 0xBD, 32 + 0xA0]) == "\ufffd" + BOS_TOKEN + "\ufffd\ufffd"


def _stream(tok, ids, skip_special=False):
    dec = IncrementalDecoder(tok, skip_special=skip_special)
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.flush()


def _check_incremental(tok, ids, skip_special=False):
    for n in range(len(ids) + 1):
        pieces, tail = _stream(tok, ids[:n], skip_special)
        assert "".join(pieces) + tail == tok.decode(ids[:n], skip_special=skip_special)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_incremental_equals_full_decode(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    _check_incremental(tok, ids)
    _check_incremental(tok, ids, skip_special=True)
    # valid text: every push is whole characters, never a replacement char
    pieces, tail = _stream(tok, ids)
    assert "\ufffd" not in "".join(pieces) and tail == ""


def test_byte_incremental_with_invalid_bytes():
    tok = ByteTokenizer()
    ids = [32 + 0xE4, 32 + ord("x"), 32 + 0xF0, 32 + 0x9F, 0, 32 + 0x98, 32 + 0xE4, 32 + 0xBD]
    _check_incremental(tok, ids)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["hello world, hello there"] * 20 + ["你好世界，深度求索你好"] * 20 + ["👍🏽 🙂 👍🏽"] * 10
    tok.train_from_iterator(corpus, trainer)
    d = tmp_path_factory.mktemp("hf")
    tok.save(str(d / "tokenizer.json"))
    return d


def test_hf_tokenizer_special_ids_and_round_trip(hf_dir):
    tok = HFTokenizer.from_file(hf_dir / "tokenizer.json")
    assert isinstance(tok, Tokenizer)
    assert tok.bos_id == tok.token_to_id(BOS_TOKEN) == 0
    assert tok.eos_id == tok.token_to_id(EOS_TOKEN) == 1
    assert tok.vocab_size >= len(SPECIAL_TOKENS) + 256
    assert tok.is_special(tok.eos_id) and not tok.is_special(tok.encode("h")[0])
    assert tok.id_to_token(tok.token_to_id(USER_TOKEN)) == USER_TOKEN
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    text = f"{USER_TOKEN}hello{ASSISTANT_TOKEN}"
    ids = tok.encode(text)
    assert ids[0] == tok.token_to_id(USER_TOKEN) and ids[-1] == tok.token_to_id(ASSISTANT_TOKEN)
    plain = tok.encode(text, allow_special=False)
    assert tok.token_to_id(USER_TOKEN) not in plain and tok.decode(plain) == text
    assert tok.decode(ids, skip_special=True) == "hello"


@pytest.mark.parametrize("text", TEXTS)
def test_hf_incremental_equals_full_decode(hf_dir, text):
    tok = HFTokenizer.from_file(hf_dir / "tokenizer.json")
    ids = tok.encode(text)
    _check_incremental(tok, ids)
    _check_incremental(tok, ids, skip_special=True)
    pieces, _ = _stream(tok, ids)
    assert "\ufffd" not in "".join(pieces)


def test_hf_tokenizer_config_names_eos(hf_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": BOS_TOKEN}, "eos_token": USER_TOKEN}))
    tok = HFTokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.eos_id == tok.token_to_id(USER_TOKEN) and tok.bos_id == 0


def test_hf_tokenizer_without_eos_is_rejected(tmp_path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models

    HFTok(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "t.json"))
    with pytest.raises(ValueError, match="BOS"):
        HFTokenizer(tmp_path / "t.json")


def test_load_tokenizer_picks_class(hf_dir, tmp_path):
    assert isinstance(load_tokenizer(hf_dir), HFTokenizer)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
