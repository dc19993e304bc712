#!/usr/bin/env python
"""Soak the Replicate model: many sequential requests through the real cog server (coglet),
good and hostile mixed, on the CPU with a random-weight da3-small.

    python bench/soak.py [--requests 300] [--out bench/.cache/soak]

Prints the worker's RSS at start, middle and end, outcomes by kind, worker restarts (coglet
never restarts a dead worker: any crash shows as a changed worker pid or an UNHEALTHY
server), and the files left behind (the server runs with its own TMPDIR, so every download
and request folder it leaves is counted). Exits 1 if an expectation fails: every good request
succeeds, every hostile one fails with its message, RSS after warm-up stays within 10%, no
restart, no file left.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import hostile  # noqa: E402
import numpy as np  # noqa: E402
from test_cog_server import (  # noqa: E402
    SERVER_START_TIMEOUT,
    CogServer,
    _free_port,
    _server_env,
    _stop,
    _write_schema,
    data_uri,
)

PICTURE = hostile.picture(96, 128, seed=1)
PNG = hostile.png(PICTURE)
GOOD = {
    "png": {"image": data_uri(PNG, "image/png")},
    "jpeg+images": {
        "image": data_uri(hostile.jpeg(PICTURE), "image/jpeg"),
        "images": [data_uri(hostile.png(hostile.picture(80, 120, seed=2)), "image/png")],
        "export_format": "glb",
    },
    "zip": {
        "image": data_uri(hostile.zip_of({"a.png": PNG, "b.png": PNG}), "application/zip"),
        "export_format": "ply",
    },
}
BAD = {
    "dev-zero": ({"image": "/dev/zero"}, "is not a file sent with this request"),
    "etc-passwd": ({"image": "/etc/passwd"}, "is not a file sent with this request"),
    "eps": ({"image": data_uri(hostile.EPS, "image/png")}, "neither an image"),
    "hls": ({"image": data_uri(hostile.HLS, "video/mp4")}, "neither an image"),
    "144mp-png": (
        {"image": data_uri(hostile.png_claiming(12000, 12000), "image/png")},
        "at most 100 MP",
    ),
    "zip-dotdot": (
        {"image": data_uri(hostile.zip_of({"../x.png": PNG}), "application/zip")},
        "leaves the archive",
    ),
    "fx-1e300": (
        {
            "image": data_uri(PNG, "image/png"),
            "cameras": data_uri(
                hostile.cameras(
                    intrinsics=hostile.k_matrix(1e300), extrinsics=[np.eye(4).tolist()]
                ),
                "application/json",
            ),
        },
        "is outside",
    ),
    "truncated": ({"image": data_uri(hostile.truncated(PNG), "image/png")}, 'image "file.png"'),
    "empty": ({"image": data_uri(b"", "image/png")}, "empty"),
}
# Requests before the RSS baseline: the allocator's arenas settle over the first few dozen.
WARM_UP = 50
BASE = {"model_size": "small", "process_resolution": 140, "export_format": "none"}


def worker_rss(server_pid: int) -> tuple[int, int | None, int]:
    """Total RSS of the server's process group, the pid of its Python worker and the
    worker's own RSS."""
    total, worker, worker_bytes = 0, None, 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != server_pid:
                continue
            status = (entry / "status").read_text()
            command = (entry / "cmdline").read_bytes()
        except (OSError, ProcessLookupError):
            continue
        rss = 0
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        total += rss
        if int(entry.name) != server_pid and b"python" in command:
            worker, worker_bytes = int(entry.name), rss
    return total, worker, worker_bytes


def start(work: Path, weights: Path) -> CogServer:
    import subprocess

    _write_schema(work)
    port = _free_port()
    env = _server_env(weights, work, port, f"{ROOT / 'tests' / 'cog_standin.py'}:Runner")
    env["TMPDIR"] = str(work / "runtime-tmp")
    env["DA3COG_SETUP_MODEL"] = "small"
    (work / "runtime-tmp").mkdir()
    log = work / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
            cwd=work,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = CogServer(f"http://127.0.0.1:{port}", process, log, [], work)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            status = server.health()["status"]
            if status == "READY":
                return server
            if status == "SETUP_FAILED":
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"server not ready: {log.read_text(errors='replace')[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / ".cache" / "soak")
    args = parser.parse_args()
    if args.requests <= WARM_UP:
        parser.error(f"--requests must be more than the {WARM_UP} of the warm-up")
    from oracle import save_checkpoint

    work = args.out / time.strftime("%Y%m%d-%H%M%S")
    weights = work / "weights"
    save_checkpoint("da3-small", weights / "da3-small", seed=0)
    server = start(work, weights)
    plan = [("good", name) for name in GOOD] + [("bad", name) for name in BAD]
    outcomes: Counter[str] = Counter()
    unexpected: list[str] = []
    samples: dict[str, int] = {}
    workers: set[int] = set()
    started = time.perf_counter()
    try:
        for index in range(args.requests):
            kind, name = plan[index % len(plan)]
            inputs = {**BASE, **(GOOD[name] if kind == "good" else BAD[name][0])}
            body = server.predict(inputs)
            status = body["status"]
            outcomes[f"{kind}:{status}"] += 1
            if kind == "good" and status != "succeeded":
                unexpected.append(f"{name}: {body.get('error')}")
            if kind == "bad" and (
                status != "failed" or BAD[name][1] not in (body.get("error") or "")
            ):
                unexpected.append(f"{name}: {status} {body.get('error')}")
            if server.wait_ready() != "READY":
                unexpected.append(f"after {name}: server not READY")
                break
            rss, worker, worker_bytes = worker_rss(server.process.pid)
            if worker is not None:
                workers.add(worker)
            if index == WARM_UP - 1:
                samples[f"after warm-up ({WARM_UP} requests)"] = rss
            if index == args.requests // 2:
                samples["middle"] = rss
            if (index + 1) % 25 == 0:
                print(
                    f"{index + 1}/{args.requests} requests, RSS {rss / 2**20:.0f} MiB "
                    f"(worker {worker_bytes / 2**20:.0f} MiB)",
                    flush=True,
                )
        samples["end"] = worker_rss(server.process.pid)[0]
    finally:
        _stop(server.process)
    elapsed = time.perf_counter() - started
    left_downloads = [p.name for p in (work / "runtime-tmp").iterdir() if p.is_file()]
    left_requests = list((work / "requests").glob("da3cog-request-*"))
    print(f"{args.requests} requests in {elapsed:.0f} s")
    print("| moment | worker RSS (MiB) |\n| --- | --- |")
    for moment, rss in samples.items():
        print(f"| {moment} | {rss / 1024**2:.0f} |")
    print("| outcome | requests |\n| --- | --- |")
    for outcome, count in sorted(outcomes.items()):
        print(f"| {outcome} | {count} |")
    print(f"worker processes seen: {len(workers)} (restarts: {max(len(workers) - 1, 0)})")
    print(f"files left: {len(left_downloads)} downloads, {len(left_requests)} request folders")
    growth = samples["end"] / samples[f"after warm-up ({WARM_UP} requests)"] - 1
    print(f"RSS growth after warm-up: {growth * 100:+.1f}%")
    failures = list(unexpected)
    if abs(growth) > 0.10:
        failures.append(f"RSS grew {growth * 100:.1f}%")
    if len(workers) != 1:
        failures.append("the worker changed")
    if len(left_requests) > 1 or left_downloads:
        failures.append("files left behind")
    print(json.dumps({"unexpected": failures[:10]}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
