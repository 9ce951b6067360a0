"""Minimum-Bayes-risk selection of one of K candidates (adgen.generation.selection, `--best-of mbr`)."""

from __future__ import annotations

from adgen.generation.bulk import pick_best
from adgen.generation.config import Generation
from adgen.generation.selection import mbr_pick

ATTRS = [("类型", "裙"), ("颜色", "黑色"), ("图案", "印花")]


def gen(text: str, finish: str = "stop") -> Generation:
    return Generation(text, 10, len(text), finish)


def test_the_candidate_the_others_agree_with_wins():
    cands = [gen("黑色印花连衣裙，优雅大方，穿着舒适。"), gen("黑色印花连衣裙，优雅大方，显瘦百搭。"),
             gen("这条印花裙子是黑色的，街头风格很酷。"), gen("黑色印花连衣裙，优雅大方，穿着显瘦。")]
    best, faith = mbr_pick(ATTRS, cands)
    assert best in (0, 1, 3) and faith["attr_coverage"] == 1.0 and faith["mbr_rouge-l"] > 0
    assert pick_best(ATTRS, cands, "mbr")[0] == best


def test_filters_come_first_ending_coverage_compliance():
    agreed = "黑色印花连衣裙，优雅大方，穿着舒适。"
    # the three that agree most: one did not end, one misses a value, one breaks the law; the odd one is kept
    cands = [gen(agreed, "length"), gen("印花连衣裙，优雅大方，穿着舒适。"), gen("黑色印花连衣裙，国家级品质，穿着舒适。"),
             gen("一条黑色的裙子，满身印花。")]
    assert mbr_pick(ATTRS, cands)[0] == 3
    # a filter that would leave nothing is skipped: none ended, the best covered and compliant one wins
    assert mbr_pick(ATTRS, [gen("印花裙", "length"), gen(agreed, "length")])[0] == 1
