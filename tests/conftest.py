import dataclasses
import faulthandler
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch

# Megatron-Core warns about missing Apex/TE at import; those fallbacks are what the CPU suite tests.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist's workers share the cores (make test runs two)
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)))))

from megatron_mmprolong.config import Qwen3VLConfig, Qwen25VLConfig  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords and skip is not None:
            item.add_marker(skip)
        if "slurm" in item.keywords:
            # one cluster of three node daemons: its jobs run one test at a time (pytest-xdist's
            # --dist loadgroup keeps a group on one worker)
            item.add_marker(pytest.mark.xdist_group("slurm"))


def pytest_unconfigure(config):
    """A thread or child process a test leaves behind can hold the interpreter's exit after the
    summary, every test passed, until CI's own time limit kills it. Name what is left, and if exit
    still has not happened in two minutes, print every thread's stack and exit 1."""
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    children = subprocess.run(["ps", "--ppid", str(os.getpid()), "-o", "pid=,args="], capture_output=True,
                              text=True).stdout.splitlines()
    children = [line for line in children if " ps --ppid " not in line]
    if threads or children:
        print(f"conftest: left at exit: threads {threads}, child processes {children}", file=sys.stderr)
    faulthandler.dump_traceback_later(120, exit=True)


@pytest.fixture(scope="session")
def runtime():
    """Megatron-Core parallel state for single-process tests (gloo, world size 1)."""
    from megatron_mmprolong import runtime as rt

    return rt.initialize()


@pytest.fixture
def keeps_runtime():
    """`train` and `eval --mcore-dir` end the process group as they return; later tests of this
    session may hold the one the `runtime` fixture started."""
    import torch.distributed as dist

    had = dist.is_initialized()
    yield
    if had and not dist.is_initialized():
        from megatron_mmprolong import runtime

        runtime.initialize()


def tiny_config(
    *,
    vocab_size=1024,
    tied=False,
    hidden=64,
    heads=4,
    kv_heads=2,
    mrope_section=(2, 3, 3),
    vision_heads=4,
    window_size=112,
    fullatt=(1, 3),
    depth=4,
    layers=2,
) -> Qwen25VLConfig:
    """A tiny Qwen2.5-VL whose special token ids sit at the top of a small vocabulary."""
    base = Qwen25VLConfig.preset("tiny")
    top = vocab_size - 8
    tokens = dataclasses.replace(
        base.tokens, image=top + 3, video=top + 4, vision_start=top + 0, vision_end=top + 1,
        bos=top + 5, eos=top + 6,
    )
    text = dataclasses.replace(
        base.text, vocab_size=vocab_size, tie_word_embeddings=tied, hidden_size=hidden,
        num_attention_heads=heads, num_key_value_heads=kv_heads, mrope_section=mrope_section,
        num_layers=layers,
    )
    vision = dataclasses.replace(
        base.vision, num_heads=vision_heads, window_size=window_size,
        fullatt_block_indexes=fullatt, depth=depth, out_hidden_size=hidden,
    )
    config = Qwen25VLConfig(text=text, vision=vision, tokens=tokens)
    config.validate()
    return config


# Shapes the parity tests cover: untied GQA; tied (like 3B) with other head counts;
# 2x2-token windows so most windows are cut by the grid edge, 2 vision heads, 3 layers.
TINY_SHAPES = {
    "untied": dict(),
    "tied": dict(tied=True, hidden=48, heads=6, kv_heads=3, mrope_section=(1, 2, 1), vision_heads=2),
    "small-windows": dict(window_size=56, fullatt=(0, 2), depth=3, vision_heads=2, layers=3, kv_heads=1),
}


def tiny_qwen3vl_config(*, tied=False, heads=4, kv_heads=2, head_dim=16, mrope_section=(4, 2, 2), layers=4,
                        vision_heads=4, deepstack=(0, 2, 3), vision_depth=4) -> Qwen3VLConfig:
    """A tiny Qwen3-VL on the tiny tokenizer's 1K vocabulary (special ids at its top)."""
    base = Qwen3VLConfig.preset("qwen3vl-tiny-1k")
    text = dataclasses.replace(base.text, tie_word_embeddings=tied, num_attention_heads=heads,
                               num_key_value_heads=kv_heads, explicit_head_dim=head_dim,
                               mrope_section=mrope_section, num_layers=layers)
    vision = dataclasses.replace(base.vision, num_heads=vision_heads, deepstack_visual_indexes=deepstack,
                                 depth=vision_depth)
    config = Qwen3VLConfig(text=text, vision=vision, tokens=base.tokens)
    config.validate()
    return config


# Qwen3-VL: untied with heads x head_dim != hidden and three deepstack levels; tied, with one KV
# head, wider heads, two levels and 3 vision blocks.
TINY_QWEN3VL_SHAPES = {
    "qwen3vl": dict(),
    "qwen3vl-tied": dict(tied=True, heads=2, kv_heads=1, head_dim=24, mrope_section=(4, 5, 3), layers=3,
                         vision_heads=2,
                         deepstack=(0, 1), vision_depth=3),
}


def tiny_family_config(name: str):
    if name in TINY_QWEN3VL_SHAPES:
        return tiny_qwen3vl_config(**TINY_QWEN3VL_SHAPES[name])
    return tiny_config(**TINY_SHAPES[name])


@pytest.fixture(scope="session", params=sorted(TINY_SHAPES) + sorted(TINY_QWEN3VL_SHAPES))
def tiny_hf(request, tmp_path_factory):
    """(config, directory) of a random HF checkpoint written by transformers."""
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint

    config = tiny_family_config(request.param)
    path = tmp_path_factory.mktemp(f"hf-{request.param}")
    write_random_hf_checkpoint(config, path, seed=len(request.param))
    return config, path


SHARED = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared"
CORPUS = SHARED / "corpus" / "pdf"
QWEN_TOKENIZER = SHARED / "tokenizers" / "qwen25-bpe"


@pytest.fixture(scope="session")
def qwen_tokenizer():
    if not QWEN_TOKENIZER.is_dir():
        pytest.skip(f"{QWEN_TOKENIZER} is not present")
    from megatron_mmprolong.data.chat import ChatTokenizer

    return ChatTokenizer(QWEN_TOKENIZER)


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory):
    """Three small synthetic documents (PNG pages), records.jsonl path."""
    from megatron_mmprolong.data.synth import SynthConfig, synth_docs

    return synth_docs(tmp_path_factory.mktemp("synth"), SynthConfig(
        docs=3, min_pages=4, max_pages=7, page_width=448, page_height=560, font_size=14, seed=1))


def build_tiny_train_data(root, model: str = "tiny-1k"):
    """(tiny tokenizer, records.jsonl, mixture YAML) under `root` for the CPU recipe of the preset
    `model` (tiny-1k or qwen3vl-tiny-1k, whose pages it follows): four synthetic documents built at
    2048 tokens, a 120K-token budget drawn with replacement."""
    import yaml

    from megatron_mmprolong.config import VLConfig
    from megatron_mmprolong.data.build import BuildConfig, build_dataset
    from megatron_mmprolong.data.images import ImageParams
    from megatron_mmprolong.data.synth import SynthConfig, synth_docs
    from megatron_mmprolong.data.tiny_tokenizer import write_tiny_tokenizer

    config = VLConfig.preset(model)
    tokenizer = write_tiny_tokenizer(root / "tokenizer")
    records = synth_docs(root / "docs", SynthConfig(docs=4, min_pages=4, max_pages=6, page_width=224,
                                                    page_height=336, font_size=9, seed=2))
    build = BuildConfig(tokenizer=str(tokenizer), seq_length=2048, model_family=config.family,
                        image=ImageParams.for_model(config.vision))
    build_dataset([records], root / "data" / "synth", build, progress=False)
    mix = root / "mix.yaml"
    mix.write_text(yaml.safe_dump({"token_budget": 120000, "seed": 3,
                                   "datasets": [{"path": "data/synth", "replacement": True}]}))
    return tokenizer, records, mix


@pytest.fixture(scope="session")
def tiny_train_data(tmp_path_factory):
    return build_tiny_train_data(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="session")
def tiny_qwen3vl_train_data(tmp_path_factory):
    return build_tiny_train_data(tmp_path_factory.mktemp("train-qwen3vl"), "qwen3vl-tiny-1k")
