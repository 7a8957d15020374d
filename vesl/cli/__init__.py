"""The one `vesl` command line (typer).

One module per command group (``label``, ``publish``, ``train``), each with ``register(app)``, so this file
stays a thin index; installed packages add commands through the ``vesl.commands`` entry-point group. Command
modules import heavy libraries (torch, transformers) inside the command bodies, keeping `vesl --help` fast.
"""

from __future__ import annotations

import sys

import typer

from vesl.errors import UserError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags without a `<bool>` type, `[default]` brackets kept as written
    context_settings={"help_option_names": ["-h", "--help"]},
    help="VESL region-text labeling and CLOC pretraining.",
)

def _show_version(value: bool) -> None:
    if value:
        from vesl import __version__

        typer.echo(f"vesl {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show third-party INFO logs and model-loading bars"),
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True, help="Print the version and exit"),
) -> None:
    """VESL region-text labeling and CLOC pretraining."""
    set_verbosity(verbose)


def set_verbosity(verbose: bool) -> None:
    """Third-party logs (Beam, Ray, transformers' weight-loading bars) stay quiet unless ``--verbose``.

    Set through the environment, so that the workers an engine starts (local processes, Ray actors) inherit it.
    """
    import os

    if verbose:
        os.environ["VESL_VERBOSE"] = "1"
        os.environ["TRANSFORMERS_VERBOSITY"] = "info"


PLUGIN_GROUP = "vesl.commands"  # entry points: ``name = "package.module:register"``, called with the app


def _register_all() -> None:
    """The product's commands, then every installed plugin's: a package plugs in with an entry point, so this
    module names none of them."""
    from importlib.metadata import entry_points

    from vesl.cli import dedup, label, publish, train

    for module in (label, dedup, publish, train):
        module.register(app)
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        try:
            ep.load()(app)
        except Exception as exc:  # a broken plugin must not take the product's commands down with it
            print(f"warning: vesl plugin {ep.name!r} ({ep.value}) failed to load, its commands are missing: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)


_register_all()


def _one_line(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{loc}: {err.get('msg')}")
        return "invalid config: " + "; ".join(parts) + " (check the YAML file or flags; see `vesl label --help`)"
    return str(exc)


def main() -> None:
    """Entry point: user mistakes print one line on stderr and exit 2, never a traceback."""
    from pydantic import ValidationError

    try:  # typer >= 0.20 vendors its own click
        from typer._click.exceptions import ClickException, UsageError
    except ImportError:  # pragma: no cover
        from click import ClickException, UsageError

    try:
        rc = app(standalone_mode=False)
    except UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx is not None else "vesl"
        typer.echo(f"error: {exc.format_message()} (see `{cmd} --help`)", err=True)
        sys.exit(2)
    except (UserError, ValidationError) as exc:
        typer.echo(f"error: {_one_line(exc)}", err=True)
        sys.exit(2)
    except ClickException as exc:
        typer.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("interrupted; rerun the same command to resume (committed shards are skipped)", err=True)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)
