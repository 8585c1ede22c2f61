"""Regenerate the committed CLIP BPE tokenizer files in sdtune/toy/clip_tokenizer/.

CLIP's byte-level BPE merges ship inside the open_clip_torch wheel
(open_clip/bpe_simple_vocab_16e6.txt.gz). The vocabulary is derived from them the way
CLIP's tokenizer does it: the 256 byte symbols, the same symbols with the end-of-word
marker, one entry per merge, then the two special tokens. Taking a prefix of the merges
gives a smaller, still valid, vocabulary for tiny models.

    pip download --no-deps open_clip_torch -d /tmp/oc && cd /tmp/oc && unzip -o open_clip_torch-*.whl
    python tools/make_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz --num_merges 8000
"""

import argparse
import gzip
import json
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parents[1] / "sdtune" / "toy" / "clip_tokenizer"
FULL_MERGES = 49152 - 256 - 2  # CLIP's merge count: 49,408 entries in all


def byte_symbols() -> list[str]:
    """The printable stand-in for each of the 256 bytes (GPT-2/CLIP byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bpe_gz", type=Path)
    parser.add_argument("--num_merges", type=int, default=FULL_MERGES)
    args = parser.parse_args()

    lines = gzip.open(args.bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + min(args.num_merges, FULL_MERGES)]]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (OUT_DIR / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    print(f"wrote {len(tokens)} tokens and {len(merges)} merges to {OUT_DIR}")


if __name__ == "__main__":
    main()
