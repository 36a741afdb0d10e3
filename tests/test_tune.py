"""vaepack tune: the search on synthetic measurements (frontier, pruning, choice, budget, Ctrl-C), then
end to end on a tiny random-init model (seconds), and presets: save/load and option precedence."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vaepack import presets as PR
from vaepack import tune as T
from vaepack.errors import OutputExistsError, UsageError
from vaepack.vae import pick_device


# --------------------------------------------------------------------------- the search, measured by a fake
class FakeMeasurer:
    """Fixed (latency ms, PSNR) per (pair, scale, backend); SSIM follows PSNR."""

    def __init__(self, table: dict, interrupt_after: int | None = None, clock=None, cost: float = 0.0):
        self.table, self.interrupt_after, self.clock, self.cost = table, interrupt_after, clock, cost
        self.quality_calls: list[str] = []
        self.calls: list[tuple[str, int]] = []  # (candidate, warmup) per latency call

    def latency(self, c, warmup, calls):
        if self.clock is not None:
            self.clock[0] += self.cost
        ms = self.table[(c.pair, c.scale, c.backend)][0]
        self.calls.append((c.label, warmup))
        rt = {"backend": c.backend, "precision": c.precision}
        return T.Latency([ms] * calls, rt, rt)

    def quality(self, c, stop):
        if self.interrupt_after is not None and len(self.quality_calls) >= self.interrupt_after:
            raise KeyboardInterrupt
        if self.clock is not None:
            self.clock[0] += self.cost
        if stop():
            return None
        self.quality_calls.append(c.label)
        db = self.table[(c.pair, c.scale, c.backend)][1]
        return {"psnr": db, "ssim": db / 40, "haarpsi": db / 35, "gmsd": 1 / db, "images": 2}


# taef2 x1 and x2 and default x1 are on the frontier; default x2 is slower and worse than taef2 x1
TABLE = {("taef2", 1.0, "torch"): (100.0, 30.0), ("taef2", 2.0, "torch"): (400.0, 31.0),
         ("vaepack-f2-p64", 1.0, "torch"): (50.0, 28.0), ("vaepack-f2-p64", 2.0, "torch"): (200.0, 29.5)}


def cfg(**kw) -> T.TuneConfig:
    base = dict(images=["unused"], models=["taef2", "default"], scales=[1, 2], backends=["torch"], precisions=["fp32"])
    return T.TuneConfig(**{**base, **kw})


def by_label(res: dict) -> dict:
    return {f"{p['model']} x{p['scale']:g}": p for p in res["points"]}


def test_frontier_is_dominance_free_and_the_cheapest_point_meeting_the_target_wins():
    res = T.run_tune(cfg(target_psnr=29.0), FakeMeasurer(TABLE))
    pts = by_label(res)
    assert {k for k, p in pts.items() if p["frontier"]} == {"vaepack-f2-p64 x1", "taef2 x1", "taef2 x2"}
    assert not pts["vaepack-f2-p64 x2"]["frontier"] and pts["vaepack-f2-p64 x2"]["status"] == "ok"
    ok = [p for p in res["points"] if p["status"] == "ok"]
    for f in (p for p in ok if p["frontier"]):  # nothing dominates a frontier point ...
        assert not any(q["latency_ms"] <= f["latency_ms"] and q["psnr"] >= f["psnr"] and q is not f
                       and (q["latency_ms"], q["psnr"]) != (f["latency_ms"], f["psnr"]) for q in ok)
    for d in (p for p in ok if not p["frontier"]):  # ... and a frontier point dominates every other one
        assert any(f["latency_ms"] <= d["latency_ms"] and f["psnr"] >= d["psnr"] for f in ok if f["frontier"])
    rec = res["recommended"]
    assert (rec["model"], rec["scale"], rec["psnr"], rec["latency_ms"]) == ("taef2", 1.0, 30.0, 100.0)
    assert rec["encoder"] == {"backend": "torch", "precision": "fp32"} and rec["decoder_runtime"]["backend"] == "torch"
    assert set(rec) >= {"model", "decoder", "scale", "nfe", "encoder", "decoder_runtime", "psnr", "ssim", "latency_ms"}
    assert res["recommended_reason"] is None and json.loads(json.dumps(res)) == res


@pytest.mark.parametrize("kw,want", [
    (dict(target_psnr=30.5), ("taef2", 2.0)),
    (dict(max_ms=250), ("taef2", 1.0)),  # the best quality within the budget
    (dict(target_psnr=29.0, max_ms=90), None),  # meets the target only above 90 ms
    (dict(target_ssim=0.74), ("taef2", 1.0)),  # SSIM = PSNR / 40 here
])
def test_choice_per_target(kw, want):
    res = T.run_tune(cfg(**kw), FakeMeasurer(TABLE))
    rec = res["recommended"]
    assert (rec and (rec["model"], rec["scale"])) == (want or None)
    if want is None:
        assert "within 90 ms" in res["recommended_reason"]


def test_no_point_meets_the_target_gives_null_with_the_reason():
    res = T.run_tune(cfg(target_psnr=32), FakeMeasurer(TABLE))
    assert res["recommended"] is None
    assert "32" in res["recommended_reason"] and "31" in res["recommended_reason"]
    res = T.run_tune(cfg(), FakeMeasurer(TABLE))
    assert res["recommended"] is None and "--target-psnr" in res["recommended_reason"]


def test_slower_backends_of_a_group_are_pruned_before_their_quality(monkeypatch):
    import vaepack.runtime as R

    monkeypatch.setattr(R, "available_backends", lambda: {"torch": None, "openvino": None, "onnxruntime": None,
                                                          "tensorrt": "no"})
    table = dict(TABLE)
    for (pair, scale, _), (ms, db) in TABLE.items():
        table[(pair, scale, "openvino")] = (ms / 3, db)
    m = FakeMeasurer(table)
    res = T.run_tune(cfg(backends=["torch", "ov"], target_psnr=29.0), m)  # an alias names a backend too
    torch_pts = [p for p in res["points"] if p["backend"] == "torch"]
    assert torch_pts and all(p["status"] == "pruned" and "openvino" in p["reason"] for p in torch_pts)
    assert all("openvino" in label for label in m.quality_calls) and len(m.quality_calls) == 4
    # round-robin: every candidate once per round (warm-up in the first); torch, 3x slower than OpenVINO
    # in its group (over the 1.5x cutoff), leaves after its first call
    labels = [label for label, _ in m.calls]
    planned = [p.cand.label for p in T.plan(cfg(backends=["torch", "ov"]), pick_device("cpu"))]
    assert [w for _, w in m.calls[:8]] == [1] * 8 and labels[:8] == planned
    assert labels[8:] == [lb for lb in labels[:8] if "openvino" in lb] * 2  # rounds 2 and 3: OpenVINO only
    assert all(p["runs"] == 1 for p in torch_pts) and all(p["runs"] == 3 for p in res["points"] if p["status"] == "ok")
    assert res["recommended"]["backend"] == "openvino" and res["recommended"]["latency_ms"] == pytest.approx(100 / 3)


def test_budget_and_ctrl_c_keep_the_finished_points():
    clock = [0.0]
    # every measurement costs 50 s of a 5 min budget: one round of 4 latencies, then 2 qualities fit
    res = T.run_tune(cfg(target_psnr=29.0, budget_minutes=5, repeat=1), FakeMeasurer(TABLE, clock=clock, cost=50.0),
                     clock=lambda: clock[0])
    st = [p["status"] for p in res["points"]]
    assert res["budget_exhausted"] and st.count("ok") == 2 and st.count("unmeasured") == 2
    assert all("budget" in p["reason"] for p in res["points"] if p["status"] == "unmeasured")
    # the two fastest were measured (50 and 100 ms): taef2 x1 meets the target
    assert res["recommended"]["model"] == "taef2"
    res = T.run_tune(cfg(target_psnr=29.0), FakeMeasurer(TABLE, interrupt_after=1))
    assert res["interrupted"] and [p["status"] for p in res["points"]].count("ok") == 1
    assert res["recommended"] is None and "unmeasured" in res["recommended_reason"]


def test_plan_skips_what_cannot_run_and_checks_options(monkeypatch):
    dev = pick_device("cpu")
    pts = T.plan(cfg(models=["taef2"], scales=[1], backends=["torch"], precisions=["fp32", "int8"]), dev)
    assert [p.status for p in pts] == ["skipped", "planned"]  # int8 first (cheapest), skipped: torch has none
    assert "not int8" in pts[0].reason
    monkeypatch.setattr("vaepack.runtime.available_backends", lambda: {"torch": None, "openvino": None})
    pts = T.plan(cfg(models=["taef2", "default"], scales=[1], backends=["openvino"], precisions=["int8"]), dev)
    assert [(p.cand.model, p.status) for p in pts] == [("taef2", "skipped"), ("vaepack-f2-p64", "planned")]
    assert "calibration" in pts[0].reason  # the default encoder ships one, TAEF2 none
    pts = T.plan(cfg(models=["taef2:eps@2"], scales=[1], backends=["torch"], precisions=["fp32"]), dev)
    assert pts[0].status == "planned" and pts[0].cand.pair == "taef2:taef2-eps@2"
    pts = T.plan(cfg(models=["taef2@2"], scales=[1], backends=["torch"], precisions=["fp32"]), dev)
    assert pts[0].status == "skipped" and "not a diffusion decoder" in pts[0].reason
    assert T.parse_spec("default:eps@1") == ("default", "eps", 1)
    for bad in ("taef2:", "taef2@x", "taef2@0"):
        with pytest.raises(UsageError):
            T.parse_spec(bad)
    with pytest.raises(UsageError, match="space"):
        T.plan(cfg(models=["taef2:taesd"]), dev)
    with pytest.raises(UsageError, match="unknown backend"):
        T.plan(cfg(backends=["cuda-magic"]), dev)
    for kw in (dict(target_psnr=30, target_ssim=0.9), dict(part="decoder"), dict(scales=[0]), dict(size=8)):
        with pytest.raises(UsageError):
            cfg(**kw).check()


# --------------------------------------------------------------------------- presets
def test_preset_save_load_and_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("VAEPACK_PRESETS", str(tmp_path / "presets"))
    p = PR.Preset(name="fast", model="default", decoder="eps", scale=1.5, backend="openvino", precision="int8", nfe=2,
                  measured={"psnr": 30.1})
    path = PR.save_preset(p)
    assert path == tmp_path / "presets" / "fast.json" and PR.load_preset("fast") == p and PR.list_presets() == ["fast"]
    with pytest.raises(OutputExistsError):
        PR.save_preset(p)
    PR.save_preset(p, force=True)
    with pytest.raises(UsageError, match=r"unknown preset 'slow' \(saved: fast\)"):
        PR.load_preset("slow")
    with pytest.raises(UsageError, match="bad preset name"):
        PR.preset_path("../x")
    defaults = {"model": "default", "decoder": None, "scale": 1.0, "steps": None, "backend": "auto", "dtype": None}
    full = PR.apply_preset("fast", "roundtrip", defaults, set())
    assert full == {"model": "default", "decoder": "eps", "scale": 1.5, "steps": 2, "backend": "openvino",
                    "dtype": "int8"}
    # explicit options win; an explicit model drops the preset's decoder and its steps
    mine = PR.apply_preset("fast", "roundtrip", {**defaults, "model": "taef2", "scale": 1.0}, {"model", "scale"})
    assert mine == {"model": "taef2", "decoder": None, "scale": 1.0, "steps": None, "backend": "openvino",
                    "dtype": "int8"}
    own = PR.apply_preset("fast", "roundtrip", {**defaults, "decoder": "taef2"}, {"decoder"})
    assert own["decoder"] == "taef2" and own["steps"] is None and own["scale"] == 1.5
    enc = PR.apply_preset("fast", "encode", {"model": "default", "scale": 1.0, "backend": "auto", "dtype": None}, set())
    assert enc == {"model": "default", "scale": 1.5, "backend": "openvino", "dtype": "int8"}
    dec = PR.apply_preset("fast", "decode", {"model": "x", "decoder": None, "steps": None, "backend": "auto",
                                             "dtype": None}, {"model"})
    assert dec["decoder"] is None and dec["steps"] is None and dec["backend"] == "openvino"
    assert PR.apply_preset(None, "roundtrip", defaults, set()) == defaults
    (tmp_path / "presets" / "broken.json").write_text("{")
    with pytest.raises(UsageError, match="unreadable preset"):
        PR.load_preset("broken")


# --------------------------------------------------------------------------- end to end, a tiny model
@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    pytest.importorskip("onnx")
    from tests.test_export import make_zoo

    with pytest.MonkeyPatch.context() as mp:
        yield make_zoo(tmp_path_factory.mktemp("zoo"), mp)


@pytest.fixture
def photos(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "photos"
    d.mkdir()
    for i, (h, w) in enumerate([(32, 40), (24, 32)]):
        low = Image.fromarray((rng.random((h // 4, w // 4, 3)) * 255).astype(np.uint8))
        low.resize((w, h), Image.BICUBIC).save(d / f"p{i}.png")
    return d


def test_tune_end_to_end_then_roundtrip_with_the_preset(zoo, photos, tmp_path, run_cli, one_thread, monkeypatch):
    monkeypatch.setenv("VAEPACK_PRESETS", str(tmp_path / "presets"))
    plot = tmp_path / "frontier.png"
    code, out, err = run_cli("tune", photos, "--models", zoo["tae"], "--scales", "1,2", "--backends", "torch",
                             "--precision", "fp32", "--size", "32", "--repeat", "1", "--warmup", "0",
                             "--target-psnr", "1", "--json", "--plot", plot, "--save-preset", "tiny")
    assert code == 0, err
    res = json.loads(out)
    ok = [p for p in res["points"] if p["status"] == "ok"]
    assert len(ok) == 2 and all(p["images"] == 2 and p["latency_ms"] > 0 and p["haarpsi"] > 0 for p in ok)
    fastest = min(ok, key=lambda p: p["latency_ms"])
    assert fastest["frontier"]  # the fastest point is always on the frontier
    rec = res["recommended"]  # every point meets 1 dB: the fastest one is chosen
    assert (rec["scale"], rec["latency_ms"]) == (fastest["scale"], fastest["latency_ms"])
    assert Image.open(plot).size[0] > 500 and "saved preset 'tiny'" in err
    # the preset drives roundtrip; explicit options win
    code, out, err = run_cli("roundtrip", photos / "p0.png", "--preset", "tiny", "--json")
    assert code == 0, err
    rt = json.loads(out)
    assert rt["encoder"] == zoo["tae"] and rt["scale"] == rec["scale"]
    assert rt["runtime"]["encoder"]["backend"] == "torch"
    code, out, err = run_cli("roundtrip", photos / "p0.png", "--preset", "tiny", "--scale", "3", "--json")
    assert code == 0, err and json.loads(out)["scale"] == 3.0
    code, out, err = run_cli("encode", photos / "p0.png", "--preset", "tiny", "-o", tmp_path / "z.latent.safetensors",
                             "--json")
    assert code == 0, err
    assert json.loads(out)["model"] == zoo["tae"] and json.loads(out)["scale"] == rec["scale"]


def test_tune_plot_without_matplotlib_and_unknown_preset_are_one_line(photos, tmp_path, run_cli, clean_error,
                                                                      monkeypatch):
    import sys

    monkeypatch.setenv("VAEPACK_PRESETS", str(tmp_path / "none"))
    code, out, err = run_cli("roundtrip", photos / "p0.png", "--preset", "nope")
    assert code == 2
    clean_error(err, "unknown preset 'nope'")
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    code, out, err = run_cli("tune", photos, "--plot", tmp_path / "f.png", "--target-psnr", "30")
    assert code == 1
    clean_error(err, "matplotlib", "pip install 'vaepack[plot]'")
