"""README: "an existing output is never overwritten without `--force`", for every command that writes
files. Each case runs twice into the same output: the second run must refuse (one `error:` line naming
the output and `--force`, non-zero exit, the file untouched), and a third run with `--force` must
replace it.

Tiny and fast on purpose: 40x48 generated photos, the embedded default model (no download, no
../shared), `--backend torch`, one thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

MARKER = b"not written by vaepack"


@dataclass(frozen=True)
class Inputs:
    photo: Path
    data: Path  # a folder with the photo
    latent: Path
    run: Path  # an unfinished `vaepack distill` run (checkpoint.pt)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    import numpy as np
    import torch
    from PIL import Image

    from vaepack.cli.app import main

    root = tmp_path_factory.mktemp("overwrite_inputs")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    photo = data / "photo.png"
    Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")).save(photo)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        latent = root / "photo.latent.safetensors"
        assert main(["encode", str(photo), "-o", str(latent), "--backend", "torch"]) == 0
        run = root / "run"
        assert main(["distill", "--teacher", "default", "--data", str(data), "--out", str(run), "--width", "8",
                     "--config", '{"blocks_per_stage": 1}', "--schedule", "32:1", "--batch", "1",
                     "--threads", "1", "--fp32", "--max-minutes", "0"]) == 0
    finally:
        torch.set_num_threads(n)
    assert (run / "checkpoint.pt").is_file()
    return Inputs(photo, data, latent, run)


@dataclass(frozen=True)
class Case:
    """``args(inputs, out)`` is the command line writing into ``out`` (a file or, for export, a folder);
    ``outputs(out)`` lists the files it writes."""

    args: Callable[[Inputs, Path], list]
    outputs: Callable[[Path], list[Path]] = lambda out: [out]
    out_name: str = "out"


def _export_outputs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.suffix in (".onnx", ".json"))


RUN = ["--backend", "torch"]
CASES = {
    "encode": Case(lambda i, o: ["encode", i.photo, "-o", o, *RUN], out_name="p.latent.safetensors"),
    "encode-comfyui": Case(lambda i, o: ["encode", i.photo, "-o", o, "--format", "comfyui", *RUN],
                           out_name="p.latent"),
    "decode": Case(lambda i, o: ["decode", i.latent, "-o", o, *RUN], out_name="recon.png"),
    # another embedded model of the same space: the pixel path, no download
    "convert": Case(lambda i, o: ["convert", i.latent, "--to", "vaepack-f2-s32", "-o", o, *RUN],
                    out_name="c.latent.safetensors"),
    "roundtrip --compare": Case(lambda i, o: ["roundtrip", i.photo, "--compare", o, *RUN], out_name="cmp.png"),
    "roundtrip --save": Case(lambda i, o: ["roundtrip", i.photo, "--save", o, *RUN], out_name="rec.png"),
    "distill-export": Case(lambda i, o: ["distill-export", i.run, "-o", o], out_name="enc.safetensors"),
    "bench --json --plot": Case(
        lambda i, o: ["bench", "--models", "default", "--parts", "encoder", "--sizes", "32", "--repeat", "1",
                      "--warmup", "0", "--threads", "1", "--json", o, "--plot", o.with_suffix(".png")],
        outputs=lambda o: [o, o.with_suffix(".png")], out_name="bench.json"),
    "sweep --plot": Case(lambda i, o: ["sweep", i.photo, "--model", "default", "--scales", "1", "--crop", "32",
                                       "--plot", o], out_name="sweep.png"),
    "latent-stats --plot": Case(lambda i, o: ["latent-stats", i.photo, "--model", "default", "--teacher",
                                              "default", "--sizes", "32", "--plot", o], out_name="stats.png"),
    "export": Case(lambda i, o: ["export", "default", "--part", "encoder", "-o", o], outputs=_export_outputs,
                   out_name="artifacts"),
}
PARAMS = list(CASES)


def _state(paths: list[Path]) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in paths}


@pytest.mark.parametrize("name", PARAMS)
def test_second_run_refuses_without_force(name, inputs, run_cli, tmp_path, clean_error, one_thread):
    case = CASES[name]
    out = tmp_path / case.out_name
    args = case.args(inputs, out)

    code, _, err = run_cli(*args)
    assert code == 0, err
    written = case.outputs(out)
    assert written and all(p.is_file() and p.stat().st_size > 0 for p in written), written
    before = _state(written)

    code, _, err = run_cli(*args)
    assert code != 0, f"{name} overwrote {out} without --force"
    clean_error(err, str(out), "--force")
    assert _state(case.outputs(out)) == before  # untouched, bytes and mtime

    for p in written:  # so that "replaced" is visible whatever the output's content
        p.write_bytes(MARKER)
    code, _, err = run_cli(*args, "--force")
    assert code == 0, err
    assert case.outputs(out) == written
    assert all(p.read_bytes() != MARKER for p in written)
    leftovers = [p.name for p in out.parent.rglob("*") if ".tmp" in p.name or p.name.endswith(".part")]
    assert not leftovers  # no temporary files left behind
