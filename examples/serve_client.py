"""A client of ``jlora serve``: held-out BBC articles sent to three adapters (and the base) at once.

    jlora serve --adapter headline=runs/bbc-headlines --adapter section=runs/bbc-category \
                --adapter lead=runs/bbc-lead &
    python examples/serve_client.py --url http://127.0.0.1:8000 --articles 3

For each article it builds the three tasks' prompts as ``jlora finetune --task causal-lm --data
bbc-headlines|bbc-category|bbc-lead`` wrote them (the body cut to its first ``--body-words`` words, so
the prompt fits the server's ``--max-prompt-tokens``), sends every request at the same time from its
own thread (the server batches them into shared generate calls, each row with its own adapter) and
prints the answers next to the references. Articles are from the fine-tuning runs' held-out split (its
default seed and fraction), so no adapter saw them in training.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from jlora.app import sft_data


def held_out_articles(count: int, seed: int = 0, fraction: float = 0.2) -> list[tuple[str, str, str, str]]:
    """The first ``count`` held-out ``(origin, section, headline, body)`` of the fine-tuning runs' split."""
    articles = sft_data._bbc_articles()
    order = np.random.default_rng(seed).permutation(len(articles))
    held = order[:max(1, int(round(len(articles) * fraction)))]
    return [articles[i] for i in held[:count]]


def requests_for(article: tuple[str, str, str, str], body_words: int) -> list[tuple[str, str | None, str, str]]:
    """``(task, adapter, prompt, reference)`` for each adapter and for the base model on the headline prompt."""
    _, section, headline, body = article
    body = " ".join(body.split()[:body_words])
    headline_prompt = sft_data.HEADLINE_INSTRUCTION + body + sft_data.HEADLINE_CUE
    return [("headline", "headline", headline_prompt, headline),
            ("headline", None, headline_prompt, headline),
            ("section", "section", sft_data.CATEGORY_INSTRUCTION + headline + "\n\n" + body + sft_data.CATEGORY_CUE,
             section),
            ("lead", "lead", sft_data.LEAD_INSTRUCTION + headline + sft_data.LEAD_CUE, sft_data.first_sentence(body))]


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return {"error": f"HTTP {err.code}: {json.loads(err.read()).get('error')}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--articles", type=int, default=3)
    parser.add_argument("--body-words", type=int, default=120)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    jobs = [(article[0], *req) for article in held_out_articles(args.articles)
            for req in requests_for(article, args.body_words)]
    with ThreadPoolExecutor(len(jobs)) as pool:  # every request in flight at once
        replies = list(pool.map(lambda job: post(f"{args.url}/generate", {
            "prompt": job[3], "adapter": job[2], "max_new_tokens": args.max_new_tokens}), jobs))
    failed = 0
    for (origin, task, adapter, _, reference), reply in zip(jobs, replies):
        answer = reply.get("completion", reply.get("error", "?")).strip()
        failed += "error" in reply
        print(f"{origin.rsplit('/', 2)[-2]}/{origin.rsplit('/', 1)[-1]:<9} {task:<8} {adapter or 'base':<8} "
              f"{answer[:90]!r}\n{'':<28}reference: {reference[:90]!r}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
