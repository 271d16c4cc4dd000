"""Config's settings as command-line flags and ``PIPEPROXY_*`` variables.

Every Config field carries a Setting (core/config.py). From it this module makes the
flag, its help (with the field's own default), the variable, and the check of a value,
so no setting is spelled out here. A flag on the command line wins over its variable;
a bad value from either gets the same one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..core import values
from ..core.config import Config, Setting, settings

ENV_PREFIX = "PIPEPROXY_"


def variable(setting: Setting) -> str:
    return ENV_PREFIX + setting.variable


def metavar(setting: Setting) -> str:
    return setting.metavar or "{" + ",".join(setting.choices) + "}"


def convert(setting: Setting, text: str) -> Any:
    """One value's text to its value; ValueError says why not."""
    if setting.choices:
        text = text.strip().lower()
        if text not in setting.choices:
            raise ValueError(f"invalid choice: {text!r} (choose from {', '.join(setting.choices)})")
    return setting.parse(text)


def default_text(setting: Setting, default: Any) -> str:
    """The default as the help and README show it."""
    if setting.required:
        return "required"
    if setting.choices:
        return next(choice for choice in setting.choices if setting.parse(choice) == default)
    return values.show(default)


def help_text(setting: Setting, default: Any) -> str:
    shown = "required" if setting.required else f"default: {default_text(setting, default)}"
    repeat = "; repeat for more (the variable: a comma- or space-separated list)" if setting.gather else ""
    # argparse %-formats help strings.
    return f"{setting.help} ({shown}){repeat} [${variable(setting)}]".replace("%", "%%")


def flag_type(setting: Setting) -> Callable[[str], Any]:
    """``convert`` as argparse wants it, so a bad flag's error says why."""

    def convert_flag(text: str) -> Any:
        try:
            return convert(setting, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert_flag


def add_flags(parser: argparse.ArgumentParser, names: Iterable[str], *, in_subcommand: bool = False) -> None:
    """A flag for each setting in ``names``.

    ``in_subcommand``: a flag not given leaves nothing, so it cannot hide the same flag
    given before the subcommand (``pipeproxy --listen X serve``).
    """
    table = settings()
    for name in names:
        setting, default = table[name]
        parser.add_argument(
            setting.flag,
            dest=name,
            type=flag_type(setting),
            action="append" if setting.gather else "store",
            metavar=metavar(setting),
            help=help_text(setting, default),
            default=argparse.SUPPRESS if in_subcommand else None,
        )


def to_config(parser: argparse.ArgumentParser, args: argparse.Namespace, environ: Mapping[str, str],
              names: Iterable[str]) -> Config:
    """The Config from the settings in ``names``: each flag given, else its variable, else the default."""
    table = settings()
    given = {}
    for name in names:
        setting, _ = table[name]
        value = getattr(args, name, None)
        if value is None:
            value = from_environment(parser, setting, environ)
        if value is None:
            if setting.required:
                parser.error(f"{setting.flag} {metavar(setting)} (or {variable(setting)}) is required")
            continue
        given[name] = setting.gather(value) if setting.gather else value
    try:
        return Config(**given)
    except ValueError as error:  # settings that do not fit together
        parser.error(str(error))


def from_environment(parser: argparse.ArgumentParser, setting: Setting, environ: Mapping[str, str]) -> Any:
    """The setting's value from its variable; None if unset or empty."""
    raw = environ.get(variable(setting), "").strip()
    if not raw:
        return None
    texts = [text for text in re.split(r"[,\s]+", raw) if text] if setting.gather else [raw]
    try:
        converted = [convert(setting, text) for text in texts]
    except ValueError as error:
        parser.error(f"{variable(setting)}: {error}")
    return converted if setting.gather else converted[0]
