"""Run llama.cpp's own ``convert_hf_to_gguf.py`` (from the source tree given as the first argument) on a
model whose byte-level BPE tokenizer was trained locally.

The converter recognises a BPE pre-tokenizer only by the hash of a test string's token ids, which a
locally trained tokenizer never matches; this declares it ``gpt-2`` (what it is: GPT-2's split regex,
no prefix space), exactly as moecap's own exporter does. Everything else is the converter, unchanged.

    python convert_declared_gpt2.py LLAMA_CPP_DIR MODEL_DIR --outtype q8_0 --outfile OUT.gguf
"""

import sys
from pathlib import Path

tree = Path(sys.argv.pop(1))
sys.path.insert(0, str(tree))
sys.path.insert(1, str(tree / "gguf-py"))

import convert_hf_to_gguf  # noqa: E402
from conversion.base import TextModel  # noqa: E402

TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv[0] = str(tree / "convert_hf_to_gguf.py")
convert_hf_to_gguf.main()
