"""The `aerialseg` command: one thin command per pipeline stage, no logic of its own.

Every command reads its knobs from params.yaml (``--params``) unless a flag overrides them.
Input problems print one line, ``error: <file>: <what> — fix: <how>``, and exit with code 2.
"""

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

import aerialseg  # noqa: F401  (offline defaults and the torchvision fix come first)
from aerialseg.errors import AerialsegError

app = typer.Typer(
    help="aerialseg: labelled drone surveys -> land-cover models -> georeferenced maps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read the stage's knobs from.")]


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    """Turn AnyLabeling labels on drone orthophotos into models and full-scene maps."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")


# --- data path: labels -------------------------------------------------------------------

# --- data path: tiles, split, augment ----------------------------------------------------

# --- models: pretrain, train, distil, evaluate, report ------------------------------------

# --- inference: infer-scene, bundle -------------------------------------------------------

# --- seed models: postprocess, prune, export, quantize ------------------------------------


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except AerialsegError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted: no output was written", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
