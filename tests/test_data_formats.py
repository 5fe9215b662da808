"""Data formats: URL patterns, tar over file/memory/HTTP, pack/inspect, captions, interleaved, images."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import socket
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from vlforge import data
from vlforge.cli import main
from vlforge.components import BuildContext
from vlforge.data.captions import CaptionsSource, read_caption_file
from vlforge.data.interleaved import InterleavedSource, collate_documents
from vlforge.data.pack import pack, write_shapes_folder
from vlforge.data.sharded import BadSample
from vlforge.data.tar import BadShard, read_samples, split_key
from vlforge.data.transforms import (
    COLOUR_FREE_OPS,
    ColourFreeRandAugment,
    ImagePipeline,
    decode,
    sample_seed,
    seeded,
)
from vlforge.data.urls import expand_urls

DATA_CONFIG = {
    "input_size": (3, 16, 16),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.25, 0.25, 0.25),
    "interpolation": "bicubic",
    "crop_pct": 1.0,
}


class FakeVision:
    data_config = DATA_CONFIG


def context(**parts) -> BuildContext:
    return BuildContext(recipe=None, parts={"vision": FakeVision(), **parts})


def encoded(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def jpeg(value: int, size: int = 20) -> bytes:
    return encoded(np.full((size, size, 3), value, dtype=np.uint8))


@pytest.fixture
def packed(tmp_path) -> Path:
    """12 generated shapes packed into 3 shards of 4 under tmp_path/shards."""
    write_shapes_folder(tmp_path / "images", 12, image_size=24)
    pack(str(tmp_path / "images"), str(tmp_path / "shards"), shard_size=4, progress=False)
    return tmp_path / "shards"


# --------------------------------------------------------------------------- URLs and tar


def test_brace_patterns_expand_like_bash():
    assert expand_urls("s3://b/{008..011}.tar") == [f"s3://b/{i:03d}.tar" for i in range(8, 12)]
    assert expand_urls("a/{x,y{1..2}}/{0..1}") == ["a/x/0", "a/x/1", "a/y1/0", "a/y1/1", "a/y2/0", "a/y2/1"]
    assert expand_urls(["p.tar", "q/{1..2}.tar"]) == ["p.tar", "q/1.tar", "q/2.tar"]
    with pytest.raises(ValueError, match="unbalanced"):
        expand_urls("a/{1..2.tar")


def test_key_is_the_path_up_to_the_first_dot_of_the_file_name():
    assert split_key("00001/000010003.jpg") == ("00001/000010003", "jpg")
    assert split_key("a.b/key.seg.PNG") == ("a.b/key", "seg.png")


def test_pack_then_read_round_trip(packed, tmp_path):
    sizes = json.loads((packed / "sizes.json").read_text())
    assert sizes == {"00000.tar": 4, "00001.tar": 4, "00002.tar": 4}
    samples = [s for url in expand_urls(f"{packed}/{{00000..00002}}.tar") for s in read_samples(url)]
    assert [s["__key__"] for s in samples[:5]] == ["000000", "000001", "000002", "000003", "000010"]
    by_source = {json.loads(sample["json"])["source"]: sample for sample in samples}
    originals = sorted((tmp_path / "images").glob("*.jpg"))
    assert sorted(by_source) == [image.name for image in originals]  # every image, once
    for image in originals:
        assert by_source[image.name]["jpg"] == image.read_bytes()  # stored, not re-encoded
        assert by_source[image.name]["txt"].decode() == image.with_suffix(".txt").read_text()
    manifest = json.loads((packed / "pack.json").read_text())
    assert manifest["shuffle"] is True and manifest["seed"] == 0 and manifest["samples"] == 12


def test_pack_shuffles_with_a_recorded_seed_and_no_shuffle_keeps_the_order(tmp_path, capsys):
    write_shapes_folder(tmp_path / "images", 12, image_size=16)

    def order(dest: str, *options: str) -> list[str]:
        assert (
            main(["data", "pack", str(tmp_path / "images"), str(tmp_path / dest), "--no-progress", *options])
            == 0
        )
        shards = [tmp_path / dest / f"{i:05d}.tar" for i in range(3)]
        return [json.loads(s["json"])["source"] for shard in shards for s in read_samples(str(shard))]

    sorted_names = [f"{i:06d}.jpg" for i in range(12)]
    assert order("kept", "--no-shuffle", "--shard-size", "4") == sorted_names
    assert "(sorted order)" in capsys.readouterr().out
    first = order("a", "--shard-size", "4", "--seed", "7")
    assert "(shuffled, seed 7)" in capsys.readouterr().out
    assert first != sorted_names and sorted(first) == sorted_names  # a permutation: nothing lost
    assert order("b", "--shard-size", "4", "--seed", "7") == first  # the same seed, the same shards
    assert order("c", "--shard-size", "4", "--seed", "8") != first
    assert json.loads((tmp_path / "a" / "pack.json").read_text())["seed"] == 7
    assert json.loads((tmp_path / "kept" / "pack.json").read_text())["shuffle"] is False


def test_pack_skips_and_counts_a_latin1_caption_and_refuses_an_existing_destination(tmp_path, capsys, caplog):
    write_shapes_folder(tmp_path / "images", 4, image_size=16)
    (tmp_path / "images" / "000002.txt").write_bytes("un caf\xe9 rouge".encode("latin-1"))
    code = main(["data", "pack", str(tmp_path / "images"), str(tmp_path / "out"), "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0 and "Traceback" not in printed.err
    assert "3 samples in 1 shards" in printed.out and "left out 1 caption_not_utf8" in printed.out
    assert f"{tmp_path / 'images' / '000002.txt'}: not UTF-8 (byte 0xe9 at 6)" in caplog.text
    sources = {json.loads(s["json"])["source"] for s in read_samples(str(tmp_path / "out" / "00000.tar"))}
    assert sources == {"000000.jpg", "000001.jpg", "000003.jpg"}
    assert json.loads((tmp_path / "out" / "pack.json").read_text())["skipped"] == {"caption_not_utf8": 1}

    (tmp_path / "file").write_text("keep me")
    for dest, why in [(tmp_path / "file", "is a file"), (tmp_path / "out", "is not empty")]:
        before = {path: path.read_bytes() for path in [dest, *dest.glob("*")] if path.is_file()}
        assert main(["data", "pack", str(tmp_path / "images"), str(dest), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"DEST {dest} {why}" in err and "Traceback" not in err
        assert {path: path.read_bytes() for path in before} == before  # nothing overwritten


def test_shards_read_over_file_memory_and_http(packed):
    local = [s["__key__"] for s in read_samples(str(packed / "00001.tar"))]
    assert len(local) == 4
    assert [s["__key__"] for s in read_samples((packed / "00001.tar").as_uri())] == local  # file://
    with fsspec.open("memory://shards/00001.tar", "wb") as stream:
        stream.write((packed / "00001.tar").read_bytes())
    assert [s["__key__"] for s in read_samples("memory://shards/00001.tar")] == local
    handler = functools.partial(QuietHandler, directory=str(packed))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/00001.tar"
            assert [s["__key__"] for s in read_samples(url)] == local
            with pytest.raises(BadShard) as missing:
                list(read_samples(url.replace("00001", "00099")))
            assert missing.value.kind == "unreachable"
        finally:
            server.shutdown()
            thread.join(timeout=5)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class FlakyHandler(QuietHandler):
    """Serves a folder; the first ``plan["left"]`` requests (HEAD or GET) fail as ``plan["how"]`` says."""

    plan: dict = {}

    def send_head(self):
        if self.plan["left"] > 0:
            self.plan["left"] -= 1
            self.plan["failed"] += 1
            if self.plan["how"] == "503":
                self.send_error(503)
                return None
            if self.plan["how"] == "reset":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return None
            time.sleep(1.0)  # "slow": longer than the client's timeout
        return super().send_head()


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # the connections this test breaks on purpose


@pytest.fixture
def flaky(packed, monkeypatch):
    """(base URL of the packed shards, the failure plan to fill in) with fast backoff and timeout."""
    monkeypatch.setattr(data.urls, "HTTP_BACKOFF_S", 0.01)
    monkeypatch.setattr(data.urls, "HTTP_TIMEOUT_S", 0.3)
    plan = {"left": 0, "how": "503", "failed": 0}
    handler = functools.partial(type("Handler", (FlakyHandler,), {"plan": plan}), directory=str(packed))
    data.urls.take_http_retries()
    with QuietServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_address[1]}", plan
        server.shutdown()
        thread.join(timeout=5)


@pytest.mark.parametrize("how", ["503", "reset", "slow"])
def test_transient_http_failures_are_retried_and_counted(packed, flaky, how):
    base, plan = flaky
    plan.update(left=4, how=how)  # two opens' worth: fsspec asks HEAD, then GET, before streaming
    config = data.WebDatasetConfig(urls=f"{base}/{{00000..00002}}.tar", shuffle=False, num_samples=12)
    source = data.build_webdataset(config, context())
    stream = source.train_stream(micro_batch=4, seed=0, num_workers=0, rank=0, world_size=1)
    keys = [key for _ in range(3) for key in stream.next()["keys"]]
    local = [s["__key__"] for i in range(3) for s in read_samples(str(packed / f"{i:05d}.tar"))]
    assert keys == local  # every sample, in order: nothing lost
    assert plan["failed"] == 4
    metrics = stream.metrics()
    # aiohttp itself reconnects once after a dropped keep-alive connection: a reset may cost one retry less
    assert metrics["data/http_retries"] in ({1, 2} if how == "reset" else {2})
    assert "data/shards_unreachable" not in metrics


def test_http_gives_up_after_bounded_retries_and_never_retries_a_404(packed, flaky):
    base, plan = flaky
    plan.update(left=2)  # HEAD and GET of one attempt
    assert data.urls.read_bytes(f"{base}/sizes.json") == (packed / "sizes.json").read_bytes()
    assert data.urls.take_http_retries() == 1
    with pytest.raises(BadShard) as missing:
        list(read_samples(f"{base}/00099.tar"))
    assert missing.value.kind == "unreachable" and data.urls.take_http_retries() == 0
    plan.update(left=1000, failed=0)
    with pytest.raises(BadShard) as down:
        list(read_samples(f"{base}/00000.tar"))
    assert down.value.kind == "unreachable" and "503" in str(down.value.__cause__.__cause__)
    assert data.urls.take_http_retries() == data.urls.HTTP_ATTEMPTS - 1
    assert plan["failed"] == 2 * data.urls.HTTP_ATTEMPTS  # HEAD and GET of each attempt, then no more


def test_damaged_shards_raise_after_the_good_samples(packed, tmp_path):
    whole = (packed / "00000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) // 2])  # stops inside a member
    keys = []
    with pytest.raises(BadShard) as truncated:
        keys.extend(s["__key__"] for s in read_samples(str(cut)))
    assert truncated.value.kind == "truncated" and 0 < len(keys) < 4
    with tarfile.open(packed / "00000.tar") as archive:
        boundaries = [member.offset for member in archive.getmembers()]
    for cut_at in (boundaries[6], boundaries[6] + 100):  # between members, inside a header
        cut.write_bytes(whole[:cut_at])  # tar's stream mode would take either for the end
        with pytest.raises(BadShard) as silent:
            list(read_samples(str(cut)))
        assert silent.value.kind == "truncated"
    not_tar = tmp_path / "junk.tar"
    not_tar.write_bytes(b"x" * 2048)
    with pytest.raises(BadShard) as junk:
        list(read_samples(str(not_tar)))
    assert junk.value.kind == "unreadable"
    with pytest.raises(BadShard) as absent:
        list(read_samples(str(tmp_path / "absent.tar")))
    assert absent.value.kind == "unreachable"


def test_pack_from_a_caption_file_and_the_cli(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg(40 * i))
    entries = [
        {"image": "img/0.jpg", "caption": "zero"},
        {"image": "img/1.jpg", "caption": ["one", "uno"]},
        {"image": "img/2.jpg", "caption": "   "},  # no caption: left out
        {"image": "img/9.jpg", "caption": "gone"},  # no image: left out
    ]
    (tmp_path / "caps.json").write_text(json.dumps(entries))
    pack_command = ["data", "pack", str(tmp_path / "caps.json"), str(tmp_path / "out"), "--no-progress"]
    assert main([*pack_command, "--no-shuffle"]) == 0
    printed = capsys.readouterr().out
    assert "2 samples in 1 shards" in printed and "1 missing_caption, 1 unreadable_image" in printed
    samples = list(read_samples(str(tmp_path / "out" / "00000.tar")))
    assert [s["txt"].decode() for s in samples] == ["zero", "one"]
    assert json.loads(samples[1]["json"])["captions"] == ["one", "uno"]

    assert main(["data", "inspect", f"{tmp_path}/out/{{00000..00001}}.tar", "--samples", "1"]) == 1
    captured = capsys.readouterr()
    printed = captured.out
    assert "1 of 2 shards are BROKEN" in captured.err
    assert "00000.tar: 2 samples [jpg 2, json 2, txt 2]" in printed
    assert "00001.tar: 0 samples" in printed and "BROKEN (unreachable" in printed
    assert "total: 2 samples in 2 shards (1 broken)" in printed
    assert "txt: zero" in printed and "JPEG 20x20" in printed
    assert main(["data", "inspect", f"{tmp_path}/out/00000.tar"]) == 0  # nothing broken: exit 0


# --------------------------------------------------------------------------- images


def test_pipeline_uses_the_encoder_config_and_is_seeded_per_sample():
    image = jpeg(200, size=40)
    config = data.ImageConfig(crop_scale=(0.3, 1.0), hflip=0.5, randaugment_ops=2)
    train = ImagePipeline(config, DATA_CONFIG, train=True)
    evaluate = ImagePipeline(config, DATA_CONFIG, train=False)
    out = evaluate(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert out.mean().item() == pytest.approx((200 / 255 - 0.5) / 0.25, abs=0.05)  # normalised
    assert ImagePipeline(data.ImageConfig(size=12), DATA_CONFIG, train=True)(image).shape == (3, 12, 12)
    centre = ImagePipeline(data.ImageConfig(crop="center"), DATA_CONFIG, train=True)
    assert torch.equal(centre(image), out)  # no augmentation configured: the eval transform
    ramp = encoded(np.tile(np.arange(0, 240, 6, dtype=np.uint8)[:, None, None], (1, 40, 3)))
    with seeded(sample_seed(0, 0, "k")):
        first = train(ramp)
    with seeded(sample_seed(0, 0, "k")):
        assert torch.equal(train(ramp), first)  # same (seed, epoch, key): same augmentation
    with seeded(sample_seed(0, 1, "k")):
        assert not torch.equal(train(ramp), first)  # next epoch: another one


def test_colour_free_randaugment_has_exactly_albefs_ops():
    assert set(ColourFreeRandAugment._AUGMENTATION_SPACE) == set(COLOUR_FREE_OPS)
    assert "Color" not in COLOUR_FREE_OPS and "Solarize" not in COLOUR_FREE_OPS


def test_undecodable_bytes_raise_a_value_error():
    with pytest.raises(ValueError):
        decode(b"not an image")


# --------------------------------------------------------------------------- caption files


def test_caption_files_json_and_jsonl_with_image_root(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"image": "x/1.jpg", "caption": "one"}]))
    (tmp_path / "b.jsonl").write_text('{"image": "2.jpg", "captions": ["two", "deux"]}\n\n')
    first = read_caption_file(str(tmp_path / "a.json"))
    assert first[0].image_url == f"{tmp_path}/x/1.jpg" and first[0].captions == ("one",)
    second = read_caption_file(str(tmp_path / "b.jsonl"), image_root="s3://bucket/imgs")
    assert second[0].key == "b/0" and second[0].image_url == "s3://bucket/imgs/2.jpg"
    assert second[0].captions == ("two", "deux")


def test_captions_source_draws_one_caption_per_epoch_and_counts_missing_images(tmp_path):
    (tmp_path / "1.jpg").write_bytes(jpeg(10))
    entries = [{"image": "1.jpg", "caption": ["a b c d", "e f"]}, {"image": "gone.jpg", "caption": "x"}]
    (tmp_path / "c.json").write_text(json.dumps(entries))
    source = CaptionsSource.from_context(
        data.CaptionsConfig(files=str(tmp_path / "c.json"), max_words=3), context()
    )
    (chunk,) = source.units(0, seed=0)
    raws = dict((entry.key, (entry, image)) for entry, image in source.read(chunk, 0))
    counts: Counter[str] = Counter()
    drawn = {source.decode(raws["c/0"], 0, epoch, counts).caption for epoch in range(12)}
    assert drawn == {"a b c", "e f"}  # cut to max_words; both captions drawn over epochs
    with pytest.raises(BadSample) as missing:
        source.decode(raws["c/1"], 0, 0, counts)
    assert missing.value.kind == "unreadable_image"


def test_bad_caption_lines_are_skipped_and_counted_with_file_and_line(tmp_path, caplog):
    (tmp_path / "1.jpg").write_bytes(jpeg(10))
    lines = [json.dumps({"image": "1.jpg", "caption": f"good {i}"}).encode() for i in range(56)]
    lines[50] = b'{"image": "1.jpg", "caption": "cut'  # line 51: malformed JSON
    lines[51] = b'{"image": "1.jpg", "caption": 12345}'  # a number for a caption
    lines[52] = b'{"image": "1.jpg", "caption": "caf\xe9"}'  # a Latin-1 byte
    lines[53] = b'{"caption": "no image"}'
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    config = data.CaptionsConfig(files=str(path), shuffle=False, bad_data={"max_skipped_fraction": 0.5})
    source = CaptionsSource.from_context(config, context())
    assert len(source.entries) == 56  # every line keeps its place (and key)
    for number, what in [(51, "not JSON"), (52, "the caption is not text"), (53, "not UTF-8 (byte 0xe9"),
                         (54, "no 'image' path")]:  # fmt: skip
        assert f"data: skipping {path}:line {number}: {what}" in caplog.text

    stream = source.train_stream(4, seed=0, num_workers=0, rank=0, world_size=1)
    captions = [caption for _ in range(13) for caption in stream.next()["captions"]]
    assert captions == [f"good {i}" for i in range(56) if not 50 <= i <= 53]  # nothing good lost
    metrics = stream.metrics()
    assert metrics["data/skipped_bad_line"] == 2 and metrics["data/skipped_bad_entry"] == 2
    assert metrics["data/samples"] == 52


# --------------------------------------------------------------------------- interleaved documents


def interleaved_file(tmp_path: Path) -> Path:
    (tmp_path / "p.jpg").write_bytes(jpeg(50))
    documents = [
        {
            "text_list": ["intro", "about p", "about q", "end"],
            "image_info": [
                {"image_name": "p.jpg", "matched_text_index": 1, "matched_sim": 0.3},
                {"image_base64": base64.b64encode(jpeg(150)).decode(), "matched_text_index": 2},
                {"image_name": "low.jpg", "matched_text_index": 0, "matched_sim": 0.1},  # under the floor
                {"image_name": "missing.jpg", "matched_text_index": 3, "matched_sim": 0.9},  # unreadable
            ],
        },
        {"text_list": ["no images here"], "image_info": []},
        "not json at all",
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(d if isinstance(d, str) else json.dumps(d) for d in documents))
    return path


def test_interleaved_documents_parse_into_images_sentences_and_assignment(tmp_path):
    config = data.InterleavedConfig(files=str(interleaved_file(tmp_path)), min_similarity=0.2, shuffle=False)
    source = InterleavedSource.from_context(config, context())
    raws = list(source.read(source.units(0, 0)[0], 0))
    counts: Counter[str] = Counter()
    document = source.decode(raws[0], 0, 0, counts)
    assert document.sentences == ["intro", "about p", "about q", "end"]
    assert document.image_sentence == [1, 2]
    assert [round(image.mean().item(), 1) for image in document.images] == [
        round((50 / 255 - 0.5) / 0.25, 1),
        round((150 / 255 - 0.5) / 0.25, 1),
    ]
    assert counts == {"images_dropped": 1}
    for raw, kind in [(raws[1], "no_images"), (raws[2], "unparsable")]:
        with pytest.raises(BadSample) as bad:
            source.decode(raw, 0, 0, counts)
        assert bad.value.kind == kind
    batch = collate_documents([document, document])
    assert batch["images"].shape == (2, 2, 3, 16, 16) and batch["image_mask"].all()
    assert batch["image_sentence"] == [[1, 2], [1, 2]]


def make_test_collate(ctx):
    """A collate factory as a plugin would name it: ``tests...:make_test_collate``."""
    return functools.partial(count_images, ctx.parts["marker"])


def count_images(marker: str, documents) -> dict:
    return {"marker": marker, "images": [len(d.images) for d in documents]}


def test_collate_hook_point_takes_a_factory_of_the_build_context(tmp_path):
    config = data.InterleavedConfig(
        files=str(interleaved_file(tmp_path)), collate=f"{__name__}:make_test_collate", max_images=1
    )
    source = InterleavedSource.from_context(config, context(marker="m"))
    raws = {raw.key: raw for raw in source.read(source.units(0, 0)[0], 0)}
    document = source.decode(raws["docs/0"], 0, 0, Counter())
    assert source.collate([document]) == {"marker": "m", "images": [1]}


def test_truncated_jsonl_is_a_bad_shard(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w"):  # any bytes that are not gzip
        pass
    path.write_bytes(buffer.getvalue()[:100])
    config = data.InterleavedConfig(files=str(path))
    source = InterleavedSource.from_context(config, context())
    with pytest.raises(BadShard):
        list(source.read(source.units(0, 0)[0], 0))
