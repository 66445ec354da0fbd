"""Requests per second of the chat-completions client (`serving/`) against a loopback server
that answers at once (in the same process, so both share the CPU), at several concurrencies,
next to one request in flight (the baseline, measured in the same run). The client must not be
what limits a generator run: the target is >= 100 requests/s at every concurrency.
`--pages N` sends synth-qa-sized requests instead: N page images of `--page-kb` each (a letter
page at 144 DPI is ~800 KB as PNG), base64 in the JSON body as synth-qa sends them.

    python benchmarks/bench_chat_client.py [--requests 400] [--concurrency 1 8 64] [--pages 12]
"""

from __future__ import annotations

import argparse
import json
import os

from megatron_mmprolong.serving.chat import ChatRequest, image_part, request_key, text_part
from megatron_mmprolong.serving.endpoint import ChatEndpoint, EndpointConfig
from megatron_mmprolong.serving.runner import Job, run_jobs
from megatron_mmprolong.serving.scripted_server import ScriptedChatServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--pages", type=int, default=0, help="page images per request (synth-qa: 8-15)")
    parser.add_argument("--page-kb", type=int, default=800, help="encoded size of each page image")
    args = parser.parse_args()
    page = image_part(b"\x89PNG\r\n\x1a\n" + os.urandom(args.page_kb * 1024 - 8))
    content = [part for n in range(1, args.pages + 1) for part in (text_part(f"Page {n}:"), page)]
    request = ChatRequest([{"role": "user", "content": [*content, text_part("What is on page 3?")]}], max_tokens=64)
    with ScriptedChatServer(lambda body: '{"answer": "42"}') as server:
        results, baseline = {}, None
        for concurrency in sorted(set(args.concurrency) | {1}):
            endpoint = ChatEndpoint(EndpointConfig(url=server.url, model=server.model))
            jobs = [Job(request_key(concurrency, i), lambda: request) for i in range(args.requests)]
            stats = run_jobs(endpoint, jobs, concurrency=concurrency)
            baseline = baseline or stats.requests_per_second
            results[f"concurrency_{concurrency}_requests_per_s"] = round(stats.requests_per_second, 1)
            results[f"concurrency_{concurrency}_vs_one_in_flight"] = round(stats.requests_per_second / baseline, 2)
        results["request_mb"] = round(len(json.dumps(request.body(server.model))) / 1e6, 2)
        if not args.pages:  # the target is for the client's own cost, not for moving page images
            results["target_met"] = min(v for k, v in results.items() if k.endswith("requests_per_s")) >= 100
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
