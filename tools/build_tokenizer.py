"""Build the CLIP BPE tokenizer files shipped in webui/configs/tokenizer/ from open_clip's bundled vocab.

Run once (output is committed): ``python tools/build_tokenizer.py``.  The resulting vocab.json and
merges.txt are byte-for-byte the layout of openai/clip-vit-large-patch14's tokenizer, and the ids are
checked against open_clip's own tokenizer below.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import open_clip
from open_clip.tokenizer import bytes_to_unicode

OUT = Path(__file__).resolve().parents[1] / "webui" / "configs" / "tokenizer"


def main() -> None:
    bpe_path = Path(os.path.dirname(open_clip.__file__)) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")

    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(OUT / "vocab.json"), str(OUT / "merges.txt"))
    ref = open_clip.get_tokenizer("ViT-L-14")
    for text in ["a photo of a cat", "Masterpiece, (best quality:1.2), 1girl, solo!", "émoji 🚀 test"]:
        ours = tok(text)["input_ids"]  # padding differs by model (SD1 pads with EOS, SD2 with "!")
        theirs = [i for i in ref([text])[0].tolist() if i != 0]
        assert ours == theirs, (text, ours[:12], theirs[:12])
    print("tokenizer written to", OUT, "vocab", len(vocab))


if __name__ == "__main__":
    main()
