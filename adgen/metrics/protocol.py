"""The field's ROUGE / BLEU-4 protocol for AdGen, exactly (DESIGN.md §3).

Per example, with `pred` and `label` strings (this is LLaMA-Factory's `ComputeSimilarity` /
`scripts/eval_bleu_rouge.py`, itself taken from ChatGLM-6B's `ptuning/main.py`):

    hyp, ref = list(jieba.cut(pred)), list(jieba.cut(label))
    if " ".join(hyp).split() == [] or " ".join(ref).split() == []:  rouge-1/2/l f = 0
    else: scores = rouge_chinese.Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
    rouge-n = round(scores[k]["f"] * 100, 4)                        # words (jieba)
    bleu-4  = round(sentence_bleu([list(label)], list(pred),
                                  smoothing_function=SmoothingFunction().method3) * 100, 4)  # characters

The per-example numbers are rounded to 4 decimals (as the field does) and the reported figure is
their plain mean over examples, *not* rounded (ChatGLM and LLaMA-Factory's metric code return
`float(np.mean(v))`; LLaMA-Factory's script prints `f"{mean:.4f}"`): round to 4 decimals to
compare with a published table.

Edge cases, checked against the libraries rather than assumed:
- empty / whitespace-only prediction or label: ROUGE is 0 by the guard above (LLaMA-Factory's
  guard; ChatGLM-6B has none and crashes with rouge's `ValueError("Hypothesis is empty.")`, so
  LLaMA-Factory's behaviour is the one to match). nltk's `sentence_bleu` returns the int 0 for an
  empty hypothesis or reference, without a warning under method3; we return it as 0.0.
- after the guard rouge_chinese does not raise: every published version (1.0.1-1.0.3, identical
  code) computes summary-level ROUGE-L with an iterative LCS table, so the recursion-depth failure
  known from the `rouge` package (recursive LCS reconstruction) cannot happen here. Very long
  inputs cost O(len(hyp) * len(ref)) time and memory, nothing worse. We therefore do not catch
  anything: an exception would be a real bug, and the field's code would fail the same way.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

PROTOCOL_KEYS: tuple[str, ...] = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
_ROUGE_KEYS: tuple[str, ...] = ("rouge-1", "rouge-2", "rouge-l")


@lru_cache(maxsize=1)
def _libs() -> tuple[Any, Any, Any, Any]:
    """Import jieba / rouge_chinese / nltk once, with jieba's startup chatter silenced (here, not at the top:
    adgen.metrics is imported at CLI start-up, and these take ~0.5 s)."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    # jieba logs "Building prefix dict ..." at DEBUG on its own stderr handler; the field does the same.
    jieba.setLogLevel(logging.CRITICAL)
    return jieba, Rouge, sentence_bleu, SmoothingFunction().method3


def score_pair(pred: str, label: str) -> dict[str, float]:
    """ROUGE-1/2/L F (jieba words) and BLEU-4 (characters), each x100 and rounded to 4 decimals."""
    jieba, Rouge, sentence_bleu, method3 = _libs()
    hyp = " ".join(jieba.cut(pred))
    ref = " ".join(jieba.cut(label))
    if not hyp.split() or not ref.split():
        rouge = {k: 0.0 for k in _ROUGE_KEYS}
    else:
        scores = Rouge().get_scores(hyp, ref)[0]
        rouge = {k: round(scores[k]["f"] * 100, 4) for k in _ROUGE_KEYS}
    bleu = sentence_bleu([list(label)], list(pred), smoothing_function=method3)
    # float(): nltk returns the int 0 for empty input; the value is the same, the JSON type is steadier.
    return {**rouge, "bleu-4": float(round(bleu * 100, 4))}
