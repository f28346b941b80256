"""Chinese captions for the synthetic benchmark (:mod:`datasets.synthetic`).

A caption names the same attributes the drawing shows — gender and build, garments and their colours, hair,
hat, shoes, bag, pose — from Chinese sentence templates with their own synonyms and orders; it is written from
the identity, not translated from an English caption. As in English, the upper and lower garment colours are
named in almost every caption and the minor attributes only sometimes, so the Chinese caption of an image is a
description of the same person, not a sentence-by-sentence translation of its English caption. Words are not
separated by spaces.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

COLOURS_ZH: dict[str, tuple[str, ...]] = {
    "red": ("红色",),
    "orange": ("橙色", "橘色"),
    "yellow": ("黄色",),
    "green": ("绿色",),
    "blue": ("蓝色",),
    "purple": ("紫色",),
    "pink": ("粉色", "粉红色"),
    "brown": ("棕色", "咖啡色"),
    "black": ("黑色",),
    "white": ("白色",),
    "grey": ("灰色",),
}
HAIR_COLOURS_ZH: dict[str, tuple[str, ...]] = {
    "black": ("黑色",),
    "brown": ("棕色",),
    "blonde": ("金色", "金黄色"),
    "grey": ("灰白色", "花白"),
    "red": ("红棕色",),
}
_SUBJECTS = {"male": ("男子", "男士", "男人", "男性", "年轻男子"), "female": ("女子", "女士", "女人", "女性", "年轻女子")}
_BUILDS = {"slim": ("身材偏瘦的", "瘦瘦的", "身材苗条的"), "heavy": ("身材偏胖的", "身材壮实的", "微胖的"), "average": ("",)}
_UPPER = {
    "t-shirt": ("T恤", "短袖T恤", "短袖上衣"),
    "shirt": ("长袖衬衫", "衬衫", "长袖上衣"),
    "jacket": ("夹克", "外套", "拉链夹克"),
    "coat": ("长外套", "大衣", "风衣"),
    "hoodie": ("连帽衫", "卫衣", "带帽卫衣"),
    "dress": ("连衣裙", "及膝连衣裙"),
}
_LOWER = {
    "trousers": ("长裤", "裤子", "牛仔裤", "休闲裤"),
    "shorts": ("短裤", "中裤", "及膝短裤"),
    "skirt": ("裙子", "短裙", "半身裙"),
}
_BAGS = {
    "backpack": ("背着{c}双肩包", "背着一个{c}背包", "肩上背着{c}双肩包"),
    "handbag": ("手里拎着{c}手提包", "提着一个{c}手提包", "手上拿着{c}小包"),
    "shoulder bag": ("肩上挎着{c}单肩包", "斜挎着一个{c}包", "背着{c}斜挎包"),
}


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _coloured(rng: np.random.Generator, colour: str, noun: str, table: dict[str, tuple[str, ...]] = COLOURS_ZH) -> str:
    """``红色T恤`` or ``红色的T恤``."""
    return f"{_pick(rng, table[colour])}{'的' if rng.random() < 0.4 else ''}{noun}"


def describe_zh(identity, rng: np.random.Generator, walking: bool) -> str:
    """One Chinese caption of ``identity`` (a :class:`datasets.synthetic.Identity`; ``walking``: the drawn pose has a
    long stride)."""
    who = identity
    he = "他" if who.gender == "male" else "她"
    build = _pick(rng, _BUILDS[who.build]) if rng.random() < 0.55 else ""
    subject = f"{build}{_pick(rng, _SUBJECTS[who.gender])}"

    upper_noun = _pick(rng, _UPPER[who.upper_type])
    upper = _coloured(rng, who.upper_colour, upper_noun) if rng.random() < 0.97 else upper_noun
    lower = None
    if who.lower_type is not None:
        lower_noun = _pick(rng, _LOWER[who.lower_type])
        lower = _coloured(rng, who.lower_colour, lower_noun) if rng.random() < 0.97 else lower_noun

    clauses: list[str] = []
    if rng.random() < 0.75:
        if who.hair_length == "bald":
            clauses.append(_pick(rng, ("是光头", "剃了光头", "没有头发")))
        else:
            colour = _pick(rng, HAIR_COLOURS_ZH[who.hair_colour])
            length = "长发" if who.hair_length == "long" else "短发"
            clauses.append(_pick(rng, ("留着{c}{n}", "有一头{c}{n}", "一头{c}{n}")).format(c=colour, n=length))
    if who.hat_colour is not None and rng.random() < 0.85:
        hat = _pick(rng, ("帽子", "棒球帽", "鸭舌帽"))
        clauses.append(f"{_pick(rng, ('戴着一顶', '头戴'))}{_coloured(rng, who.hat_colour, hat)}")
    if rng.random() < 0.6:
        shoes = _coloured(rng, who.shoe_colour, _pick(rng, ("鞋子", "运动鞋", "球鞋")))
        clauses.append(f"{_pick(rng, ('穿着一双', '脚穿', '脚上是一双'))}{shoes}")
    if who.bag != "none" and rng.random() < 0.8:
        colour = _pick(rng, COLOURS_ZH[who.bag_colour]) + ("的" if rng.random() < 0.4 else "")
        clauses.append(_pick(rng, _BAGS[who.bag]).format(c=colour))
    elif who.bag == "none" and rng.random() < 0.2:
        clauses.append(_pick(rng, ("没有背包", "没有带包", "手里没有拿东西")))
    if rng.random() < 0.3:
        clauses.append(_pick(rng, ("正在走路", "正向前走")) if walking else _pick(rng, ("站着", "站在原地")))
    clauses = [clauses[i] for i in rng.permutation(len(clauses))]

    style = int(rng.integers(4))
    article = _pick(rng, ("一位", "一名", "一个"))
    if lower is None:
        clothing = f"一条{upper}" if rng.random() < 0.5 else upper
        first = {0: f"{article}{subject}穿着{clothing}。", 1: f"这名{subject}身穿{clothing}。",
                 2: f"图中的{subject}穿着{clothing}。"}.get(style, f"{article}{subject}穿着{clothing}。")
    elif style == 0:
        first = f"{article}{subject}穿着{upper}和{lower}。"
    elif style == 1:
        first = f"这名{subject}上身穿{upper}，下身穿{lower}。"
    elif style == 2:
        first = f"图中的{subject}身穿{upper}，搭配{lower}。"
    else:
        lead = clauses.pop(0) if clauses else ("正在走路" if walking else "站着")
        first = f"{article}{subject}{lead}，{he}上身穿着{upper}，下身是{lower}。"
    sentences = [first]
    while clauses:
        take = min(len(clauses), int(rng.integers(1, 4)))
        group, clauses = clauses[:take], clauses[take:]
        if len(group) > 1 and rng.random() < 0.5:
            group[-1] = "还" + group[-1]
        sentences.append(f"{he}{'，'.join(group)}。")
    return "".join(sentences)
