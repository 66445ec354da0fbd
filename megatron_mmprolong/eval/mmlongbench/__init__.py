"""MMLongBench (EdinburghNLP/MMLongBench, v1.1) as the MMProLong paper reports it: the document
QA category (MMLongBench-Doc, LongDocURL, SlideVQA) and MM-NIAH at 8K-128K from the released
files, 256K and 512K contexts built from the 128K ones, the harness's prompts, sampling and
metrics, an optional LLM judge, and the paper's table (`mmprolong eval mmlongbench`, `eval score`).

The benchmark harness's code is the protocol; where this package departs from it, the module
that does says so and why."""
