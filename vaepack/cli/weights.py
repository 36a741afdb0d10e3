"""``vaepack weights``: list, pull, verify and locate model weights."""

from __future__ import annotations

from typing import Optional

import typer

from vaepack.cli.common import JsonOpt, emit_json, human_size, note, stderr_console, stdout_console

weights_app = typer.Typer(no_args_is_help=True, help="List, pull, verify and locate model weights.")


def _entry(name: str):
    """A model (id or alias) or a bridge (its own manifest section; ids never collide with models)."""
    from vaepack.manifest import load_manifest

    man = load_manifest()
    return man.bridges[name] if name in man.bridges else man.get(name)


def _kind(e) -> str:
    from vaepack.manifest import BridgeEntry

    return "bridge" if isinstance(e, BridgeEntry) else "model"


@weights_app.command("list")
def weights_list(as_json: bool = JsonOpt):
    """Every model and bridge in weights_manifest.yaml, cached or not."""
    from vaepack import weights as W
    from vaepack.manifest import load_manifest

    man = load_manifest()
    rows = []
    for mid, e in man.models.items():
        status, size = W.cache_status(e)
        rows.append({"id": mid, "kind": "model", "aliases": list(e.aliases), "space": e.space.name,
                     "parts": list(e.parts),
                     "families": sorted({p.family for p in e.parts.values()}), "license": e.license,
                     "size": size, "embedded": e.embedded,
                     "status": status,
                     "description": e.description})
    bridges = []
    for bid, b in man.bridges.items():
        status, size = W.cache_status(b)
        bridges.append({"id": bid, "kind": "bridge", "source": b.source, "target": b.target,
                        "source_space": b.source_space, "target_space": b.target_space,
                        "tap": b.config.get("tap"), "family": b.family, "license": b.license, "size": size,
                        "embedded": b.embedded, "status": status, "description": b.description})
    if as_json:
        emit_json({"manifest": str(man.path), "cache": str(W.weights_dir()), "models": rows, "bridges": bridges})
        return
    from rich.table import Table

    t = Table(title=f"models ({man.path.name}); cache: {W.weights_dir()}")
    for c in ("id", "space", "parts", "family", "size", "status", "license"):
        t.add_column(c)
    for r in rows:
        ident = r["id"] + (f" ({', '.join(r['aliases'])})" if r["aliases"] else "")
        t.add_row(ident, r["space"], "+".join(r["parts"]), "+".join(r["families"]), human_size(r["size"]),
                  r["status"], r["license"])
    stdout_console().print(t)
    if bridges:  # their own section: a bridge maps one model's latent space into another's
        t = Table(title="bridges (vaepack convert --via bridge)")
        for c in ("id", "source -> target", "spaces", "tap", "size", "status", "license"):
            t.add_column(c)
        for r in bridges:
            t.add_row(r["id"], f"{r['source']} -> {r['target']}", f"{r['source_space']} -> {r['target_space']}",
                      str(r["tap"] or "-"), human_size(r["size"]), r["status"], r["license"])
        stdout_console().print(t)




@weights_app.command("pull")
def weights_pull(
    model: str = typer.Argument(..., help="Model id, alias or bridge id."),
    force: bool = typer.Option(False, "--force", help="Download again even if cached."),
    clear_partial: bool = typer.Option(False, "--clear-partial", help="Delete partial downloads first "
                                       "instead of resuming them."),
    as_json: bool = JsonOpt,
):
    """Download a model's or bridge's files (mirror first: VAEPACK_MIRROR), verify sha256, cache them."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from vaepack import weights as W

    e = _entry(model)
    if clear_partial:
        W.clear_partial(e)
    err = stderr_console()
    out = []
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=err, disable=not err.is_terminal, transient=True) as prog:
        for f in W.model_files(e):
            task = prog.add_task(f.name, total=f.size)
            path = W.pull_file(f, progress=lambda d, t: prog.update(task, completed=d, total=t), force=force)
            out.append({"file": f.name, "path": str(path), "sha256": W.expected_sha256(f)})
            if not as_json:
                note(f"{f.name}: ok ({path})")
    if as_json:
        emit_json({"model": e.id, "kind": _kind(e), "files": out})




@weights_app.command("verify")
def weights_verify(model: Optional[str] = typer.Argument(None, help="Model or bridge id (default: every cached "
                                                                    "model and bridge)."),
                   as_json: bool = JsonOpt):
    """Re-hash cached files against the manifest; a mismatch is an error."""
    from vaepack import weights as W
    from vaepack.errors import WeightsError
    from vaepack.manifest import load_manifest

    man = load_manifest()
    entries = [_entry(model)] if model else [*man.models.values(), *man.bridges.values()]
    results, bad = [], 0
    for e in entries:
        for s in W.status(e):
            if not s.present:
                if model:
                    results.append({"model": e.id, "kind": _kind(e), "file": s.spec.name, "status": "missing"})
                    bad += 1
                continue
            try:
                W.verify_file(s.spec, s.path)
                results.append({"model": e.id, "kind": _kind(e), "file": s.spec.name, "status": "ok"})
            except WeightsError as ex:
                results.append({"model": e.id, "kind": _kind(e), "file": s.spec.name, "status": "bad",
                                "error": str(ex)})
                bad += 1
    if as_json:
        emit_json({"files": results})
    else:
        for r in results:
            note(f"{r['model']}/{r['file']}: {r['status']}" + (f" - {r['error']}" if "error" in r else ""))
        if not results:
            note("nothing cached to verify")
    if bad:
        raise typer.Exit(1)




@weights_app.command("path")
def weights_path(model: str = typer.Argument(...), part: Optional[str] = typer.Option(None, "--part")):
    """Print the local path of a model's or bridge's files (pulls nothing; exit 1 if missing)."""
    from vaepack import weights as W

    e = _entry(model)
    parts = [e.part(part).part] if part else None  # an unknown --part is a usage error (exit 2)
    missing = False
    for f in W.model_files(e, parts):  # a file shared by encoder and decoder is listed once
        path = W.file_path(f)
        print(path)
        missing |= not path.is_file()
    if missing:
        note(f"some files of '{e.id}' are not cached; run `vaepack weights pull {e.id}`")
        raise typer.Exit(1)

