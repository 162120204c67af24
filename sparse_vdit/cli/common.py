"""Arguments several subcommands share."""
from __future__ import annotations

import argparse


def add_model_source(p: argparse.ArgumentParser, tiny_help: str) -> None:
    """--model DIR | --tiny [FAMILY], one of them required."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a local diffusers pipeline folder or a hub id (needs its weights)")
    src.add_argument("--tiny", nargs="?", const="wan", metavar="FAMILY", help=tiny_help)


def checked_tile_and_steps(args, p: argparse.ArgumentParser) -> tuple[int, int, int]:
    """The parsed ``--tile`` (valid with ``--block`` where the subcommand has it) after checking
    ``--steps`` >= 1; parser errors otherwise."""
    from .inspect import parse_layout

    tile = parse_layout(args, p)["tile"]
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    return tile


def check_fraction(p: argparse.ArgumentParser, name: str, value: float) -> None:
    if not 0 < value < 1:
        p.error(f"{name} must lie in (0, 1), got {value}")


def read_prompts(path_text: str, p: argparse.ArgumentParser) -> list[str]:
    """The prompts of a text file (one per line, blank lines skipped); parser errors otherwise."""
    import pathlib

    path = pathlib.Path(path_text)
    if not path.is_file():
        p.error(f"--prompts {path}: no such file")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        p.error(f"--prompts {path}: the file has no prompt (one per line)")
    return prompts


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except where there is none (no "(default: None)")."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line (for ``--help`` listings)."""
    text = " ".join((doc or "").split("\n\n")[0].split())
    return text[: text.index(". ") + 1] if ". " in text else text
