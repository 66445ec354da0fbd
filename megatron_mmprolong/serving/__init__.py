"""Served models over the OpenAI-compatible chat-completions protocol (vLLM, SGLang, hosted APIs):
the request and reply types, an HTTP client with retries, a journal of answers so that a rerun
resends nothing, the runner that keeps N requests in flight, and a scripted loopback server for
tests, benchmarks and the CPU demo. Used by `synth-qa` (the generator) and `eval` (judges and
evaluated servers)."""
