"""Crafted ACTS files (issue #10, item 8): every one is refused by `load_acts` with one `InputError` line naming
the file and the fix — nothing allocated from a lying .npy header, no pickle loaded, no empty axis or overflowing
value let through to a "successful" solve — and through the console script: exit 2, one stderr line, no output.
"""

import io
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from spectral_jax.acts import MAX_ABS, load_acts, save_acts
from spectral_jax.errors import InputError
from spectral_jax.taps import LayerTap, Taps

GRID = (4, 4)


def arrays(batch=1, heads=2, dim=8, scale=1.0, seed=0) -> dict[str, np.ndarray]:
    """A valid two-layer ACTS as a dict for `np.savez` (q/k/v `[B, H, 16, D]`)."""
    rng = np.random.default_rng(seed)
    a = {"model": np.array("dinov2_vits14"), "image_size": np.array([56, 56], np.int64)}
    for i in (0, 1):
        for n in "qkv":
            a[f"layer{i}/{n}"] = (rng.standard_normal((batch, heads, 16, dim)) * scale).astype(np.float32)
        a[f"layer{i}/grid"] = np.array(GRID, np.int64)
    return a


def write(path, a, compressed=False) -> str:
    (np.savez_compressed if compressed else np.savez)(path, **a)
    return str(path)


def with_header(path, member, header: dict) -> str:
    """Rewrite `member`'s .npy header in the archive at `path` (payload kept), e.g. to declare a huge shape."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    old = members[member]
    members[member] = buf.getvalue() + old[8 + 2 + int.from_bytes(old[8:10], "little"):]
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    return str(path)


def refused(path, match):
    with pytest.raises(InputError, match=match) as e:
        load_acts(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and " — " in msg and "\n" not in msg
    return msg


def _edit(**changes):
    def f(a):
        a.update(changes)
        for k in [k for k, v in changes.items() if v is None]:
            del a[k]
        return a
    return f


CASES = {
    "batch0": (lambda a: arrays(batch=0), r"layer0/q has an empty axis: shape \(0, 2, 16, 8\)"),
    "heads0": (lambda a: arrays(heads=0), r"layer0/q has an empty axis: shape \(1, 0, 16, 8\)"),
    "head_dim0": (lambda a: arrays(dim=0), r"layer0/q has an empty axis: shape \(1, 2, 16, 0\)"),
    "huge_values": (lambda a: arrays(scale=1e30), r"layer0/q holds \|x\| = .*e\+30 > 1e\+15"),
    "nan": (_edit(**{"layer1/k": np.full((1, 2, 16, 8), np.nan, np.float32)}), "layer1/k contains NaN or Inf"),
    "q_int": (_edit(**{"layer0/q": np.ones((1, 2, 16, 8), np.int32)}), "layer0/q must be a floating-point"),
    "q_3d": (_edit(**{"layer0/q": np.ones((2, 16, 8), np.float32)}), r"layer0/q must be a floating-point .* \(2, 16, 8\)"),
    "image_size_str": (_edit(image_size=np.array("abc")), r"image_size must be an integer array of shape \[2\], got <U3"),
    "image_size_shape": (_edit(image_size=np.zeros((3, 3), np.int64)), r"image_size must be .* got int64 \(3, 3\)"),
    "image_size_zero": (_edit(image_size=np.array([0, 56])), r"image_size must hold ints ≥ 1, got 0"),
    "timesteps_str": (_edit(timesteps=np.array(["a", "b"]), num_heads=np.array(2)),
                      r"timesteps must be an integer array of shape \[n\], got <U1"),
    "timesteps_negative": (_edit(timesteps=np.array([-1, 5]), num_heads=np.array(1)), r"timesteps must hold ints ≥ 0"),
    "num_heads_str": (_edit(timesteps=np.array([1, 2]), num_heads=np.array("x")),
                      r"num_heads must be an integer array of shape scalar or \[n\], got <U1"),
    "num_heads_alone": (_edit(num_heads=np.array(2)), "timesteps without num_heads or num_heads without timesteps"),
    "num_heads_count": (_edit(timesteps=np.array([1]), num_heads=np.array([2, 2, 2])),
                        "num_heads has 3 entries for 2 layers"),
    "heads_mismatch": (_edit(timesteps=np.array([1, 2]), num_heads=np.array(5)),
                       r"layer0 has 2 graphs on its heads axis but 2 timesteps × 5 heads = 10"),
    "hidden_str": (_edit(**{"layer0/hidden": np.array(["abc"] * 3)}), r"layer0/hidden must be a floating-point"),
    "hidden_shape": (_edit(**{"layer0/hidden": np.ones((1, 15, 4), np.float32)}),
                     r"layer0/hidden has shape \(1, 15, 4\), expected \[1, 16, C\]"),
    "hidden_huge": (_edit(**{"layer1/hidden": np.full((1, 16, 4), 1e20, np.float32)}), r"layer1/hidden holds \|x\|"),
    "grid_str": (_edit(**{"layer0/grid": np.array(["4", "4"])}), r"layer0/grid must be an integer array"),
    "grid_float": (_edit(**{"layer0/grid": np.array([4.0, 4.0])}), r"layer0/grid must be an integer array"),
    "model_int": (_edit(model=np.array(3)), r"model must be a string, got int64 \(\)"),
    "no_grid": (_edit(**{"layer1/grid": None}), "layer1 lacks grid"),
    "unexpected": (_edit(extra=np.zeros(2)), "unexpected array 'extra'"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_crafted_arrays_are_refused(tmp_path, name):
    make, match = CASES[name]
    refused(write(tmp_path / f"{name}.npz", make(arrays())), match)


def test_declared_shape_beyond_the_member_is_refused_before_any_allocation(tmp_path):
    """1×6×1e5×1e5 float32 (224 GiB) declared over a 1 KB payload: refused from the header alone."""
    path = with_header(write(tmp_path / "bomb.npz", arrays()), "layer0/q.npy",
                       {"descr": "<f4", "fortran_order": False, "shape": (1, 6, 100000, 100000)})
    refused(path, r"array 'layer0/q' declares shape \(1, 6, 100000, 100000\) of float32 \(240000000000 bytes\) "
                  r"but holds 1024 bytes")
    # one element too few is refused as well: the declared size must equal the member's size exactly
    path = with_header(write(tmp_path / "short.npz", arrays()), "layer1/v.npy",
                       {"descr": "<f4", "fortran_order": False, "shape": (1, 2, 16, 7)})
    refused(path, r"array 'layer1/v' declares shape \(1, 2, 16, 7\) of float32 \(896 bytes\) but holds 1024 bytes")


def test_member_size_the_stored_bytes_cannot_hold_is_refused(tmp_path):
    """A zip entry claiming more uncompressed bytes than its stored bytes could produce (a stored member larger than
    its compressed size; deflate beyond 1032×) is refused before reading, compressed archives included."""
    path = write(tmp_path / "ok.npz", arrays(), compressed=True)
    assert load_acts(path).taps.layers[1].q.shape == (1, 2, 16, 8)
    raw = bytearray((tmp_path / "ok.npz").read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("layer0/q.npy")
    # the central directory entry (what ZipInfo reads) holds the uncompressed size at offset 24: claim ~4 GB
    cd = raw.find(b"PK\x01\x02")
    while raw[cd + 46:cd + 46 + len(b"layer0/q.npy")] != b"layer0/q.npy":
        cd = raw.find(b"PK\x01\x02", cd + 1)
    raw[cd + 24:cd + 28] = (0xFFFFFFF0).to_bytes(4, "little")
    bad = tmp_path / "bomb.npz"
    bad.write_bytes(bytes(raw))
    refused(bad, rf"array 'layer0/q' claims {0xFFFFFFF0} bytes from {info.compress_size} stored bytes")


def test_pickles_and_non_arrays_and_other_compression_are_refused(tmp_path):
    a = arrays()
    a["model"] = np.array([{"x": 1}], dtype=object)
    refused(write(tmp_path / "pickle.npz", a), r"array 'model' holds Python objects .* refused")
    with zipfile.ZipFile(tmp_path / "text.npz", "w") as z:
        z.writestr("notes.txt", "hello")
    refused(tmp_path / "text.npz", "member 'notes.txt' is not a .npy array")
    with zipfile.ZipFile(tmp_path / "bz2.npz", "w", compression=zipfile.ZIP_BZIP2) as z:
        z.writestr("model.npy", b"x" * 100)
    refused(tmp_path / "bz2.npz", "array 'model' uses zip compression method 12")
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip")
    refused(tmp_path / "garbage.npz", r"not a readable .npz archive \(BadZipFile\)")
    refused(tmp_path / "missing.npz", "no such file")


def test_valid_files_load(tmp_path):
    """The bound is inclusive of real data: values up to 1e14, a diffusion file with per-layer heads, a legacy file
    without metadata, a bytes model name, hidden states."""
    a = arrays(scale=1e14 / 5)  # max |x| ≈ 1e14 < MAX_ABS
    acts = load_acts(write(tmp_path / "big-but-fine.npz", a))
    assert acts.model == "dinov2_vits14" and acts.image_size == (56, 56) and acts.timesteps == ()
    assert np.abs(acts.taps.layers[0].q).max() <= MAX_ABS
    a = arrays(heads=6)
    a["layer1/q"], a["layer1/k"], a["layer1/v"] = (x[:, :4] for x in (a["layer1/q"], a["layer1/k"], a["layer1/v"]))
    a.update(timesteps=np.array([10, 200]), num_heads=np.array([3, 2]), model=np.array(b"sd_tiny"))
    a["layer1/hidden"] = np.ones((1, 16, 5), np.float16)
    acts = load_acts(write(tmp_path / "sd.npz", a))
    assert acts.timesteps == (10, 200) and acts.model == "sd_tiny"
    assert acts.taps.hidden[1].dtype == np.float32 and acts.taps.hidden[1].shape == (1, 16, 5)
    legacy = {k: v for k, v in arrays().items() if k.startswith("layer")}
    acts = load_acts(write(tmp_path / "legacy.npz", legacy))
    assert acts.model == "unknown" and acts.image_size == (0, 0)
    # what save_acts writes, loads (the writer and the reader agree on every check)
    t = load_acts(str(tmp_path / "sd.npz")).taps
    save_acts(str(tmp_path / "again.npz"), Taps({0: LayerTap(t.layers[0].q, t.layers[0].k, t.layers[0].v, GRID, 0)}),
              "m", (56, 56), timesteps=(10, 200), num_heads=3)
    assert load_acts(str(tmp_path / "again.npz")).timesteps == (10, 200)


def _cli(*args, cwd):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "spectral_jax", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_console_script_refuses_crafted_acts_in_one_line(tmp_path):
    """As a user runs it: `spectral-jax solve crafted.npz --graph qk --out r.npz` → exit 2, one stderr line naming
    the file, no output file (nor any leftover) in the output folder."""
    files = {"heads0.npz": arrays(heads=0), "big.npz": arrays(scale=1e30),
             "size-str.npz": {**arrays(), "image_size": np.array("abc")}}
    for name, a in files.items():
        write(tmp_path / name, a)
    with_header(write(tmp_path / "bomb.npz", arrays()), "layer0/q.npy",
                {"descr": "<f4", "fortran_order": False, "shape": (1, 6, 100000, 100000)})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name in [*files, "bomb.npz"]:
        r = _cli("solve", name, "--graph", "qk", "--num-eigs", "3", "--out", str(out_dir / "r.npz"), cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (name, r.returncode, r.stderr)
        assert lines[0].startswith(f"spectral-jax solve: error: {name}: "), lines[0]
        assert r.stdout == "" and list(out_dir.iterdir()) == [], name


def test_fifo_device_and_corrupt_deflate_are_named(tmp_path):
    """A FIFO or a link to a device was reported as "no such file" (and a FIFO with no writer must never block);
    a deflated member whose stream is damaged past its header was a zlib.error traceback."""
    import os

    os.mkfifo(tmp_path / "fifo.npz")
    refused(tmp_path / "fifo.npz", r"is not a regular file but a FIFO")
    os.symlink("/dev/urandom", tmp_path / "urandom.npz")
    refused(tmp_path / "urandom.npz", r"is not a regular file but a character device")
    a = arrays()
    a["layer0/q"] = np.random.default_rng(1).random((1, 2, 16, 4096)).astype(np.float32)   # ~0.5 MB deflated
    a["layer0/k"] = a["layer0/q"].copy()
    path = write(tmp_path / "deflate.npz", a, compressed=True)
    data = bytearray((tmp_path / "deflate.npz").read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("layer0/q.npy")
    start = info.header_offset + 30 + len(info.filename) + 100_000
    data[start:start + 400] = bytes(b ^ 0x5A for b in data[start:start + 400])
    (tmp_path / "deflate.npz").write_bytes(bytes(data))
    refused(tmp_path / "deflate.npz", r"not a readable .npz archive \((error|BadZipFile)\)")
