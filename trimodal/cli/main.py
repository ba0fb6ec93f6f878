"""The `mm` command: a table of contents. Each command lives in its own module and stays thin."""

from __future__ import annotations

import sys
import traceback
from typing import Annotated

import typer
from rich.markup import escape

from trimodal import __version__
from trimodal.cli import (caption, datasets, demo, download, evaluate, export, export_benchmark, featurize, info, pairs,
                          search, shard, train, validate)
from trimodal.cli.console import console, err_console
from trimodal.errors import TrimodalError
from trimodal.signals import Stopped, raise_on_stop_signals

app = typer.Typer(
    name="mm",
    help="Turn image / text / speech datasets into shards and cached features; train and evaluate retrieval "
         f"models.\n\nDatasets: {datasets.readable()}; {datasets.joined()}.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        print(f"mm (trimodal) {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug


app.command("download")(download.download)
app.command("validate")(validate.validate)
app.command("shard")(shard.shard)
app.command("featurize")(featurize.featurize)
app.command("train", context_settings={"allow_extra_args": False})(train.train)
app.command("eval")(evaluate.evaluate)
app.command("caption")(caption.caption)
app.command("index")(search.index)
app.command("search")(search.search)
app.command("serve")(search.serve)
app.command("export")(export.export)
app.command("info")(info.info)
app.command("pairs")(pairs.pairs)
app.command("export-benchmark")(export_benchmark.export_benchmark)
app.command("demo")(demo.demo)


def main(argv: list[str] | None = None) -> int:
    """Run `mm` with `argv` and return its exit status; known failures become one red line. Under torchrun
    only rank 0 prints; another rank prints only an error of its own (one after it joined the group, or a
    failed collective), prefixed with its rank."""
    from trimodal import distributed

    rank = distributed.launched_rank()
    console.quiet = rank > 0
    command = typer.main.get_command(app)
    try:
        with raise_on_stop_signals():  # SIGTERM, SIGUSR1 and Ctrl-C raise Stopped (mm train asks at step ends)
            # Standalone mode lets click report usage errors itself; it always ends in SystemExit.
            command.main(args=argv, prog_name="mm", standalone_mode=True)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except Stopped as stop:
        if rank == 0:
            err_console.print(f"[yellow]{escape(str(stop))}[/yellow]", soft_wrap=True)
        return stop.exit_code
    except TrimodalError as error:
        if _state["debug"]:
            traceback.print_exc()
        if rank == 0 or distributed.joined() or isinstance(error, distributed.DistributedError):
            where = f"rank {rank}: " if rank else ""
            err_console.print(f"[red]{where}error:[/red] {escape(str(error))}", soft_wrap=True)
        return error.exit_code
    return 0


def run() -> None:
    sys.exit(main())
