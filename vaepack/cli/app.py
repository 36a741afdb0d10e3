"""The ``vaepack`` command: a thin shell over the library.

Each command parses options, calls the library and prints. A VaepackError becomes one line on
stderr and its exit code (1, or 2 for usage errors); nothing else is caught, so a real bug keeps its
traceback. ``--json`` prints machine-readable output on stdout. The commands live in one module per
group (run, weights, train, analysis, export, bench); this module assembles them.
"""

from __future__ import annotations

import logging
import sys
from typing import Iterable

import typer

from vaepack.cli import analysis, bench, convert, dataset, export, modelability, run, train, tune
from vaepack.cli.weights import weights_app
from vaepack.errors import VaepackError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fast, honest image VAEs: encode, decode, distill, export, benchmark.")
for name, fn in (("encode", run.encode), ("decode", run.decode), ("roundtrip", run.roundtrip),
                 ("convert", convert.convert),
                 ("distill", train.distill), ("distill-export", train.distill_export), ("train-eps", train.train_eps),
                 ("train-bridge", train.train_bridge), ("train-da", train.train_da), ("train-qat", train.train_qat),
                 ("sweep", analysis.sweep), ("latent-stats", analysis.latent_stats), ("export", export.export),
                 ("bench", bench.bench), ("tune", tune.tune), ("modelability", modelability.modelability)):
    app.command(name)(fn)
app.add_typer(weights_app, name="weights")
app.add_typer(dataset.dataset_app, name="dataset")


class _StderrHandler(logging.StreamHandler):
    """Writes to the *current* sys.stderr (it may be swapped after setup: tests, embedding apps)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


class _LevelFormatter(logging.Formatter):
    """Warnings say so; informational lines (training progress logs) are printed as they are."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return f"{record.levelname.lower()}: {msg}" if record.levelno >= logging.WARNING else msg


def _setup_logging() -> None:
    log = logging.getLogger("vaepack")
    if not log.handlers:
        h = _StderrHandler()
        h.setFormatter(_LevelFormatter())
        log.addHandler(h)
        log.setLevel(logging.WARNING)
        log.propagate = False


def _click_exceptions() -> tuple[tuple, tuple, tuple]:
    """(exit, usage, abort) exception types. Recent typer vendors its own click (typer._click),
    whose exceptions are not click's: catch both, or a typo in an option becomes a traceback."""
    exits: tuple = (typer.Exit,)
    usage: tuple = (typer.TyperException,) if hasattr(typer, "TyperException") else ()
    aborts: tuple = (typer.Abort,)
    try:
        import click

        exits += (click.exceptions.Exit,)
        usage += (click.ClickException,)
        aborts += (click.exceptions.Abort,)
    except ImportError:
        pass
    return exits, usage, aborts


def main(argv: Iterable[str] | None = None) -> int:
    exits, usage, aborts = _click_exceptions()
    _setup_logging()
    try:
        rv = app(args=list(argv) if argv is not None else None, standalone_mode=False)
        # With standalone_mode=False click *returns* the code of a typer.Exit raised in a command.
        return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
    except VaepackError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except exits as e:
        return e.exit_code
    except usage as e:
        msg = e.format_message()
        if msg.strip():  # empty when the help was shown instead (no arguments at all)
            print(f"error: {msg}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except (KeyboardInterrupt, *aborts):
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0

