"""Vision-language rows: the processor's inputs, image tokens out of the loss, a text side
aligned on the text, bad images reported (kdcore/data/images.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from kdcore.data import BadRow, collate, normalize_row, prepare_data
from kdcore.data.images import processor_for, tokenize_side
from kdcore.modeling.tokenizers import load_tokenizer


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def toks(vl_assets):
    return {k: load_tokenizer(str(vl_assets[k])) for k in ("teacher", "student", "text_student")}


def image_ids(tok) -> set[int]:
    return {tok.convert_tokens_to_ids("<image>")}


def test_samples_carry_exactly_the_processors_inputs(vl_assets, toks):
    data = prepare_data({"train": str(vl_assets["train"]), "eval_size": 0}, toks["student"], toks["teacher"])
    assert data.report.train.bad_rows == 0 and len(data.train) == 24
    # one tokenizer and processor on both sides: the teacher reads the student's ids and pixels
    assert all(s.teacher is None for s in data.train)
    proc = processor_for(toks["teacher"])
    from PIL import Image

    for s in data.train[:4]:
        row = rows(vl_assets["train"])[s.row]
        text = proc.apply_chat_template([{"role": m["role"], "content": [
            {"type": p["type"], **({"text": p["text"]} if p["type"] == "text" else {})} for p in m["content"]]}
            for m in row["messages"]], tokenize=False)
        image = Image.open(vl_assets["root"] / row["messages"][0]["content"][0]["image"]).convert("RGB")
        ref = proc(text=[text], images=[image], return_tensors="pt", add_special_tokens=False)
        assert s.student.input_ids == ref["input_ids"][0].tolist()
        assert torch.equal(s.student.vision.tensors["pixel_values"], ref["pixel_values"])
    mb = collate(data.train[:3], pad_id=0)
    assert torch.equal(mb.vision["pixel_values"], torch.cat([s.student.vision.tensors["pixel_values"]
                                                             for s in data.train[:3]]))


def test_image_tokens_never_enter_the_loss(vl_assets, toks):
    tok = toks["teacher"]
    data = prepare_data({"train": str(vl_assets["train"]), "eval_size": 0}, tok)
    img = image_ids(tok)
    for s in data.train:
        ids = s.student.input_ids
        assert sum(i in img for i in ids) == 16  # 32x32 pixels in 8x8 patches, one image a row
        assert s.student.loss_positions
        for p in s.student.loss_positions:
            assert ids[p] not in img and ids[p + 1] not in img
        # what is trained is the answer and its end-of-turn token, as for a text row
        answer = rows(vl_assets["train"])[s.row]["messages"][1]["content"][0]["text"]
        assert tok.decode([ids[p + 1] for p in s.student.loss_positions]) == answer + "<|im_end|>"
        # image tokens are markup: empty spans
        assert all(a == b for i, (a, b) in zip(ids, s.student.offsets) if i in img)


def test_vl_teacher_and_text_student_align_on_the_text(vl_assets, toks):
    from kdflow_algorithms.aligners.offsets import offsets_alignment

    data = prepare_data({"train": str(vl_assets["train"]), "eval_size": 0}, toks["text_student"], toks["teacher"])
    for s in data.train:
        assert s.student.vision is None and s.teacher.vision is not None  # images go to the VL side only
        assert processor_for(toks["text_student"]) is None
        a = offsets_alignment(s.student, s.teacher)
        # every trained text token pairs: the two tokenizers are the same BPE apart from <image>
        assert len(a.student_index) == len(s.student.loss_positions)
        t_ids = s.teacher.input_ids
        assert all(t_ids[p] not in image_ids(toks["teacher"]) for p in a.teacher_positions)
        pairs = [(s.student.input_ids[s.student.loss_positions[i] + 1], t_ids[a.teacher_positions[j] + 1])
                 for i, j in zip(a.student_index, a.teacher_index)]
        assert all(x == y for x, y in pairs)


def _cmyk_png(path: Path) -> str:
    from PIL import Image

    Image.new("CMYK", (8, 8)).save(path.with_suffix(".jpg"))
    return str(path.with_suffix(".jpg"))


def test_bad_images_are_counted_and_named(vl_assets, toks, tmp_path):
    good = rows(vl_assets["train"])[:3]
    for r in good:  # absolute paths: the file lives elsewhere
        r["messages"][0]["content"][0]["image"] = str(vl_assets["root"] / r["messages"][0]["content"][0]["image"])
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    bad_refs = [str(tmp_path / "missing.png"), str(tmp_path / "broken.png"), _cmyk_png(tmp_path / "cmyk")]
    bad = []
    for ref in bad_refs:
        r = json.loads(json.dumps(good[0]))
        r["messages"][0]["content"][0]["image"] = ref
        bad.append(r)
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    data = prepare_data({"train": str(path), "eval_size": 0}, toks["student"])
    rep = data.report.train
    assert rep.bad_rows == 3 and len(data.train) == 3
    reasons = dict(rep.bad_examples)
    assert reasons[3] == f"image 0 ('{bad_refs[0]}'): no such file"
    assert reasons[4].startswith(f"image 0 ('{bad_refs[1]}'): cannot be read as an image (UnidentifiedImageError")
    assert reasons[5] == f"image 0 ('{bad_refs[2]}'): mode 'CMYK' is not one of RGB, RGBA, L, LA, P"
    text = "\n".join(data.report.lines())
    assert "3 bad rows" in text and "no such file" in text
    # a text-only student never opens the images: nothing is bad for it
    assert prepare_data({"train": str(path), "eval_size": 0}, toks["text_student"]).report.train.bad_rows == 0


def test_images_column_bytes_and_datasets_image_values(vl_assets, toks, tmp_path):
    import datasets

    r = rows(vl_assets["train"])[0]
    png = (vl_assets["root"] / r["messages"][0]["content"][0]["image"]).read_bytes()
    plain = [{"role": "user", "content": "What is drawn?"}, {"role": "assistant", "content": "Shapes."}]
    # a datasets Image column and no image part: the image goes before the user's text
    ds = datasets.Dataset.from_dict({"messages": [plain, plain], "images": [[png], [png]]},
                                    features=datasets.Features({"messages": datasets.List({"role": datasets.Value("string"),
                                                                "content": datasets.Value("string")}),
                                                                "images": datasets.List(datasets.Image())}))
    ds.save_to_disk(str(tmp_path / "ds"))
    data = prepare_data({"train": str(tmp_path / "ds"), "eval_size": 0}, toks["student"])
    assert data.report.train.bad_rows == 0 and len(data.train) == 2
    a = data.train[0]
    assert a.text == "What is drawn?Shapes."
    # the same image as raw bytes, or decoded by datasets to PIL, gives the same inputs
    for ref in (png, ds[0]["images"][0]):
        got = tokenize_side([normalize_row({"messages": plain, "images": [ref]}, "messages")], toks["student"])[0]
        assert got.input_ids == a.student.input_ids
        assert torch.equal(got.vision.tensors["pixel_values"], a.student.vision.tensors["pixel_values"])
    one_part = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}, plain[1]]
    with pytest.raises(BadRow, match="the 'images' column has 2 entries but the messages have 1 image parts"):
        normalize_row({"messages": one_part, "images": [png, png]}, "messages")


def test_max_length_never_cuts_an_image(vl_assets, toks):
    from kdcore.data import DataError

    # 12 tokens end inside the 16 image tokens: a row cut there could not be fed to the model,
    # so it is dropped (and counted) instead of truncated
    with pytest.raises(DataError, match=r"24 rows, 0 bad, 24 dropped by max_length"):
        prepare_data({"train": str(vl_assets["train"]), "eval_size": 0, "max_length": 12}, toks["student"])
    kept = prepare_data({"train": str(vl_assets["train"]), "eval_size": 0, "max_length": 30}, toks["student"])
    assert kept.report.train.truncated > 0 and all(len(s) <= 30 for s in kept.train)
