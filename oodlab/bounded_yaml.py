"""Every YAML document oodlab reads (configs, command-line overrides, benchmarks) goes through `read` or `parse`.

PyYAML's safe loader builds no objects from tags, but it builds whatever a few lines of anchors and aliases
stand for (`a: &a [x, x, x, x, x, x, x, x, x, x]`, `b: &b [*a, *a, ...]`, ...: nine levels are a billion
values, and validating or printing them takes minutes), its C composer overflows the stack on deep nesting,
and it reads a file of any size. So a document is first scanned as a stream of parser events, which stops
at the first limit crossed, before anything is built:

- at most MAX_BYTES bytes;
- at most MAX_NODES values, each alias counted as the whole value it repeats;
- at most MAX_DEPTH levels of nesting (through aliases too); no alias of a value that contains it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from oodlab.limits import human_bytes

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML has it: the same documents, faster

MAX_BYTES = 1 << 20  # a config or a benchmark is a few KiB
MAX_NODES = 100_000
MAX_DEPTH = 64


class YamlError(ValueError):
    """A document that is not valid YAML or crosses a limit; the message names the file (or override)."""


def read(path: str | Path) -> Any:
    """The YAML file `path` as Python values (None when empty)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)  # (not stat: /dev/zero and pipes have no size)
    except OSError as err:
        raise YamlError(f"{path}: cannot read it ({err.strerror})") from None
    return parse(data, str(path))


def parse(text: str | bytes, where: str) -> Any:
    """A YAML document (text, or bytes in UTF-8/16) as Python values; YamlError naming `where` if it is refused."""
    if len(text) > MAX_BYTES:
        raise YamlError(f"{where}: longer than {human_bytes(MAX_BYTES)}, the most a YAML document oodlab reads may "
                        "have (a config or a benchmark is a few KiB); is it the right file?")
    try:
        check_size(text, where)
        loader = Loader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except YamlError:
        raise
    except yaml.YAMLError as err:
        raise YamlError(f"{where}: not valid YAML ({err}); fix the line it names") from None
    except (ValueError, OverflowError) as err:  # a scalar Python cannot hold: a 5000-digit int, 2024-13-45
        raise YamlError(f"{where}: a value cannot be read ({str(err).split(';')[0]}); write it differently") from None


def check_size(text: str | bytes, where: str) -> None:
    """Scan the parser's events; YamlError at the first limit crossed (see the module docstring)."""
    open_: list[list[Any]] = []  # per open collection: [anchor, values before it, height of its deepest child]
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (values, height) of the value it names
    values = 0
    for event in yaml.parse(text, Loader=Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            open_.append([event.anchor, values, 0])
            values += 1
            if len(open_) > MAX_DEPTH:
                raise YamlError(f"{where}: nested more than {MAX_DEPTH} levels deep (line "
                                f"{event.start_mark.line + 1}); oodlab's documents need a handful")
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, before, inner = open_.pop()
            size, height = values - before, inner + 1
            if anchor is not None:
                anchors[anchor] = (size, height)
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in anchors:
                inside = any(entry[0] == event.anchor for entry in open_)
                raise YamlError(f"{where}: alias *{event.anchor} (line {event.start_mark.line + 1}) "
                                + ("repeats a value that contains it" if inside else "names no anchor defined before it"))
            size, height = anchors[event.anchor]
            values += size
            if len(open_) + height > MAX_DEPTH:
                raise YamlError(f"{where}: alias *{event.anchor} (line {event.start_mark.line + 1}) nests values more "
                                f"than {MAX_DEPTH} levels deep")
        elif isinstance(event, yaml.ScalarEvent):
            size, height = 1, 0
            values += 1
            if event.anchor is not None:
                anchors[event.anchor] = (size, height)
        else:
            continue
        if open_:
            open_[-1][2] = max(open_[-1][2], height)
        if values > MAX_NODES:
            raise YamlError(f"{where}: more than {MAX_NODES:,} values (by line {event.start_mark.line + 1}; each "
                            "*alias counts as the whole value it repeats, so an alias bomb stops here); oodlab's "
                            "documents hold a few hundred: shorten the lists or write out what the aliases stand for")
