"""A vision-language student: which parts FSDP2 wraps, a frozen vision tower, the hidden states
the loss reads (kdcore/modeling/vision.py, kdcore/modeling/student.py)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from kdcore.modeling import student as kstudent
from kdcore.modeling import vision
from kdcore.recipe.schema import Recipe

pytestmark = pytest.mark.usefixtures("cpu_process_group")


def recipe(path, train_vision: bool):
    cfg = OmegaConf.structured(Recipe)
    cfg.teacher.path = str(path)
    cfg.student.path = str(path)
    cfg.student.train_vision = train_vision
    cfg.data.train = "unused"
    return cfg


def wrapped(module) -> bool:
    return type(module).__name__.startswith("FSDP")


@pytest.mark.parametrize("train_vision", [True, False])
def test_fsdp2_wraps_language_layers_and_trained_vision_blocks(vl_assets, train_vision):
    model = kstudent.build_student(recipe(vl_assets["student"], train_vision))
    assert vision.is_vision_model(model)
    tower = vision.vision_tower(model)
    assert all(p.requires_grad == train_vision for p in tower.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if "vision_tower" not in n)  # projector, LM
    kstudent.shard_student(model, device="cpu")
    layers = kstudent.decoder_layers(model)
    assert len(layers) == 2 and all(wrapped(layer) for layer in layers)
    blocks = vision.vision_blocks(model)
    assert len(blocks) == 2 and all(wrapped(b) == train_vision for b in blocks)
    assert wrapped(model)


def test_student_hidden_is_the_backbones_last_hidden_state(vl_assets):
    from kdcore.data import collate, prepare_data
    from kdcore.modeling.tokenizers import load_tokenizer

    tok = load_tokenizer(str(vl_assets["student"]))
    mb = collate(prepare_data({"train": str(vl_assets["train"]), "eval_size": 0}, tok).train[:2], pad_id=0)
    model = kstudent.build_student(recipe(vl_assets["student"], True)).eval()
    with torch.no_grad():
        got = kstudent.student_hidden(model, mb.input_ids, mb.attention_mask, **vision.model_inputs(mb.vision, "cpu"))
        ref = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, pixel_values=mb.vision["pixel_values"],
                    output_hidden_states=False)
        logits = got @ kstudent.student_head_weight(model).T
    torch.testing.assert_close(logits, ref.logits)
