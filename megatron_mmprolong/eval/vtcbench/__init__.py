"""VTCBench-Wild (MLLM-CL/VTCBench; Moenupa/VTCBench) as the MMProLong paper reports it: the three
splits from the released parquet files, VLMEvalKit's prompts, Retrieval and Reasoning scored by
containsAll as the benchmark's own metric.py compares (lower-cased, <think>...</think> stripped),
Memory by an LLM judge (the benchmark's llm_judge.py protocol), Overall weighted by samples
(`mmprolong eval vtcbench`). Where this departs from VLMEvalKit, the module that does says so."""
