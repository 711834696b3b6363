"""Reference cache: keys, verified entries, bad and foreign entries, concurrent writers, unwritable folders."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from persense.runtime.manifest import Artefact
from persense.runtime.pipeline.prior import Target
from persense.runtime.reference_cache import (
    BadEntry,
    ReferenceCache,
    array_bytes,
    cache_key,
    default_cache_dir,
    encoder_digest,
    entry_bytes,
    read_entry,
)

DIGEST = "d" * 64


def make_target(seed: int) -> Target:
    """A finite random Target (float32 [256] twice)."""
    rng = np.random.default_rng(seed)
    embedding = rng.normal(size=256).astype(np.float32)
    return Target(embedding, (embedding / np.linalg.norm(embedding)).astype(np.float32))


def key_for(name: str, precision: str = "fp32", backend: str = "ort-cpu", digest: str = DIGEST) -> str:
    """A cache key for a named fake reference."""
    return cache_key(name.encode(), b"mask-" + name.encode(), digest, precision, backend)


def assert_same(a: Target, b: Target) -> None:
    """Bit-identical targets."""
    np.testing.assert_array_equal(a.embedding, b.embedding)
    np.testing.assert_array_equal(a.feature, b.feature)
    assert a.embedding.dtype == b.embedding.dtype == np.float32


def artefact(**changes) -> Artefact:
    """An encoder manifest entry."""
    fields = dict(
        file="sam_encoder.onnx",
        sha256="a" * 64,
        kind="sam_encoder",
        precision="fp32",
        model_type="vit_b",
        source_checkpoint="random",
        opset=17,
        inputs=[],
        outputs=[],
        extra={},
    )
    fields.update(changes)
    return Artefact(**fields)


def test_round_trip(tmp_path: Path) -> None:
    cache = ReferenceCache(tmp_path / "cache")
    key, target = key_for("apple"), make_target(0)
    assert cache.get(key) is None
    path = cache.put(key, target)
    assert path == tmp_path / "cache" / f"{key}.npz" and path.is_file()
    assert_same(cache.get(key), target)
    assert_same(ReferenceCache(tmp_path / "cache").get(key), target)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # no temp file left


def test_key_covers_every_input_unambiguously() -> None:
    base = ("img", "mask", DIGEST, "fp32", "ort-cpu")
    keys = {cache_key(b"img", b"mask", DIGEST, "fp32", "ort-cpu")}
    for i, other in enumerate(("img2", "mask2", "e" * 64, "int8", "ort-cuda")):
        fields = list(base)
        fields[i] = other
        keys.add(cache_key(fields[0].encode(), fields[1].encode(), *fields[2:]))
    keys.add(cache_key(b"im", b"gmask", DIGEST, "fp32", "ort-cpu"))  # same concatenation, other split
    assert len(keys) == 7 and all(len(k) == 64 for k in keys)
    assert cache_key(b"img", b"mask", DIGEST, "fp32", "ort-cpu") in keys  # deterministic


def test_array_bytes_tells_shapes_and_dtypes_apart() -> None:
    flat = np.arange(12, dtype=np.uint8)
    assert (
        len(
            {
                array_bytes(flat.reshape(3, 4)),
                array_bytes(flat.reshape(4, 3)),
                array_bytes(flat.astype(np.int8).reshape(3, 4)),
            }
        )
        == 3
    )
    assert array_bytes(flat.reshape(3, 4)) == array_bytes(flat.reshape(3, 4).copy())


def test_encoder_digest_follows_weights_data_and_precision() -> None:
    digests = {
        encoder_digest(artefact()),
        encoder_digest(artefact(sha256="b" * 64)),
        encoder_digest(artefact(extra={"data_sha256": "c" * 64})),
        encoder_digest(artefact(precision="int8")),
    }
    assert len(digests) == 4
    assert encoder_digest(artefact(file="renamed.onnx")) == encoder_digest(artefact())  # same numbers, same digest


def test_default_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PERSENSE_CACHE_DIR", str(tmp_path / "p"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "p"
    monkeypatch.delenv("PERSENSE_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "x" / "persense"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "persense"


def _npz(**fields) -> bytes:
    """An .npz holding `fields`."""
    buffer = io.BytesIO()
    np.savez(buffer, **fields)
    return buffer.getvalue()


def _valid_fields(key: str, target: Target) -> dict:
    """The fields of a valid entry, to tamper with one at a time."""
    with np.load(io.BytesIO(entry_bytes(key, target))) as npz:
        return {name: npz[name] for name in npz.files}


BAD_ENTRIES = {
    "empty": lambda good, fields: b"",
    "truncated": lambda good, fields: good[: len(good) // 2],
    "garbage": lambda good, fields: b"\x89PNG not an npz" * 20,
    "flipped byte": lambda good, fields: good[:300] + bytes([good[300] ^ 0xFF]) + good[301:],
    "payload changed, zip valid": lambda good, fields: _npz(**{**fields, "embedding": fields["embedding"] + 1}),
    "other format": lambda good, fields: _npz(**{**fields, "format": np.array(99)}),
    "field missing": lambda good, fields: _npz(**{k: v for k, v in fields.items() if k != "checksum"}),
    "nan": lambda good, fields: _npz(**{**fields, "feature": np.full(256, np.nan, np.float32)}),
    "wrong shape": lambda good, fields: _npz(**{**fields, "embedding": fields["embedding"][:128]}),
    "int payload": lambda good, fields: _npz(**{**fields, "feature": np.zeros(256, np.int32)}),
    "pickled object": lambda good, fields: _npz(**{**fields, "key": np.array([{"k": 1}], dtype=object)}),
}


@pytest.mark.parametrize("kind", sorted(BAD_ENTRIES))
def test_bad_entry_is_ignored_then_rewritten(kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = ReferenceCache(tmp_path)
    key, target = key_for("pear"), make_target(1)
    good = entry_bytes(key, target)
    cache.path(key).write_bytes(BAD_ENTRIES[kind](good, _valid_fields(key, target)))
    with pytest.raises(BadEntry):
        read_entry(cache.path(key), key)
    with caplog.at_level(logging.INFO, logger="persense.runtime.reference_cache"):
        assert cache.get(key) is None
    assert any(r.levelno == logging.WARNING and "ignoring" in r.getMessage() for r in caplog.records)
    cache.put(key, target)
    assert_same(cache.get(key), target)


def test_entry_of_other_manifest_or_precision_is_never_served(tmp_path: Path) -> None:
    cache = ReferenceCache(tmp_path)
    fp32, target = key_for("plum"), make_target(2)
    int8, other_engines = key_for("plum", precision="int8"), key_for("plum", digest="e" * 64)
    cache.put(fp32, target)
    assert cache.get(int8) is None and cache.get(other_engines) is None
    cache.path(fp32).rename(cache.path(int8))  # an entry under the wrong name is refused: the key is inside
    assert cache.get(int8) is None
    with pytest.raises(BadEntry, match="another key"):
        read_entry(cache.path(int8), int8)


def test_disabled_cache_stores_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cache = ReferenceCache.disabled()
    key = key_for("fig")
    assert not cache.enabled and cache.put(key, make_target(3)) is None and cache.get(key) is None
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_falls_back_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cache = ReferenceCache(blocker / "cache")  # mkdir fails even as root
    with caplog.at_level(logging.WARNING, logger="persense.runtime.reference_cache"):
        assert cache.put(key_for("kiwi"), make_target(4)) is None
        assert cache.put(key_for("lime"), make_target(5)) is None
        assert cache.get(key_for("kiwi")) is None
    assert not cache.enabled
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "reference cache disabled" in caplog.records[0].getMessage()


def test_non_finite_target_is_not_stored(tmp_path: Path) -> None:
    cache = ReferenceCache(tmp_path)
    bad = Target(np.full(256, np.inf, np.float32), np.zeros(256, np.float32))
    assert cache.put(key_for("nan"), bad) is None and list(tmp_path.iterdir()) == []


def test_malformed_key_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a cache key"):
        ReferenceCache(tmp_path).get("../../etc/passwd")


WRITERS, ROUNDS = 4, 40


def _writer(args: tuple[str, int]) -> tuple[int, int, int]:
    """Put the shared key and an own key ROUNDS times, reading the shared one between: (hits, misses, bad)."""
    folder, worker = args
    cache = ReferenceCache(folder)
    shared, own = key_for("shared"), key_for(f"own-{worker}")
    allowed = {make_target(100 + w).embedding.tobytes() for w in range(WRITERS)}
    hits = misses = bad = 0
    for _ in range(ROUNDS):
        cache.put(shared, make_target(100 + worker))
        cache.put(own, make_target(200 + worker))
        try:
            found = read_entry(cache.path(shared), shared)
            hits += found.embedding.tobytes() in allowed
            bad += found.embedding.tobytes() not in allowed
        except FileNotFoundError:
            misses += 1
        except (BadEntry, OSError):
            bad += 1
    return hits, misses, bad


def test_concurrent_writers_never_expose_a_partial_entry(tmp_path: Path) -> None:
    with multiprocessing.get_context("fork").Pool(WRITERS) as pool:
        results = pool.map(_writer, [(str(tmp_path), w) for w in range(WRITERS)])
    assert all(bad == 0 for _, _, bad in results) and sum(hits for hits, _, _ in results) == WRITERS * ROUNDS
    cache = ReferenceCache(tmp_path)
    assert cache.get(key_for("shared")).embedding.tobytes() in {
        make_target(100 + w).embedding.tobytes() for w in range(WRITERS)
    }
    for w in range(WRITERS):
        assert_same(cache.get(key_for(f"own-{w}")), make_target(200 + w))
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".npz"] * (WRITERS + 1)  # no temp files left


def test_entry_in_the_layout_written_before_the_shared_codec_still_reads(tmp_path: Path) -> None:
    key, target = key_for("quince"), make_target(6)
    checksum = hashlib.sha256(target.embedding.tobytes() + target.feature.tobytes()).hexdigest()
    fields = dict(format=np.array(1), key=np.array(key), embedding=target.embedding, feature=target.feature)
    (tmp_path / "old.npz").write_bytes(_npz(**fields, checksum=np.array(checksum)))  # fields in that order
    assert_same(read_entry(tmp_path / "old.npz", key), target)
    assert_same(read_entry(ReferenceCache(tmp_path).put(key, target), key), target)


def test_reference_file_in_the_layout_written_before_the_shared_codec_still_loads(tmp_path: Path) -> None:
    from persense.runtime.api import Reference

    target = make_target(7)
    digest = hashlib.sha256(b"0123456789abcdef|fp16|" + target.embedding.tobytes() + target.feature.tobytes())
    meta = {
        "format": 1,
        "manifest": "0123456789abcdef",
        "precision": "fp16",
        "backend": "ort-cuda",
        "warnings": ["w"],
        "checksum": digest.hexdigest(),
    }
    old = tmp_path / "old.npz"
    old.write_bytes(_npz(embedding=target.embedding, feature=target.feature, meta=np.array(json.dumps(meta))))
    loaded = Reference.load(old)
    assert_same(loaded.target, target)
    assert (loaded.manifest, loaded.precision, loaded.backend, loaded.warnings) == (
        "0123456789abcdef",
        "fp16",
        "ort-cuda",
        ("w",),
    )
    assert loaded.source == "file"
    with np.load(loaded.save(tmp_path / "new.npz")) as new:  # and it is saved in the same layout
        assert new.files == ["embedding", "feature", "meta"] and json.loads(str(new["meta"])) == meta
