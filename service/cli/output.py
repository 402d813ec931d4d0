"""How commands report: one JSON object on stdout, readable errors on stderr."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
import orjson

from service.errors import FhirError


def emit(obj: Any) -> None:
    """Print one JSON object on stdout (machine-readable output of a command)."""
    click.echo(orjson.dumps(obj).decode())


@contextmanager
def readable_errors() -> Iterator[None]:
    """Turn domain errors into a one-line message and exit status 1, never a traceback."""
    try:
        yield
    except FhirError as exc:
        raise click.ClickException(exc.message) from None


def csv_list(convert: Callable[[str], Any] = str) -> Callable[[click.Context, click.Parameter, str | None], Any]:
    def callback(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
        return [convert(v.strip()) for v in value.split(",") if v.strip()] if value else []
    return callback
