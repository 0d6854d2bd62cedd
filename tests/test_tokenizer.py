"""Tokenizers: byte-level layout, SentencePiece (trained by the CLI, or foreign), tokenizer.json, errors."""
import json
import random
import string

import pytest

from llm_jax.data import tokenizer as tokenizer_lib

# Text a tokenizer must round-trip exactly: indentation, tabs, CRLF, accents, CJK, emoji.
TRICKY_TEXT = "def f(x):\n    return x  # é 中文 🙂\n\tdone\r\n\n"


def test_byte_tokenizer_layout_and_round_trip():
    tok = tokenizer_lib.ByteTokenizer()
    assert (tok.pad_id, tok.eos_id, tok.mask_id, tok.num_special, tok.vocab_size) == (0, 1, 2, 3, 259)
    assert tok.encode("A\x00\xff") == [ord("A") + 3, 3, 0xC3 + 3, 0xBF + 3]  # UTF-8 bytes + 3
    ids = tok.encode(TRICKY_TEXT)
    assert min(ids) >= tok.num_special and max(ids) < tok.vocab_size
    assert tok.decode(ids) == TRICKY_TEXT


def test_byte_tokenizer_decode_skips_specials_and_replaces_broken_utf8():
    tok = tokenizer_lib.ByteTokenizer()
    hi = tok.encode("hi")
    assert tok.decode([tok.pad_id, *hi, tok.eos_id, tok.mask_id, 300]) == "hi"
    assert tok.decode([0xC3 + 3]) == "\ufffd"  # a lone lead byte


def test_get_tokenizer_names_the_field_for_unknown_names():
    assert isinstance(tokenizer_lib.get_tokenizer("byte"), tokenizer_lib.ByteTokenizer)
    with pytest.raises(ValueError, match=r"data\.tokenizer='bpe'.*byte.*sentencepiece"):
        tokenizer_lib.get_tokenizer("bpe")


def test_training_sentences_keep_all_text_within_the_limit():
    documents = ["short\nlines\n", "x" * 25 + "\nend"]
    sentences = list(tokenizer_lib._training_sentences(documents, max_sentence_chars=10))
    assert "".join(sentences) == "".join(documents)
    assert max(len(s) for s in sentences) <= 10


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    """A 400-piece model trained through the CLI on a few KB of varied text."""
    root = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7))) for _ in range(300)]
    for i in range(3):
        lines = [" ".join(rng.choices(words[: 50 * (i + 2)], k=12)) + ".\n" for _ in range(200)]
        (root / f"doc{i}.txt").write_text("the quick brown fox\n" + "".join(lines))
    model_path = tokenizer_lib.main([
        "train", "--dataset=files", f"--files={root}/*.txt", f"--tfds_data_dir={root}/tfds",
        "--validation_fraction=0.3", "--vocab_size=400", f"--output={root}/model/spm400",
    ])
    assert model_path == f"{root}/model/spm400.model"
    return model_path


def test_sentencepiece_layout_and_round_trip(sentencepiece_model):
    tok = tokenizer_lib.get_tokenizer("sentencepiece", sentencepiece_model)
    assert (tok.pad_id, tok.eos_id, tok.mask_id, tok.num_special, tok.vocab_size) == (0, 1, 3, 4, 400)
    # Unseen characters (CJK, emoji) come back through byte fallback.
    for text in (TRICKY_TEXT, "the quick brown fox", "[MASK] stays text"):
        ids = tok.encode(text)
        assert min(ids) >= tok.num_special, "encode must never produce a special id"
        assert tok.decode(ids) == text
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # it learnt pieces


def test_sentencepiece_bad_model_files_name_the_file(tmp_path):
    missing = str(tmp_path / "missing.model")
    with pytest.raises(ValueError, match=r"data\.tokenizer_path=.*missing\.model"):
        tokenizer_lib.SentencePieceTokenizer(missing)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"garbage\.model.*cannot load"):
        tokenizer_lib.SentencePieceTokenizer(str(garbage))
    with pytest.raises(ValueError, match=r"data\.tokenizer_path is empty"):
        tokenizer_lib.get_tokenizer("sentencepiece", "")


def write_hf_tokenizer(folder, *, vocab_size=300, config=None) -> str:
    """A byte-level BPE tokenizer.json built with the `tokenizers` library (specials <pad>, </s>,
    <mask> first), and a tokenizer_config.json when `config` is given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 3, "sort: 3 1 2\n1 2 3"] * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder / "tokenizer.json")


def test_huggingface_tokenizer_json_layout_and_round_trip(tmp_path):
    path = write_hf_tokenizer(tmp_path / "hf")
    for where in (path, str(tmp_path / "hf")):  # the file, or the folder holding it
        tok = tokenizer_lib.get_tokenizer("huggingface", where)
        assert (tok.pad_id, tok.eos_id, tok.mask_id, tok.num_special) == (0, 1, 2, 3)
        assert 259 <= tok.vocab_size <= 300
        ids = tok.encode(TRICKY_TEXT)
        assert min(ids) >= tok.num_special and tok.decode(ids) == TRICKY_TEXT
        assert tok.decode([tok.eos_id, *tok.encode("fox"), tok.vocab_size + 5]) == "fox"  # specials, padding rows
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")
    record = tokenizer_lib.fingerprint("huggingface", str(tmp_path / "hf"), tok)
    assert record == tokenizer_lib.fingerprint("huggingface", path, tok) and len(record["sha256"]) == 64


def test_huggingface_tokenizer_specials_from_its_config_and_errors(tmp_path):
    path = write_hf_tokenizer(tmp_path / "named", config={"eos_token": {"content": "<pad>"}, "pad_token": "</s>"})
    tok = tokenizer_lib.get_tokenizer("huggingface", path)
    assert (tok.eos_id, tok.pad_id) == (0, 1)  # as tokenizer_config.json names them
    with pytest.raises(ValueError, match=r"data\.tokenizer_path=.*missing.*cannot load a Hugging Face tokenizer"):
        tokenizer_lib.get_tokenizer("huggingface", str(tmp_path / "missing"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json"):
        tokenizer_lib.get_tokenizer("huggingface", str(tmp_path / "bad.json"))


def test_sentencepiece_model_with_foreign_special_ids(tmp_path):
    """A .model with SentencePiece's default layout (LLaMA's: unk 0, bos 1, eos 2, no pad, no
    [MASK]) loads with its own ids: pad falls back to eos, no mask id, 3 leading specials."""
    import sentencepiece as spm

    rng = random.Random(0)
    text = [" ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 6))) for _ in range(12))
            for _ in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(tmp_path / "llama_like"),
                                   vocab_size=300, byte_fallback=True, minloglevel=2, num_threads=1)
    tok = tokenizer_lib.get_tokenizer("sentencepiece", str(tmp_path / "llama_like.model"))
    assert (tok.pad_id, tok.eos_id, tok.mask_id, tok.num_special, tok.vocab_size) == (2, 2, -1, 3, 300)
    ids = tok.encode("hello world")
    assert min(ids) >= tok.num_special and tok.decode(ids) == "hello world"
