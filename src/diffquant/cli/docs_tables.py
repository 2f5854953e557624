"""`diffquant docs-tables DOCS_DIR [--check]`: the result tables of docs/ rendered from the JSON files they
come from, never typed by hand.

A generated table sits between two HTML comments in a Markdown page:

    <!-- table: results/peers-shapes-sd3-8bit.json -->
    ...rendered table...
    <!-- /table -->

The path is relative to the page. The command rewrites every such block from its file (bench.json of
`diffquant bench`, peers.json of `diffquant peers`, results.json of `diffquant run`); `--check` rewrites
nothing and fails, naming the stale blocks, when a page differs from what its files render (the test suite
runs it on docs/)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from diffquant.cli.base import Command
from diffquant.core.errors import DiffquantError

BLOCK = re.compile(r"(<!-- table: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def render(path: Path) -> str:
    """The Markdown of one result file, by its kind: bench.json, peers.json or a run's results.json."""
    from diffquant.bench.runner import BenchResult
    from diffquant.peers.eight import table as peers_table
    from diffquant.report.tables import run_markdown

    from diffquant.core.artifacts import read_json

    data = read_json(path, f"{path} is missing: a docs table names it; write it with the command that measures it",
                     "JSON", "restore the file the command wrote")
    if isinstance(data, dict) and data.get("type") == "RunResult":
        return run_markdown(data)
    if isinstance(data, dict) and "rows" in data and "captions" in data:
        return peers_table(data)
    if isinstance(data, dict) and "rows" in data and "iterations" in data:
        return BenchResult.from_dict(data).markdown()
    raise DiffquantError(f"{path} is none of bench.json, peers.json or results.json: name one of those in the table")


def sync(docs: Path, check: bool) -> list[str]:
    """Render every generated block of the Markdown pages under `docs`; returns the blocks that were stale
    ('page: file'). Rewrites the stale pages unless `check`."""
    from diffquant.core.artifacts import write_text  # PIL: not for `diffquant --help`

    stale = []
    for page in sorted(docs.rglob("*.md")):
        text = page.read_text(encoding="utf-8")

        def fill(match: re.Match) -> str:
            body = render(page.parent / match["path"]).rstrip("\n") + "\n"
            if body != match["body"]:
                stale.append(f"{page.relative_to(docs)}: {match['path']}")
            return match[1] + body + match[4]

        updated = BLOCK.sub(fill, text)
        if updated != text and not check:
            write_text(page, updated)
    return stale


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("docs", nargs="?", default="docs", help="the folder of Markdown pages (default: docs)")
    p.add_argument("--check", action="store_true", help="change nothing; fail when a table differs from its file")


def main(args: argparse.Namespace) -> int:
    docs = Path(args.docs)
    if not docs.is_dir():
        raise DiffquantError(f"no folder {docs}: pass the docs folder that holds the Markdown pages")
    stale = sync(docs, args.check)
    for block in stale:
        print(f"{'stale' if args.check else 'rewrote'}: {block}")
    if args.check and stale:
        print(f"{len(stale)} table(s) differ from their files: run `diffquant docs-tables {docs}`")
        return 1
    return 0


COMMAND = Command("docs-tables", "rewrite the tables of docs/ from the bench/peers/results JSON they come from",
                  add_arguments, main, compute=False)
