"""Evaluation on researchers' own data: zero-shot on an ImageFolder, retrieval over several captions
per image from a caption file, and the validate-time checks of evaluator data.

The stand-in model reads an image's colour (the JPEGs are filled with one colour each) and
looks texts up in a table, so every similarity is known and the metrics are hand-computed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from vlforge import data
from vlforge import eval as evaluators
from vlforge.cli import main
from vlforge.components import BuildContext
from vlforge.registry import Registry

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
PALETTE = [  # ten colours far apart, one per class or image
    (230, 30, 30), (30, 200, 30), (30, 30, 230), (240, 230, 30), (160, 30, 200),
    (30, 220, 230), (250, 250, 250), (10, 10, 10), (250, 140, 20), (120, 120, 120),
]  # fmt: skip


class FakeVision:
    data_config = {
        "input_size": (3, 24, 24),
        "mean": MEAN,
        "std": STD,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }


class LookupText:
    """Each distinct text is one token: its index in ``texts`` (added on first sight)."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        for text in texts:
            if text not in self.texts:
                self.texts.append(text)
        ids = torch.tensor([[self.texts.index(text)] for text in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class ControlledModel(nn.Module):
    """Image embedding: ``image_vectors[colour index]``; text embedding: ``text_vector(text)``."""

    def __init__(self, text: LookupText, image_vectors: torch.Tensor, text_vector) -> None:
        super().__init__()
        self.text, self.image_vectors, self.text_vector = text, image_vectors, text_vector

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        rgb = (images.mean(dim=(2, 3)) * torch.tensor(STD) + torch.tensor(MEAN)) * 255  # (B, 3)
        colour = torch.cdist(rgb, torch.tensor(PALETTE, dtype=torch.float32)).argmin(dim=1)  # (B,)
        return self.image_vectors[colour]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.text_vector(self.text.texts[int(i)]) for i in input_ids[:, 0]])


def write_jpeg(path: Path, colour: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), PALETTE[colour]).save(path, format="JPEG", quality=95)


def evaluator(kind: str, **options):
    registry = Registry()
    evaluators.register(registry)
    component = registry.get("evaluator", kind)
    return component.factory(component.config(**options), None)


def context(source_kind: str, text: LookupText, **config) -> BuildContext:
    registry = Registry()
    data.register(registry)
    component = registry.get("dataset", source_kind)
    ctx = BuildContext(recipe=None, parts={"vision": FakeVision(), "text": text})
    ctx.parts["data"] = component.factory(component.config(**config), ctx)
    return ctx


# --------------------------------------------------------------------------- zero-shot on an ImageFolder

CLASSES = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]


def test_zeroshot_on_an_image_folder_with_folder_names_and_a_templates_file(tmp_path: Path) -> None:
    # 10 class folders of 3 images, each image the colour of its class; except the third image
    # of classes 0..3, painted in the next class's colour: 4 of 30 wrong at top-1.
    for label, name in enumerate(CLASSES):
        for index in range(3):
            colour = (label + 1) % 10 if index == 2 and label < 4 else label
            write_jpeg(tmp_path / "val" / name / f"{index}.jpg", colour)
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n\na drawing of a {}.\n")
    # An image of colour p is nearest class p, then p+1 (0.5), then p-1 (0.25), the rest 0:
    # the four painted images (true class p-1) are third, inside the top 5.
    eye = torch.eye(10)
    image_vectors = torch.stack(
        [eye[p] + 0.5 * eye[(p + 1) % 10] + 0.25 * eye[(p - 1) % 10] for p in range(10)]
    )
    text = LookupText()

    def class_of(prompt: str) -> torch.Tensor:
        return eye[next(i for i, name in enumerate(CLASSES) if name in prompt.split()[-1])]

    ctx = context("imagefolder", text, splits={"val": str(tmp_path / "val")})
    model = ControlledModel(text, image_vectors, class_of)
    metrics = evaluator("zeroshot", templates=str(templates), batch_size=8).evaluate(model, ctx)
    assert metrics["top1"] == pytest.approx(26 / 30)
    assert metrics["top5"] == 1.0
    assert metrics["mean_per_class_recall"] == pytest.approx((6 * 1 + 4 * 2 / 3) / 10)
    assert metrics["chance_top1"] == pytest.approx(0.1)
    assert sorted(text.texts) == sorted(
        f"a {kind} of a {name}." for name in CLASSES for kind in ("photo", "drawing")
    )


def test_zeroshot_class_names_from_a_file_and_built_in_lists(tmp_path: Path) -> None:
    from vlforge.eval.zeroshot import BUILTIN_CLASS_NAMES, BUILTIN_TEMPLATES, read_lines

    names = read_lines("imagenet", BUILTIN_CLASS_NAMES, "class_names")
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"
    templates = read_lines("imagenet", BUILTIN_TEMPLATES, "templates")
    assert (
        len(templates) == 80 and templates[0] == "a bad photo of a {}." and all("{}" in t for t in templates)
    )
    assert len(read_lines("imagenet_simple", BUILTIN_TEMPLATES, "templates")) == 7

    # Folders named by id, classes named by a file: the file's names are what the prompts say.
    for label, colour in enumerate([0, 1]):
        write_jpeg(tmp_path / "val" / f"n0{label}" / "a.jpg", colour)
    names_file = tmp_path / "names.txt"
    names_file.write_text("alpha\nbravo\n")
    text = LookupText()
    eye = torch.eye(10)
    model = ControlledModel(text, eye, lambda prompt: eye[CLASSES.index(prompt.rstrip(".").split()[-1])])
    ctx = context("imagefolder", text, splits={"val": str(tmp_path / "val")})
    zeroshot = evaluator("zeroshot", class_names=str(names_file), templates=["a photo of a {}."])
    assert zeroshot.evaluate(model, ctx)["top1"] == 1.0
    assert text.texts == ["a photo of a alpha.", "a photo of a bravo."]


def test_zeroshot_on_webdataset_shards_with_a_class_field(tmp_path: Path) -> None:
    import io

    from vlforge.data.tar import KEY_FIELD, TarWriter

    with open(tmp_path / "val.tar", "wb") as stream:  # ImageNet-style shards: key.jpg + key.cls
        writer = TarWriter(stream)
        for index, (colour, label) in enumerate([(0, 0), (1, 1), (2, 2), (2, 1)]):  # the last one is wrong
            jpeg = io.BytesIO()
            Image.new("RGB", (32, 32), PALETTE[colour]).save(jpeg, format="JPEG", quality=95)
            writer.write({KEY_FIELD: f"{index:04d}", "jpg": jpeg.getvalue(), "cls": str(label)})
        writer.close()
    names = tmp_path / "names.txt"
    names.write_text("alpha\nbravo\ncharlie\n")
    text, eye = LookupText(), torch.eye(3)
    model = ControlledModel(text, torch.eye(10, 3), lambda prompt: eye[CLASSES.index(prompt.split()[-1])])
    shards = str(tmp_path / "val.tar")
    ctx = context("webdataset", text, urls=shards, splits={"val": shards}, class_field="cls")
    metrics = evaluator("zeroshot", class_names=str(names), templates=["a {}"]).evaluate(model, ctx)
    assert metrics["top1"] == 3 / 4
    assert metrics["mean_per_class_recall"] == pytest.approx((1 + 1 / 2 + 1) / 3)


# --------------------------------------------------------------------------- several captions per image

# 4 images (colours 0..3, embedded as e0..e3) with 3 captions each; text embeddings by hand.
E = torch.eye(4)
CAPTIONS = {
    0: {"red one": E[0], "a photo": 0.9 * E[2], "thing": 0.3 * E[0]},
    1: {"green one": 0.6 * E[0], "green": E[1], "a photo": 0.9 * E[2]},  # the same text as image 0's
    2: {"blue one": E[2], "blue": 0.5 * E[2], "sky": 0.4 * E[3]},
    3: {"yellow one": 0.7 * E[2], "yellow": 0.2 * E[3], "sun": 0.1 * E[3]},
}
# image -> text R@1: images 0, 1, 2 find their own caption first (1.0 each); image 3 finds "sky"
# (image 2's, 0.4) before "yellow" (0.2): 3/4. Top 5 holds one of its own for every image.
# text -> image R@1, per caption: hits "red one", "thing", "green", "blue one", "blue", "yellow",
# "sun"; misses both "a photo" (-> image 2), "green one" (-> 0), "sky" (-> 3), "yellow one" (-> 2):
# 7/12. With 4 images, every caption's image is in its top 5.
EXPECTED = {
    "i2t_r1": 3 / 4, "i2t_r5": 1.0, "i2t_r10": 1.0,
    "t2i_r1": 7 / 12, "t2i_r5": 1.0, "t2i_r10": 1.0,
    "i2t_chance_r1": 3 / 12, "t2i_chance_r1": 1 / 4,
}  # fmt: skip


def retrieval_case(tmp_path: Path, captions: dict[int, dict[str, torch.Tensor]]) -> dict[str, float]:
    lines = []
    for image, texts in captions.items():
        write_jpeg(tmp_path / "images" / f"{image}.jpg", image)
        lines += [
            json.dumps({"image": f"images/{image}.jpg", "image_id": image, "caption": c}) for c in texts
        ]
    (tmp_path / "test.jsonl").write_text("\n".join(lines[::-1]) + "\n")  # one line per caption, mixed order
    vectors = {text: vector for texts in captions.values() for text, vector in texts.items()}
    text = LookupText()
    ctx = context(
        "captions", text, files=str(tmp_path / "test.jsonl"), splits={"test": str(tmp_path / "test.jsonl")}
    )
    model = ControlledModel(text, E, lambda caption: vectors[caption])
    return evaluator("retrieval", split="test", batch_size=3).evaluate(model, ctx)


def test_retrieval_over_image_groups_equals_the_hand_computed_recall(tmp_path: Path) -> None:
    assert retrieval_case(tmp_path, CAPTIONS) == pytest.approx(EXPECTED)


def test_duplicate_caption_texts_do_not_change_retrieval(tmp_path: Path) -> None:
    unique = {image: {f"{t} ({image})": v for t, v in texts.items()} for image, texts in CAPTIONS.items()}
    assert retrieval_case(tmp_path, unique) == pytest.approx(EXPECTED)


def test_karpathy_split_files_are_read_per_image_and_split(tmp_path: Path) -> None:
    from vlforge.data.captions import held_out_images, read_caption_file

    sentences = [[{"raw": "x"}, {"raw": "y"}], [{"raw": "z"}]]
    images = [
        {"filepath": "val2014", "filename": "a.jpg", "cocoid": 7, "split": "test", "sentences": sentences[0]},
        {"filepath": "val2014", "filename": "b.jpg", "cocoid": 8, "split": "val", "sentences": sentences[1]},
    ]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}, indent=1))  # many lines
    entries = held_out_images(read_caption_file(str(tmp_path / "dataset_coco.json")), "test")
    assert [(e.image_id, e.captions, e.image_url.endswith("val2014/a.jpg")) for e in entries] == [
        ("7", ("x", "y"), True)
    ]


# --------------------------------------------------------------------------- validate-time checks


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        (
            [
                'evaluators.zs.type="zeroshot"',
                'evaluators.zs.data.type="captions"',
                'evaluators.zs.data.files="c.jsonl"',
            ],
            "evaluators.zs.data.type",
            "zero-shot needs labelled images, and data type 'captions' gives none",
        ),
        (
            ['evaluators.retrieval.split="dev"'],
            "evaluators.retrieval.split",
            "has no split 'dev' (splits: train, val, test)",
        ),
        (
            [
                'evaluators.zs.type="zeroshot"',
                'evaluators.zs.attribute="color"',
                'evaluators.zs.class_names="missing.txt"',
            ],
            "evaluators.zs.class_names",
            "no file 'missing.txt' (built-in: imagenet)",
        ),
        (
            [
                'evaluators.zs.type="zeroshot"',
                'evaluators.zs.data.type="webdataset"',
                'evaluators.zs.data.urls="a.tar"',
            ],
            "evaluators.zs.data.type",
            "gives none (use imagefolder, or webdataset with class_field)",
        ),
        (['evaluators.zs.type="zeroshot"'], "evaluators.zs.attribute", "name the label to classify"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "run --dry-run"])
def test_evaluator_data_problems_are_caught_before_training(
    tiny_recipe, capsys, overrides, key, message, command
):
    assert main([*command.split(), str(tiny_recipe), *overrides]) == 2
    err = capsys.readouterr().err
    assert f"{key}: " in err and message in err and str(tiny_recipe) in err
    assert "Traceback" not in err
