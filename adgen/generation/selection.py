"""Choosing one of K candidates by the field's metric: minimum-Bayes-risk selection (`--best-of mbr`).

The candidates are first filtered by what a merchant needs -- the text ended on its own, it names the most input
attribute values of any candidate, it holds no forbidden term (the Advertising Law's) -- each filter applied only
where it leaves a candidate. Of those left, the one with the highest mean ROUGE-L (the field's protocol: jieba
words, `adgen.metrics.score_pair`) against all the other candidates wins: the candidate the sample agrees with
most, the usual MBR estimate of the expected metric. Ties go to the earlier candidate.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from adgen.generation.config import Generation
from adgen.metrics import faithfulness, score_pair
from adgen.metrics.compliance import find_violations
from adgen.metrics.faithfulness import AttributeVocab

MBR_METRIC = "rouge-l"


def _keep(indices: list[int], test: Callable[[int], bool]) -> list[int]:
    """The indices that pass `test`, or all of them when none does (a filter never empties the field)."""
    passed = [i for i in indices if test(i)]
    return passed or indices


def mbr_pick(attributes: Sequence[tuple[str, str]], candidates: Sequence[Generation],
             vocab: AttributeVocab | None = None) -> tuple[int, dict[str, Any]]:
    """(index of the candidate to keep, its faithfulness figures with its mean ROUGE-L against the others)."""
    vocab = vocab or AttributeVocab.default()
    faith = [faithfulness(attributes, c.text, vocab) for c in candidates]
    indices = list(range(len(candidates)))
    indices = _keep(indices, lambda i: candidates[i].finish_reason == "stop")
    top = max((faith[i]["attr_coverage"] or 0.0) for i in indices)
    indices = _keep(indices, lambda i: (faith[i]["attr_coverage"] or 0.0) >= top)
    indices = _keep(indices, lambda i: not find_violations(candidates[i].text))

    def agreement(i: int) -> float:
        others = [j for j in range(len(candidates)) if j != i]
        if not others:
            return 0.0
        return sum(score_pair(candidates[i].text, candidates[j].text)[MBR_METRIC] for j in others) / len(others)

    scores = {i: agreement(i) for i in indices}
    best = max(indices, key=lambda i: (scores[i], -i))
    return best, {**faith[best], "mbr_" + MBR_METRIC: scores[best]}
