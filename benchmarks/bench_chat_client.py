"""Requests per second of the chat-completions client (`serving/`) against a loopback server
that answers at once (in the same process, so both share the CPU), at several concurrencies,
next to one request in flight (the baseline, measured in the same run). The client must not be
what limits a generator run: the target is >= 100 requests/s at every concurrency.

    python benchmarks/bench_chat_client.py [--requests 400] [--concurrency 1 8 64]
"""

from __future__ import annotations

import argparse
import json
import time

from megatron_mmprolong.serving.chat import ChatRequest, request_key, text_part
from megatron_mmprolong.serving.endpoint import ChatEndpoint, EndpointConfig
from megatron_mmprolong.serving.runner import Job, run_jobs
from megatron_mmprolong.serving.scripted_server import ScriptedChatServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    args = parser.parse_args()
    request = ChatRequest([{"role": "user", "content": [text_part("What is on page 3?")]}], max_tokens=64)
    with ScriptedChatServer(lambda body: '{"answer": "42"}') as server:
        results, baseline = {}, None
        for concurrency in sorted(set(args.concurrency) | {1}):
            endpoint = ChatEndpoint(EndpointConfig(url=server.url, model=server.model))
            jobs = [Job(request_key(concurrency, i), lambda: request) for i in range(args.requests)]
            stats = run_jobs(endpoint, jobs, concurrency=concurrency)
            baseline = baseline or stats.requests_per_second
            results[f"concurrency_{concurrency}_requests_per_s"] = round(stats.requests_per_second, 1)
            results[f"concurrency_{concurrency}_vs_one_in_flight"] = round(stats.requests_per_second / baseline, 2)
        results["target_met"] = min(v for k, v in results.items() if k.endswith("requests_per_s")) >= 100
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
