"""The ``loramerge`` app: each command lives in its own module and is registered here."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from typer._click import exceptions as click_errors  # typer 0.29 vendors click: its exceptions live here
from typer.core import TyperGroup

from mergekit_lora import __version__

from .cluster_cmd import cluster
from .eval_cmd import eval_app
from .export_cmd import export
from .inspect_cmd import inspect
from .library_cmd import library_app
from .merge_cmd import merge
from .methods_cmd import methods
from .push_cmd import push
from .route_cmd import route
from .run_cmd import run
from .serve_cmd import generate, serve
from .tune_cmd import tune


class _OneLineErrors(TyperGroup):
    """click's own errors (missing option, bad int, unknown flag) as the one ``error: …`` line, exit 2,
    like every other user error; Ctrl-C prints ``interrupted`` and exits 130."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as e:  # bare `loramerge` / `loramerge eval`: the help
            if not standalone_mode:
                raise
            e.show()
            sys.exit(e.exit_code)
        except click_errors.ClickException as e:
            if not standalone_mode:
                raise
            command = e.ctx.command_path if isinstance(e, click_errors.UsageError) and e.ctx else "loramerge"
            typer.echo(f"error: {e.format_message().rstrip('.')} (see `{command} --help`)", err=True)
            sys.exit(2 if isinstance(e, click_errors.UsageError) else e.exit_code)
        except typer.Abort:
            rv = 130
        if rv == 130:  # typer turns KeyboardInterrupt into Exit(130)
            typer.echo("interrupted", err=True)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
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
app.add_typer(library_app, name="library")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
