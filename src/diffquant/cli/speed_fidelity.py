"""`diffquant speed-fidelity BENCH.json PEERS.json --out CHART.png`: one model's speed (bench) beside its
fidelity (peers) in one picture."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffquant.cli.base import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bench_json", help="bench.json of `diffquant bench --peers ...` (the speed of each graph)")
    p.add_argument("peers_json", help="peers.json of `diffquant peers` on the same model (the fidelity of each method)")
    p.add_argument("--out", required=True, help="the PNG to write")


def main(args: argparse.Namespace) -> int:
    from diffquant.core.artifacts import read_json
    from diffquant.report.speed_fidelity import chart, points

    bench = read_json(Path(args.bench_json), f"no bench.json at {args.bench_json}: pass the file `diffquant bench "
                      "--out DIR` wrote", "a bench.json", "pass the file `diffquant bench` wrote")
    peers = read_json(Path(args.peers_json), f"no peers.json at {args.peers_json}: pass the file `diffquant peers "
                      "--out DIR` wrote", "a peers.json", "pass the file `diffquant peers` wrote")
    found, missing = points(bench, peers)
    path = chart(bench, peers, args.out)
    print(f"wrote {path}: {len(found)} graphs" + (f"; not in the peers file: {', '.join(missing)}" if missing else ""))
    return 0


COMMAND = Command("speed-fidelity", "one model's speed (bench.json) beside its fidelity (peers.json) in one picture",
                  add_arguments, main, compute=False)
