"""Extract the committed subset ``data/vader_snippets.tsv`` from the vaderSentiment 3.3.2 sdist (MIT).

The sdist (not the wheel) holds ``additional_resources/hutto_ICWSM_2014.tar.gz`` with human-rated
snippets from four collections.  We keep a seeded sample of 600 per collection (the whole corpus is
~24 k lines), with the collection name, the mean human rating (-4..4) and the text.

    pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d /tmp/vader
    python evals/suite/extract_vader.py /tmp/vader/vaderSentiment-3.3.2.tar.gz
"""

from __future__ import annotations

import io
import random
import sys
import tarfile
from pathlib import Path

COLLECTIONS = {"movie": "movieReviewSnippets", "tweet": "tweets", "product": "amazonReviewSnippets",
               "news": "nytEditorialSnippets"}
PER_COLLECTION = 600
OUT = Path(__file__).resolve().parents[2] / "mergekit_lora" / "evals" / "suite" / "data" / "vader_snippets.tsv"


def _inner_tar(sdist: Path) -> tarfile.TarFile:
    with tarfile.open(sdist) as outer:
        member = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
        data = outer.extractfile(member).read()  # type: ignore[union-attr]
    return tarfile.open(fileobj=io.BytesIO(data))


def main(sdist: str) -> None:
    inner = _inner_tar(Path(sdist))
    rows = []
    for label, stem in COLLECTIONS.items():
        member = next(m for m in inner.getmembers() if m.name.endswith(f"{stem}_GroundTruth.txt"))
        text = inner.extractfile(member).read().decode("utf-8", errors="replace")  # type: ignore[union-attr]
        lines = []
        for line in text.splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and parts[2].strip():
                lines.append((label, float(parts[1]), " ".join(" ".join(parts[2:]).split())))
        random.Random(0).shuffle(lines)
        rows += lines[:PER_COLLECTION]
    with OUT.open("w", encoding="utf-8") as f:
        f.write("collection\tscore\ttext\n")
        for label, score, text in rows:
            f.write(f"{label}\t{score:.4f}\t{text}\n")
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
