"""The configs shipped with the package, reachable by name from any directory.

The repository's top-level ``configs/`` is the one source: a wheel installs it as
``lightning_registers/configs`` (see ``pyproject.toml``), a checkout reads it in place. A
``--config`` value that is not a file is looked up there by name: ``demo/supervised``,
``demo/supervised.yaml`` and ``configs/demo/supervised.yaml`` all name the same recipe, and a
file of that path in the working directory always wins. ``lightning-registers configs
list|show|copy`` lists, prints and copies them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

CONFIG_FLAGS = ("--config", "-c")
SHIPPED_SUFFIXES = (".yaml", ".txt")


def configs_dir() -> Path:
    """The shipped configs: inside the installed package, else the checkout's ``configs/``."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def config_names() -> list[str]:
    """Every shipped YAML config by name (``demo/supervised``), sorted."""
    root = configs_dir()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def shipped_path(name: str) -> Path | None:
    """The shipped file that ``name`` names, or None."""
    root = configs_dir()
    name = name.removeprefix("configs/")
    for candidate in (name, name + ".yaml"):
        path = root / candidate
        if path.suffix in SHIPPED_SUFFIXES and path.is_file():
            return path
    return None


def resolve_config(value: str) -> str:
    """``value`` itself when it is a file, else the path of the shipped config it names.

    Raises FileNotFoundError (naming the value and the shipped names) when it is neither."""
    if Path(value).is_file():
        return value
    path = shipped_path(value)
    if path is None:
        raise FileNotFoundError(
            f"config {value} is neither a file nor a shipped config "
            f"(`lightning-registers configs list`: {', '.join(config_names())})"
        )
    return str(path)


def expand_config_args(args: list[str]) -> list[str]:
    """``args`` with each ``--config``/``-c`` value resolved by ``resolve_config``."""
    out = list(args)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        if flag not in CONFIG_FLAGS:
            continue
        if eq:
            out[i] = f"{flag}={resolve_config(value)}"
        elif i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
    return out


def referenced_files(path: Path) -> set[Path]:
    """Shipped files that the config at ``path`` names by a path relative to itself (a
    monitoring fragment, a class list), followed through the fragments they name in turn."""
    found: set[Path] = set()
    pending = [path]
    while pending:
        config = pending.pop()
        values = [yaml.safe_load(config.read_text())]
        while values:
            value = values.pop()
            if isinstance(value, dict):
                values.extend(value.values())
            elif isinstance(value, list):
                values.extend(value)
            elif isinstance(value, str) and value.endswith(SHIPPED_SUFFIXES):
                target = (config.parent / value).resolve()
                if target.is_file() and target not in found:
                    found.add(target)
                    if target.suffix == ".yaml":
                        pending.append(target)
    return found


def copy_configs(names: list[str], out: Path) -> list[Path]:
    """Copy the named configs (all when ``names`` is empty) and the files they reference
    into ``out``, keeping their layout so that relative references still resolve."""
    root = configs_dir().resolve()
    if names:
        paths = [Path(resolve_config(name)).resolve() for name in names]
        paths += [p for path in paths for p in referenced_files(path)]
    else:
        paths = [p for p in root.rglob("*") if p.suffix in SHIPPED_SUFFIXES]
    # A local file given by path is the user's own already: only shipped files are copied.
    copies = {p: out / p.relative_to(root) for p in sorted(set(paths)) if p.is_relative_to(root)}
    existing = [str(target) for target in copies.values() if target.exists()]
    if existing:
        raise FileExistsError(f"not overwriting {', '.join(existing)}")
    for path, target in copies.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return list(copies.values())


def configs_main(args: list[str]) -> None:
    """``lightning-registers configs list|show|copy``."""
    parser = argparse.ArgumentParser(
        prog="lightning-registers configs",
        description="The configs shipped with the package; `--config NAME` uses one by name.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="every shipped config by name")
    show = sub.add_parser("show", help="print a shipped config")
    show.add_argument("name")
    copy = sub.add_parser("copy", help="copy shipped configs (and what they include) to edit")
    copy.add_argument("names", nargs="*", help="default: all")
    copy.add_argument("--to", default="configs", help="destination directory (default: configs)")
    opts = parser.parse_args(args)
    if opts.action == "list":
        print("\n".join(config_names()))
    elif opts.action == "show":
        sys.stdout.write(Path(resolve_config(opts.name)).read_text())
    else:
        try:
            written = copy_configs(opts.names, Path(opts.to))
        except FileExistsError as exn:
            parser.error(str(exn))
        print("\n".join(map(str, written)))
