"""INI reading shared by `.spec` and `.cfg` files: configparser plus the line of every key for error messages."""

from __future__ import annotations

import configparser
import re
from dataclasses import dataclass
from pathlib import Path

from znn.errors import FormatError, where
from znn.io.files import read_text

_SECTION = re.compile(r"^\s*\[([^\]]+)\]")
_KEY = re.compile(r"^([^\s=:#;][^=:]*?)\s*[=:]")


@dataclass
class IniFile:
    """A parsed INI file: ``sections[name][key] = value`` and ``lines[(section, key)] = line number``."""

    path: Path | None
    sections: dict[str, dict[str, str]]
    lines: dict[tuple[str, str | None], int]

    def at(self, section: str, key: str | None = None) -> str:
        """``file:line: [section] key`` for error messages."""
        line = self.lines.get((section, key), self.lines.get((section, None)))
        text = f"{where(self.path, line)}: [{section}]"
        return text + (f" {key}" if key else "")

    def resolve(self, value: str) -> Path:
        """A path written in this file, relative to the file's folder."""
        p = Path(value).expanduser()
        if p.is_absolute() or self.path is None:
            return p
        return self.path.parent / p


class _CaseSensitiveParser(configparser.ConfigParser):
    """A ConfigParser that keeps keys as written (the default lower-cases them)."""

    def optionxform(self, optionstr: str) -> str:
        return optionstr


def read_ini(path: str | Path, error: type[FormatError], what: str) -> IniFile:
    """Read an INI file; syntax errors become ``error`` naming the file and line."""
    return parse_ini(read_text(path, error, what), Path(path), error)


def parse_ini(text: str, path: Path | None, error: type[FormatError]) -> IniFile:
    # Keys are case-sensitive (ZNN spells Num_iter_per_test with a capital); inline comments are not stripped
    # by configparser, so `#` after a value is kept, as in ZNN.
    parser = _CaseSensitiveParser(interpolation=None, strict=True)
    try:
        parser.read_string(text, source=str(path))
    except configparser.MissingSectionHeaderError as exc:
        raise error(f"{where(path, exc.lineno)}: a key before any [section]; files start with a section header "
                    "such as [parameters]") from None
    except (configparser.DuplicateSectionError, configparser.DuplicateOptionError) as exc:
        what = f"key {exc.option!r}" if isinstance(exc, configparser.DuplicateOptionError) else "section"
        raise error(f"{where(path, exc.lineno)}: [{exc.section}] {what} appears twice; keep one") from None
    except configparser.ParsingError as exc:
        line = exc.errors[0][0] if exc.errors else None
        raise error(f"{where(path, line)}: not an INI `key = value` line; write `key = value`") from None
    except configparser.Error as exc:
        raise error(f"{where(path)}: {exc.message}") from None
    sections = {name: dict(parser[name]) for name in parser.sections()}
    return IniFile(path, sections, _line_numbers(text))


def _line_numbers(text: str) -> dict[tuple[str, str | None], int]:
    lines: dict[tuple[str, str | None], int] = {}
    section = ""
    for number, line in enumerate(text.splitlines(), start=1):
        header = _SECTION.match(line)
        if header:
            section = header.group(1).strip()
            lines.setdefault((section, None), number)
            continue
        key = _KEY.match(line)
        if key and section:
            lines.setdefault((section, key.group(1).strip()), number)
    return lines
