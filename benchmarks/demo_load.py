"""A bounded load test of the rewards demo on localhost: N gradio_client requests at once (each its own client,
as N users), every one must come back with its images scored; prints p50/p95 latency beside one request alone
measured first in the same run, and exits non-zero if any request failed.

usage: python benchmarks/demo_load.py [--requests 20] [--images 2] [--steps 8] [--concurrency 2] [--url URL]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

PROMPT = "a green box to the right of a purple triangle"


def _request(client, seed: int, images: int) -> float:
    """Seconds for one generate-and-score request, its answer checked (every image seeded and scored)."""
    start = time.perf_counter()
    _, _, details = client.predict(PROMPT, images, seed, api_name="/generate")
    seconds = time.perf_counter() - start
    if details["seeds"] != list(range(seed, seed + images)) or any(r["gold"] is None for r in details["scores"]):
        raise RuntimeError(f"request {seed}: an incomplete answer {details!r}")
    return seconds


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20, help="requests sent at once")
    parser.add_argument("--images", type=int, default=2, help="images generated and scored per request")
    parser.add_argument("--steps", type=int, default=8, help="sampler steps (a local server only)")
    parser.add_argument("--concurrency", type=int, default=2, help="the server's queue concurrency (local only)")
    parser.add_argument("--url", help="an already running rewards demo (default: start one on a free port)")
    args = parser.parse_args(argv)

    from gradio_client import Client

    demo = None
    url = args.url
    if url is None:
        import socket

        from mmalign.demos.app import build_demo
        from mmalign.demos.launch import LaunchSettings, launch

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        demo = build_demo("rewards", steps=args.steps)
        _, url, _ = launch(demo, LaunchSettings(port=port, concurrency=args.concurrency,
                                                max_queue=max(64, args.requests)), prevent_thread_lock=True, quiet=True)
    try:
        clients = [Client(url, verbose=False) for _ in range(args.requests + 1)]
        alone = _request(clients[-1], 10_000, args.images)  # the reference: one request, nothing else running
        failures: list[str] = []
        latencies: list[float] = []

        def one(k: int):
            try:
                latencies.append(_request(clients[k], 1000 + k * args.images, args.images))
            except Exception as err:  # every failure is counted and printed, none hides the others
                failures.append(f"request {k}: {type(err).__name__}: {err}")

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.requests) as pool:
            list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - start
    finally:
        if demo is not None:
            demo.close()
    result = {"requests": args.requests, "succeeded": len(latencies), "failed": len(failures),
              "images_per_request": args.images, "alone_s": alone, "wall_s": wall}
    if latencies:
        result.update(p50_s=statistics.median(latencies), p95_s=_percentile(latencies, 0.95),
                      requests_per_s=len(latencies) / wall)
    print(f"{args.requests} concurrent requests ({args.images} images each, server concurrency "
          f"{args.concurrency if args.url is None else 'as launched'}): {len(latencies)} succeeded, {len(failures)} failed")
    if latencies:
        print(f"latency p50 {result['p50_s']:.2f} s ({result['p50_s'] / alone:.1f}× one request alone, {alone:.2f} s), "
              f"p95 {result['p95_s']:.2f} s ({result['p95_s'] / alone:.1f}×); {result['requests_per_s']:.2f} "
              f"requests/s over {wall:.1f} s")
    for line in failures:
        print(line, file=sys.stderr)
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
