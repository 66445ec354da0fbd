"""`mmprolong synth-qa`: long-document VQA records from real PDFs, written by a VLM that sees only a
segment of each document (documents.py: inputs, runs and segments; prompts.py; validate.py: the
checks and reject reasons; workers.py: rendering; pipeline.py: the run; oracle.py: the demo's stand-in
generator). The in-process transformers generator is eval/hf_chat.py."""
