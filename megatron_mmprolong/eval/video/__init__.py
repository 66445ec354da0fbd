"""`mmprolong eval video`: Video-MME, MLVU (multiple choice, M-avg) and LongVideoBench (val) as the
paper ran them: frame sampling and the token budget (sampling.py), decoding and the frame cache
(decode.py), the released layouts (data.py), the reference's prompts (prompts.py), answer
extraction (answers.py), requests and the local video backend (requests.py), scores (scores.py)
and the journaled run (run.py)."""
