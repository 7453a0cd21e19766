"""The ``loramerge`` app: each command lives in its own module and is registered here."""

from __future__ import annotations

from typing import Annotated

import typer

from mergekit_lora import __version__

from .cluster_cmd import cluster
from .eval_cmd import eval_app
from .export_cmd import export
from .inspect_cmd import inspect
from .merge_cmd import merge
from .methods_cmd import methods
from .push_cmd import push
from .route_cmd import route
from .run_cmd import run
from .serve_cmd import generate, serve
from .tune_cmd import tune

app = typer.Typer(
    name="loramerge",
    help="Merge and compose LoRA adapters as LoRAs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,  # plain click help: readable at 80 columns, no markup eating "[b;a]"
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"loramerge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Merge and compose LoRA adapters as LoRAs."""


app.command()(inspect)
app.command()(methods)
app.command()(merge)
app.command()(run)
app.command()(push)
app.command()(cluster)
app.command()(route)
app.command()(tune)
app.command()(export)
app.command()(generate)
app.command()(serve)
app.add_typer(eval_app, name="eval")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
