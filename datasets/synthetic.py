"""A small, learnable synthetic stand-in for CUHK-PEDES, ICFG-PEDES and RSTPReid.

Each identity is a set of visible attributes (gender and build, hair colour and length, upper garment
colour and type, lower garment colour and type, shoe colour, bag type and colour, hat). Every image of
an identity draws the same figure with another pose, position, scale, background and lighting; every
caption describes the identity's attributes with varied templates, synonyms and orders. The upper and
lower colours are named in almost every caption; minor attributes are named only sometimes. Captions
describe only what is drawn.

Identities are split into train / val / test blocks with disjoint ids. Within each evaluation split the
(upper colour, lower colour) pairs are all different while the split has at most 121 identities (then
they repeat as evenly as possible), so most evaluation identities can be told apart from the caption.

Files are written in the real benchmarks' layouts (see :mod:`datasets.pedes`), so the ordinary parsers
read them. With ``--languages en,ch`` the same images also get parallel English and Chinese annotation files
in the multilingual layout (``<dataset>/annos/{train,test}_reid_{en,ch}.json``, see :mod:`datasets.multilingual`;
that layout has no val split, so val identities are left out of it); the Chinese captions come from their own
templates (:mod:`datasets.synthetic_zh`)::

    python -m datasets.synthetic --root data/synthetic --dataset_name all
    python -m datasets.synthetic --root data/synthetic --contact_sheet logs/sheet.png
    python -m datasets.synthetic --root data/synthetic --dataset_name RSTPReid --languages en,ch

Output is deterministic: the same arguments give the same bytes.
"""
from __future__ import annotations

import argparse
import colorsys
import json
import logging
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from datasets.multilingual import ANNOTATION_FOLDER, annotation_file_name, parse_languages
from datasets.pedes import DATASETS, build_dataset, get_spec
from datasets.synthetic_zh import describe_zh
from utils.entry import run_main
from utils.errors import UserError

logger = logging.getLogger(__name__)

MARKER_FILE = "SYNTHETIC.json"

# Clearly different clothing colours (RGB) and the words a caption may use for each.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 28, 32),
    "orange": (250, 130, 10),
    "yellow": (248, 222, 40),
    "green": (30, 150, 55),
    "blue": (30, 65, 205),
    "purple": (128, 45, 170),
    "pink": (250, 140, 195),
    "brown": (112, 66, 30),
    "black": (22, 22, 26),
    "white": (242, 242, 238),
    "grey": (132, 132, 132),
}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "grey": ("grey", "gray"),
    "purple": ("purple", "violet"),
}
HAIR_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (18, 16, 16),
    "brown": (95, 55, 25),
    "blonde": (225, 195, 105),
    "grey": (170, 170, 170),
    "red": (170, 60, 20),
}
SKIN_TONES = ((240, 205, 175), (222, 180, 140), (190, 140, 100), (140, 95, 60), (95, 62, 40))
SHOE_COLOURS = ("black", "white", "brown", "grey", "red", "blue")

UPPER_TYPES = ("t-shirt", "shirt", "jacket", "coat", "hoodie", "dress")
LOWER_TYPES = ("trousers", "shorts", "skirt")
BAGS = ("none", "backpack", "handbag", "shoulder bag")


@dataclass(frozen=True)
class Identity:
    """The visible attributes of one person (``lower_type`` is ``None`` with a dress)."""

    gender: str
    build: str
    skin: int
    hair_colour: str
    hair_length: str
    upper_colour: str
    upper_type: str
    lower_colour: str
    lower_type: Optional[str]
    shoe_colour: str
    bag: str
    bag_colour: Optional[str]
    hat_colour: Optional[str]


@dataclass(frozen=True)
class SyntheticLayout:
    """How a benchmark's synthetic copy is laid out beyond :class:`datasets.pedes.PedesSpec`."""

    captions_per_image: int
    path_template: str  # formatted with split, pid, cam, k
    extra_fields: bool  # whether entries carry 'processed_tokens' (CUHK / ICFG style)


LAYOUTS: dict[str, SyntheticLayout] = {
    "CUHK-PEDES": SyntheticLayout(2, "{split}_query/p{pid:05d}_s{k:02d}.jpg", True),
    "ICFG-PEDES": SyntheticLayout(1, "{split}/{pid:04d}/{pid:04d}_{cam:03d}_{k:02d}.jpg", True),
    "RSTPReid": SyntheticLayout(2, "{pid:04d}_c{cam:02d}_{k:04d}.jpg", False),
}

#: Languages the generator writes captions in (codes of the multilingual layout).
SYNTHETIC_LANGUAGES = ("en", "ch")


@dataclass(frozen=True)
class SyntheticSummary:
    """What :func:`write_synthetic` wrote."""

    dataset_dir: str
    annotation_file: str
    num_ids: dict[str, int]
    num_images: dict[str, int]
    num_captions: dict[str, int]


def _pick(rng: np.random.Generator, options: Sequence, p: Optional[Sequence[float]] = None):
    """One element of ``options``, uniformly or with probabilities ``p``."""
    if p is None:
        return options[int(rng.integers(len(options)))]
    u, total = rng.random(), 0.0
    for option, weight in zip(options, p):
        total += weight
        if u < total:
            return option
    return options[-1]


def sample_identity(rng: np.random.Generator, upper_colour: str, lower_colour: str) -> Identity:
    """Draw the attributes of one person whose garments have the given colours."""
    gender = _pick(rng, ("male", "female"))
    female = gender == "female"
    build = _pick(rng, ("slim", "average", "heavy"), (0.3, 0.45, 0.25))
    if female:
        hair_length = _pick(rng, ("long", "short"), (0.7, 0.3))
    else:
        hair_length = _pick(rng, ("short", "long", "bald"), (0.8, 0.08, 0.12))
    if female and upper_colour == lower_colour and rng.random() < 0.6:
        upper_type, lower_type = "dress", None
    else:
        upper_type = _pick(rng, UPPER_TYPES[:-1], (0.3, 0.2, 0.2, 0.12, 0.18))
        if upper_type == "coat":  # a long coat would hide shorts or a skirt
            lower_type = "trousers"
        elif female:
            lower_type = _pick(rng, LOWER_TYPES, (0.5, 0.15, 0.35))
        else:
            lower_type = _pick(rng, LOWER_TYPES[:2], (0.75, 0.25))
    bag = _pick(rng, BAGS, (0.35, 0.25, 0.2, 0.2))
    bag_colour = None
    if bag != "none":  # a bag in the colour of the top would be invisible
        bag_colour = _pick(rng, [c for c in COLOURS if c != upper_colour])
    hat_colour = _pick(rng, list(COLOURS)) if rng.random() < 0.2 else None
    return Identity(
        gender=gender,
        build=build,
        skin=int(rng.integers(len(SKIN_TONES))),
        hair_colour=_pick(rng, list(HAIR_COLOURS), (0.35, 0.3, 0.15, 0.1, 0.1)),
        hair_length=hair_length,
        upper_colour=upper_colour,
        upper_type=upper_type,
        lower_colour=lower_colour,
        lower_type=lower_type,
        shoe_colour=_pick(rng, SHOE_COLOURS),
        bag=bag,
        bag_colour=bag_colour,
        hat_colour=hat_colour,
    )


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

_SUPERSAMPLE = 2


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, round(c * factor)))) for c in rgb)  # type: ignore[return-value]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A muted wall / street texture, ``float32[height, width, 3]`` in 0..255."""
    hue, sat, val = rng.random(), rng.uniform(0.04, 0.28), rng.uniform(0.35, 0.85)
    img = np.empty((height, width, 3), dtype=np.float32)
    img[:] = np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255.0
    style = int(rng.integers(3))
    if style == 0:  # vertical panels
        for edge in np.sort(rng.integers(0, width, size=3)):
            img[:, edge:] *= rng.uniform(0.85, 1.15)
    elif style == 1:  # windows
        for _ in range(int(rng.integers(2, 5))):
            y, x = int(rng.integers(0, height * 2 // 3)), int(rng.integers(0, width))
            h, w = int(rng.integers(height // 12, height // 5)), int(rng.integers(width // 6, width // 2))
            img[y : y + h, x : x + w] *= rng.uniform(0.7, 1.25)
    else:  # vertical gradient
        img *= np.linspace(rng.uniform(0.8, 1.0), rng.uniform(1.0, 1.2), height, dtype=np.float32)[:, None, None]
    ground = int(height * rng.uniform(0.78, 0.92))
    img[ground:] = img[ground:] * rng.uniform(0.6, 0.9) + rng.uniform(0, 25)
    np.clip(img, 0, 255, out=img)
    return img


@dataclass(frozen=True)
class Pose:
    """Where and how a figure stands in one image (lengths are fractions of the figure height)."""

    scale: float  # figure height / image height
    x_shift: float  # horizontal offset of the figure centre / image width
    y_slack: float  # where in the free vertical space the figure stands, 0 (top) .. 1 (bottom)
    stride: float  # horizontal distance of each ankle from the centre line beyond the rest position
    swing: tuple[float, float]  # angle offsets (radians) of the left and right arm
    bag_side: int  # -1 or 1: the side of the bag and of the cap's brim

    @property
    def walking(self) -> bool:
        return self.stride > 0.045


def sample_pose(rng: np.random.Generator) -> Pose:
    """A random pose, position and scale."""
    return Pose(
        scale=rng.uniform(0.8, 0.95),
        x_shift=rng.uniform(-0.1, 0.1),
        y_slack=rng.uniform(0.0, 1.0),
        stride=rng.uniform(0.0, 0.09),
        swing=(rng.uniform(-0.35, 0.35), rng.uniform(-0.35, 0.35)),
        bag_side=1 if rng.random() < 0.5 else -1,
    )


class _Figure:
    """Draws one identity in one pose on a canvas; coordinates are fractions of the figure height."""

    def __init__(self, draw: ImageDraw.ImageDraw, identity: Identity, pose: Pose, height: int, width: int):
        self.draw, self.who = draw, identity
        self.u = height * pose.scale
        self.cx = width * (0.5 + pose.x_shift)
        self.top = height * 0.01 + pose.y_slack * (height * 0.98 - self.u)
        build = {"slim": 0.86, "average": 1.0, "heavy": 1.2}[identity.build]
        female = identity.gender == "female"
        self.shoulder = (0.092 if female else 0.106) * build
        self.waist = self.shoulder * (0.78 if female else 0.86)
        self.hip = self.shoulder * (0.98 if female else 0.88)
        self.limb = 0.046 * build
        self.stride = pose.stride
        self.swing = pose.swing
        self.bag_side = pose.bag_side
        self.skin = SKIN_TONES[identity.skin]
        self.upper = COLOURS[identity.upper_colour]

    def p(self, dx: float, fy: float) -> tuple[float, float]:
        return (self.cx + dx * self.u, self.top + fy * self.u)

    def poly(self, points: Sequence[tuple[float, float]], fill) -> None:
        self.draw.polygon([self.p(x, y) for x, y in points], fill=fill)

    def ellipse(self, dx: float, fy: float, rx: float, ry: float, fill) -> None:
        x0, y0 = self.p(dx - rx, fy - ry)
        x1, y1 = self.p(dx + rx, fy + ry)
        self.draw.ellipse([x0, y0, x1, y1], fill=fill)

    def limb_quad(self, start: tuple[float, float], end: tuple[float, float], w0: float, w1: float, fill) -> None:
        (x0, y0), (x1, y1) = start, end
        length = math.hypot(x1 - x0, y1 - y0) or 1.0
        nx, ny = (y1 - y0) / length, -(x1 - x0) / length
        self.poly([(x0 + nx * w0, y0 + ny * w0), (x1 + nx * w1, y1 + ny * w1),
                   (x1 - nx * w1, y1 - ny * w1), (x0 - nx * w0, y0 - ny * w0)], fill)

    def line(self, a: tuple[float, float], b: tuple[float, float], width: float, fill) -> None:
        self.draw.line([self.p(*a), self.p(*b)], fill=fill, width=max(1, round(width * self.u)))

    # --- body parts -------------------------------------------------------------------------

    def legs(self) -> None:
        who = self.who
        lower = COLOURS[who.lower_colour] if who.lower_type else self.upper
        cover_to = {"trousers": 0.93, "shorts": 0.65, "skirt": 0.0, None: 0.0}[who.lower_type]
        for side in (-1, 1):
            hip = (side * self.hip * 0.5, 0.47)
            ankle = (side * (0.035 + self.stride), 0.935)
            self.limb_quad(hip, ankle, self.hip * 0.5, 0.026, self.skin)
            if cover_to:
                t = (cover_to - hip[1]) / (ankle[1] - hip[1])
                end = (hip[0] + t * (ankle[0] - hip[0]), cover_to)
                self.limb_quad(hip, end, self.hip * 0.55, 0.029 + (1 - t) * 0.02, lower)
            shoe = COLOURS[who.shoe_colour]
            self.ellipse(ankle[0] + side * 0.012, 0.955, 0.04, 0.028, shoe)
        if who.lower_type == "skirt":
            self.poly([(-self.hip, 0.44), (self.hip, 0.44), (self.hip * 1.45, 0.7), (-self.hip * 1.45, 0.7)], lower)

    def arm_points(self, side: int) -> tuple[tuple[float, float], tuple[float, float]]:
        angle = 0.12 + self.swing[(side + 1) // 2]
        shoulder = (side * (self.shoulder - self.limb * 0.4), 0.165)
        hand = (shoulder[0] + side * math.sin(angle) * 0.31, shoulder[1] + math.cos(angle) * 0.31)
        return shoulder, hand

    def arms(self) -> None:
        sleeve_fraction = 0.38 if self.who.upper_type in ("t-shirt", "dress") else 0.93
        for side in (-1, 1):
            shoulder, hand = self.arm_points(side)
            self.limb_quad(shoulder, hand, self.limb * 0.5, self.limb * 0.4, self.skin)
            cuff = (shoulder[0] + sleeve_fraction * (hand[0] - shoulder[0]),
                    shoulder[1] + sleeve_fraction * (hand[1] - shoulder[1]))
            self.limb_quad(shoulder, cuff, self.limb * 0.58, self.limb * 0.5, self.upper)
            self.ellipse(hand[0], hand[1], 0.024, 0.026, self.skin)

    def torso(self) -> None:
        who, s, w = self.who, self.shoulder, self.waist
        bottom = 0.5
        outline = [(-s, 0.15), (s, 0.15), (w, 0.44), (w * 1.04, bottom), (-w * 1.04, bottom), (-w, 0.44)]
        if who.upper_type == "coat":
            outline = [(-s, 0.15), (s, 0.15), (w, 0.44), (self.hip * 1.25, 0.68), (-self.hip * 1.25, 0.68), (-w, 0.44)]
        elif who.upper_type == "dress":
            outline = [(-s, 0.15), (s, 0.15), (w, 0.42), (self.hip * 1.5, 0.72), (-self.hip * 1.5, 0.72), (-w, 0.42)]
        self.poly(outline, self.upper)
        for side in (-1, 1):
            self.ellipse(side * (s - 0.025), 0.175, 0.035, 0.03, self.upper)
        dark = _shade(self.upper, 0.62) if sum(self.upper) > 120 else _shade((80, 80, 80), 1.0)
        if who.upper_type in ("t-shirt", "dress"):
            self.ellipse(0.0, 0.148, 0.03, 0.018, self.skin)
        elif who.upper_type == "shirt":
            self.poly([(-0.03, 0.145), (0.0, 0.19), (0.03, 0.145)], self.skin)
            for fy in (0.23, 0.29, 0.35, 0.41):
                self.ellipse(0.0, fy, 0.006, 0.006, dark)
        elif who.upper_type in ("jacket", "coat"):
            self.poly([(-0.035, 0.145), (0.0, 0.24), (0.035, 0.145)], dark)
            self.line((0.0, 0.24), (0.0, 0.67 if who.upper_type == "coat" else 0.5), 0.008, dark)
        elif who.upper_type == "hoodie":
            self.poly([(-0.055, 0.135), (0.055, 0.135), (0.03, 0.175), (-0.03, 0.175)], dark)
            self.poly([(-w * 0.7, 0.38), (w * 0.7, 0.38), (w * 0.8, 0.46), (-w * 0.8, 0.46)], dark)

    def head(self) -> None:
        who = self.who
        hair = HAIR_COLOURS[who.hair_colour]
        if who.hair_length == "long":  # behind the face, falling over the shoulders
            for side in (-1, 1):
                self.limb_quad((side * 0.045, 0.04), (side * 0.062, 0.25), 0.02, 0.024, hair)
        self.poly([(-0.02, 0.1), (0.02, 0.1), (0.022, 0.155), (-0.022, 0.155)], self.skin)
        self.ellipse(0.0, 0.067, 0.05, 0.058, self.skin)
        if who.hair_length != "bald":
            x0, y0 = self.p(-0.054, 0.004)
            x1, y1 = self.p(0.054, 0.11)
            self.draw.chord([x0, y0, x1, y1], 180, 360, fill=hair)
        if who.hat_colour is not None:
            hat = COLOURS[who.hat_colour]
            x0, y0 = self.p(-0.056, -0.002)
            x1, y1 = self.p(0.056, 0.09)
            self.draw.chord([x0, y0, x1, y1], 180, 360, fill=hat)
            self.line((-0.056, 0.044), (0.09 * self.bag_side, 0.044), 0.012, hat)

    def bag_behind(self) -> None:
        if self.who.bag == "backpack":
            side, colour = self.bag_side, COLOURS[self.who.bag_colour]
            x_in, x_out = side * self.shoulder * 0.4, side * (self.shoulder + 0.055)
            self.poly([(x_in, 0.17), (x_out, 0.18), (x_out, 0.42), (x_in, 0.42)], colour)

    def bag_front(self) -> None:
        who = self.who
        if who.bag == "none":
            return
        colour, side = COLOURS[who.bag_colour], self.bag_side
        if who.bag == "backpack":
            for strap_side in (-1, 1):
                x = strap_side * self.shoulder * 0.6
                self.line((x, 0.155), (x * 0.9, 0.36), 0.02, colour)
        elif who.bag == "shoulder bag":
            self.line((-side * self.shoulder * 0.8, 0.16), (side * self.hip, 0.46), 0.02, colour)
            x = side * (self.hip + 0.02)
            self.poly([(x - 0.05, 0.42), (x + 0.05, 0.42), (x + 0.05, 0.53), (x - 0.05, 0.53)], colour)
        elif who.bag == "handbag":
            _, (hx, hy) = self.arm_points(side)
            self.poly([(hx - 0.045, hy + 0.02), (hx + 0.045, hy + 0.02), (hx + 0.05, hy + 0.11), (hx - 0.05, hy + 0.11)],
                      colour)
            self.line((hx - 0.025, hy + 0.02), (hx, hy - 0.005), 0.01, colour)
            self.line((hx + 0.025, hy + 0.02), (hx, hy - 0.005), 0.01, colour)

    def render(self) -> None:
        self.bag_behind()
        self.legs()
        self.torso()
        self.arms()
        self.bag_front()
        self.head()


def render_image(
    identity: Identity, pose: Pose, rng: np.random.Generator, size: tuple[int, int] = (192, 64)
) -> Image.Image:
    """One photo of ``identity`` in ``pose`` with a random background and lighting.

    Args:
        size: ``(height, width)`` of the result.
    """
    height, width = size
    background = Image.fromarray(_background(rng, height, width).astype(np.uint8), "RGB")
    canvas = background.resize((width * _SUPERSAMPLE, height * _SUPERSAMPLE), Image.NEAREST)
    _Figure(ImageDraw.Draw(canvas), identity, pose, height * _SUPERSAMPLE, width * _SUPERSAMPLE).render()
    small = np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.float32)
    gain = rng.uniform(0.8, 1.15)
    cast = rng.uniform(-12, 12, size=3).astype(np.float32)
    noise = rng.standard_normal(size=small.shape, dtype=np.float32) * 4.0
    lit = np.clip(small * gain + cast + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(lit, "RGB")


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------

_SUBJECTS = {"male": ("man", "guy", "male", "gentleman", "young man"), "female": ("woman", "lady", "female", "girl")}
_BUILD_WORDS = {"slim": ("slim", "thin", "slender"), "heavy": ("heavy-set", "stocky", "chubby"), "average": ("",)}
_UPPER_WORDS = {
    "t-shirt": ("t-shirt", "short-sleeved shirt", "tee", "short-sleeved top"),
    "shirt": ("long-sleeved shirt", "shirt", "button-up shirt", "long-sleeved top"),
    "jacket": ("jacket", "zip-up jacket", "jacket"),
    "coat": ("long coat", "coat", "overcoat"),
    "hoodie": ("hoodie", "hooded sweatshirt", "sweatshirt"),
    "dress": ("dress", "knee-length dress", "dress"),
}
_LOWER_WORDS = {
    "trousers": ("trousers", "pants", "long pants", "jeans", "slacks"),
    "shorts": ("shorts", "short pants", "knee-length shorts"),
    "skirt": ("skirt", "short skirt", "knee-length skirt"),
}
_BAG_PHRASES = {
    "backpack": ("a {c} backpack", "a {c} bag on {his} back", "a {c} backpack on {his} shoulders"),
    "handbag": ("a {c} handbag", "a {c} bag in {his} hand", "a small {c} handbag"),
    "shoulder bag": ("a {c} shoulder bag", "a {c} bag over {his} shoulder", "a {c} crossbody bag"),
}


def _colour_word(rng: np.random.Generator, colour: str) -> str:
    return _pick(rng, COLOUR_WORDS.get(colour, (colour,)))


def _article(phrase: str) -> str:
    return "a " + phrase  # "a" before a vowel is fixed for the whole caption in describe()


_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aeiou])")


def _garment(rng: np.random.Generator, colour: str, words: Sequence[str], name_colour: bool, plural: bool) -> str:
    noun = _pick(rng, words)
    phrase = f"{_colour_word(rng, colour)} {noun}" if name_colour else noun
    if plural or noun in ("trousers", "pants", "long pants", "jeans", "slacks", "shorts", "short pants",
                          "knee-length shorts"):
        return phrase
    return _article(phrase)


def describe(identity: Identity, rng: np.random.Generator, walking: bool) -> str:
    """One natural-language caption of ``identity`` (``walking``: the drawn pose has a long stride)."""
    who = identity
    he, his = ("he", "his") if who.gender == "male" else ("she", "her")
    build = _pick(rng, _BUILD_WORDS[who.build]) if rng.random() < 0.55 else ""
    subject = " ".join(w for w in (build, _pick(rng, _SUBJECTS[who.gender])) if w)

    upper = _garment(rng, who.upper_colour, _UPPER_WORDS[who.upper_type], rng.random() < 0.97, False)
    clothes = [upper]
    if who.lower_type is not None:
        clothes.append(_garment(rng, who.lower_colour, _LOWER_WORDS[who.lower_type], rng.random() < 0.97, False))
        if rng.random() < 0.3:
            clothes.reverse()
    clothing = f" {_pick(rng, ('and', 'with', 'and'))} ".join(clothes)

    extras: list[str] = []  # clauses that follow "he/she ..."
    if rng.random() < 0.75:
        if who.hair_length == "bald":
            extras.append(_pick(rng, ("is bald", "has a bald head", "has no hair")))
        else:
            hair = f"{who.hair_length} {_colour_word(rng, who.hair_colour) if who.hair_colour != 'blonde' else 'blonde'} hair"
            extras.append(f"has {hair}")
    if who.hat_colour is not None and rng.random() < 0.85:
        extras.append(f"wears a {_colour_word(rng, who.hat_colour)} {_pick(rng, ('cap', 'hat', 'baseball cap'))}")
    if rng.random() < 0.6:
        shoes = _pick(rng, ("shoes", "sneakers", "trainers"))
        extras.append(_pick(rng, ("has on {c} {s}", "wears {c} {s}", "is wearing a pair of {c} {s}"))
                      .format(c=_colour_word(rng, who.shoe_colour), s=shoes))
    if who.bag != "none" and rng.random() < 0.8:
        bag = _pick(rng, _BAG_PHRASES[who.bag]).format(c=_colour_word(rng, who.bag_colour), his=his)
        extras.append(f"{_pick(rng, ('is carrying', 'carries', 'has'))} {bag}")
    elif who.bag == "none" and rng.random() < 0.2:
        extras.append(_pick(rng, ("is not carrying a bag", "carries nothing", "has no bag")))
    if rng.random() < 0.3:
        extras.append("is walking" if walking else "is standing still")
    order = rng.permutation(len(extras))
    extras = [extras[i] for i in order]

    style = int(rng.integers(4))
    if style == 0:
        first = f"{_article(subject).capitalize()} {_pick(rng, ('wearing', 'in', 'dressed in', 'who is wearing'))} {clothing}."
    elif style == 1:
        first = f"The {subject} is wearing {clothing}."
    elif style == 2:
        first = f"This {subject} {_pick(rng, ('wears', 'has on', 'is dressed in'))} {clothing}."
    else:
        lead = extras.pop(0) if extras else "is walking" if walking else "is standing"
        first = f"{_article(subject).capitalize()} {lead}. {he.capitalize()} is wearing {clothing}."
    sentences = [first]
    while extras:
        take = min(len(extras), int(rng.integers(1, 3)))
        group, extras = extras[:take], extras[take:]
        sentences.append(f"{he.capitalize()} {' and '.join(group)}.")
    return _A_BEFORE_VOWEL.sub(r"\1n ", " ".join(sentences))


def processed_tokens(caption: str) -> list[str]:
    """Lower-case word list of a caption, like the ``processed_tokens`` field of CUHK-PEDES."""
    return [w for w in "".join(c if c.isalnum() or c in "-'" else " " for c in caption.lower()).split()]


# ----------------------------------------------------------------------------------------------
# Writing a benchmark
# ----------------------------------------------------------------------------------------------


def _colour_pairs(rng: np.random.Generator, count: int, unique: bool) -> list[tuple[str, str]]:
    names = list(COLOURS)
    if not unique:
        return [(_pick(rng, names), _pick(rng, names)) for _ in range(count)]
    all_pairs = [(a, b) for a in names for b in names]
    pairs: list[tuple[str, str]] = []
    while len(pairs) < count:
        pairs.extend(all_pairs[i] for i in rng.permutation(len(all_pairs)))
    return pairs[:count]


def _prepare_dir(dataset_dir: str) -> None:
    """Create ``dataset_dir``, replacing an earlier synthetic copy but never other data."""
    if os.path.isdir(dataset_dir) and os.listdir(dataset_dir):
        if not os.path.isfile(os.path.join(dataset_dir, MARKER_FILE)):
            raise UserError(
                f"'{dataset_dir}' already exists and was not written by this generator; refusing to overwrite "
                "it. Choose another --root."
            )
        shutil.rmtree(dataset_dir)
    os.makedirs(os.path.join(dataset_dir, "imgs"), exist_ok=True)


def write_synthetic(
    root: str | os.PathLike,
    dataset_name: str = "CUHK-PEDES",
    num_ids: int = 300,
    seed: int = 0,
    images_per_id: int = 4,
    num_test_ids: Optional[int] = None,
    num_val_ids: Optional[int] = None,
    image_size: tuple[int, int] = (192, 64),
    jpeg_quality: int = 90,
    reuse: bool = False,
    languages: Optional[Sequence[str]] = None,
) -> SyntheticSummary:
    """Write a synthetic ``dataset_name`` under ``root`` in the real benchmark's layout.

    Args:
        root: the folder that will hold ``<dataset_name>/imgs/...`` and the annotation file.
        num_ids: identities in all splits together.
        seed: the same seed and arguments give the same bytes.
        images_per_id: images of each identity.
        num_test_ids, num_val_ids: identities in the test / val split (default ``num_ids // 6``
            each; val is always 0 for ICFG-PEDES, which has no val split).
        image_size: ``(height, width)`` of the stored JPEG files.
        reuse: keep a benchmark this function already wrote there with the same arguments instead of
            writing it again (its marker file records them).
        languages: also write the train and test identities in the multilingual layout with captions in these
            languages (codes of :data:`SYNTHETIC_LANGUAGES`); ``None`` writes the benchmark layout only. The
            English captions there are those of the benchmark layout; the benchmark layout's bytes do not
            depend on ``languages``.

    Raises:
        UserError: unknown dataset or language, impossible sizes, or ``root/dataset_name`` holds other data.
    """
    spec = get_spec(dataset_name)
    if spec.name not in LAYOUTS:
        raise UserError(f"No synthetic layout for {spec.name}; choose one of {', '.join(LAYOUTS)}.")
    layout = LAYOUTS[spec.name]
    unknown = [code for code in languages or () if code not in SYNTHETIC_LANGUAGES]
    if unknown or (languages is not None and not languages):
        raise UserError(f"The synthetic benchmark writes captions in {', '.join(SYNTHETIC_LANGUAGES)} only, "
                        f"got --languages {','.join(languages or ())!r}.")
    num_test = num_ids // 6 if num_test_ids is None else num_test_ids
    num_val = (num_ids // 6 if num_val_ids is None else num_val_ids) if spec.has_val else 0
    num_train = num_ids - num_test - num_val
    if min(num_test, num_val) < 0 or num_train < 1 or num_test < 1:
        raise UserError(
            f"--num_ids {num_ids} cannot hold {num_test} test and {num_val} val identities plus at least one "
            "training identity; raise --num_ids or lower --num_test_ids / --num_val_ids."
        )
    if images_per_id < 1 or min(image_size) < 16 or not 1 <= jpeg_quality <= 100:
        raise UserError(
            f"--images_per_id must be >= 1 (got {images_per_id}), --image_size at least 16x16 (got {image_size}) "
            f"and jpeg quality in 1..100 (got {jpeg_quality})."
        )

    dataset_dir = os.path.join(os.fspath(root), spec.name)
    annotation = os.path.join(dataset_dir, spec.annotation_files[0])
    arguments = dict(dataset_name=dataset_name, num_ids=num_ids, seed=seed, images_per_id=images_per_id,
                     num_test_ids=num_test, num_val_ids=num_val, image_size=list(image_size),
                     jpeg_quality=jpeg_quality)
    if languages is not None:  # absent otherwise, so that the marker of a benchmark-only copy keeps its bytes
        arguments["languages"] = list(languages)
    parallel_files = [os.path.join(dataset_dir, ANNOTATION_FOLDER, annotation_file_name(split, lang))
                      for split in ("train", "test") for lang in languages or ()]
    if (reuse and _written_with(dataset_dir, arguments)
            and all(os.path.isfile(p) for p in [annotation, *parallel_files])):
        logger.info("Reusing the synthetic %s already in %s (same arguments)", spec.name, dataset_dir)
        return _summary_of(dataset_dir, annotation)
    _prepare_dir(dataset_dir)
    dataset_index = list(DATASETS).index(spec.name)
    pair_rng = np.random.default_rng([seed, dataset_index, 0])
    blocks = [("train", num_train), ("val", num_val), ("test", num_test)]

    entries = []
    parallel: dict[str, dict[str, list]] = {split: {lang: [] for lang in languages or ()}
                                             for split in ("train", "test")}
    person = 0
    for split, count in blocks:
        for upper, lower in _colour_pairs(pair_rng, count, unique=split != "train"):
            rng = np.random.default_rng([seed, dataset_index, 1, person])
            identity = sample_identity(rng, upper, lower)
            file_id = person + spec.train_id_offset
            cam_offset = int(rng.integers(1, 15))
            for k in range(images_per_id):
                rel = layout.path_template.format(split=split, pid=file_id, cam=(cam_offset + k) % 15 + 1, k=k)
                img_rng = np.random.default_rng([seed, dataset_index, 2, person, k])
                pose = sample_pose(img_rng)
                image = render_image(identity, pose, img_rng, image_size)
                out = os.path.join(dataset_dir, "imgs", rel)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                image.save(out, format="JPEG", quality=jpeg_quality)
                captions = [describe(identity, rng, pose.walking) for _ in range(layout.captions_per_image)]
                entry = {"id": file_id, spec.path_key: rel, "captions": captions, "split": split}
                if layout.extra_fields:
                    entry["processed_tokens"] = [processed_tokens(c) for c in captions]
                entries.append(entry)
                if languages and split in parallel:
                    for lang, texts in _captions_in(languages, captions, identity, pose.walking,
                                                    np.random.default_rng([seed, dataset_index, 3, person, k])):
                        parallel[split][lang].append({"file_path": rel, "id": file_id, "captions": texts})
            person += 1

    with open(annotation, "w", encoding="utf-8") as handle:
        json.dump(entries, handle)
    if languages is not None:
        os.makedirs(os.path.join(dataset_dir, ANNOTATION_FOLDER))
        for split, by_language in parallel.items():
            for lang, lang_entries in by_language.items():
                path = os.path.join(dataset_dir, ANNOTATION_FOLDER, annotation_file_name(split, lang))
                with open(path, "w", encoding="utf-8") as handle:
                    json.dump(lang_entries, handle, ensure_ascii=False)
    with open(os.path.join(dataset_dir, MARKER_FILE), "w", encoding="utf-8") as handle:
        json.dump(arguments, handle, indent=1, sort_keys=True)
    summary = _summary_of(dataset_dir, annotation, entries)
    logger.info("Wrote synthetic %s to %s: %s", spec.name, dataset_dir, summary.num_images)
    return summary


def _captions_in(languages: Sequence[str], english: list[str], identity: Identity, walking: bool,
                 rng: np.random.Generator) -> list[tuple[str, list[str]]]:
    """``(language, captions)`` of one image for each of ``languages``: the English captions as given, the
    Chinese ones drawn from ``rng`` (as many as the English ones)."""
    return [(lang, english if lang == "en" else [describe_zh(identity, rng, walking) for _ in english])
            for lang in languages]


def _written_with(dataset_dir: str, arguments: dict) -> bool:
    """Whether ``dataset_dir`` holds a synthetic benchmark written with exactly ``arguments``."""
    try:
        with open(os.path.join(dataset_dir, MARKER_FILE), encoding="utf-8") as handle:
            return json.load(handle) == arguments
    except (OSError, ValueError):
        return False


def _summary_of(dataset_dir: str, annotation: str, entries: Optional[list] = None) -> SyntheticSummary:
    """Identities, images and captions per split of the annotation ``entries`` (read from the file if None)."""
    if entries is None:
        with open(annotation, encoding="utf-8") as handle:
            entries = json.load(handle)
    splits = ("train", "val", "test")
    ids: dict[str, set] = {split: set() for split in splits}
    images = dict.fromkeys(splits, 0)
    captions = dict.fromkeys(splits, 0)
    for entry in entries:
        split = entry["split"]
        ids[split].add(entry["id"])
        images[split] += 1
        captions[split] += len(entry["captions"])
    return SyntheticSummary(dataset_dir=dataset_dir, annotation_file=annotation,
                            num_ids={k: len(v) for k, v in ids.items()}, num_images=images, num_captions=captions)


def render_contact_sheet(
    root: str | os.PathLike, dataset_name: str, out_path: str | os.PathLike, num_ids: int = 12, split: str = "train"
) -> str:
    """Tile the images of the first ``num_ids`` identities of a written dataset into one PNG.

    One row per identity (its images left to right); the captions of each row are written to
    ``<out_path>.txt``. The dataset is read back with the ordinary parser, so the sheet shows exactly
    what training sees. Returns the PNG path.
    """
    dataset = build_dataset(dataset_name, root, verbose=False)
    rows: dict[int, dict[str, list[str]]] = {}
    if split == "train":
        for pid, _, path, caption in dataset.train:
            rows.setdefault(pid, {}).setdefault(path, []).append(caption)
    else:
        data = dataset.split(split)
        captions = iter(zip(data["caption_pids"], data["captions"]))
        for pid, path in zip(data["image_pids"], data["img_paths"]):
            rows.setdefault(pid, {}).setdefault(path, [])
        for pid, caption in captions:
            first_path = next(iter(rows[pid]))
            rows[pid][first_path].append(caption)
    chosen = list(rows.items())[:num_ids]
    if not chosen:
        raise UserError(f"The {split} split of {dataset_name} under '{root}' is empty; nothing to draw.")
    images = [[Image.open(p).convert("RGB") for p in paths] for _, paths in chosen]
    cell_h = max(im.height for row in images for im in row)
    cell_w = max(im.width for row in images for im in row)
    columns = max(len(row) for row in images)
    sheet = Image.new("RGB", (columns * (cell_w + 2), len(images) * (cell_h + 2)), (255, 255, 255))
    for r, row in enumerate(images):
        for c, im in enumerate(row):
            sheet.paste(im, (c * (cell_w + 2), r * (cell_h + 2)))
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    sheet.save(out_path)
    with open(out_path + ".txt", "w", encoding="utf-8") as handle:
        for r, (pid, paths) in enumerate(chosen):
            handle.write(f"row {r} (id {pid}):\n")
            for caption in (c for caps in paths.values() for c in caps):
                handle.write(f"  {caption}\n")
    logger.info("Contact sheet of %d identities written to %s (captions in %s.txt)", len(chosen), out_path, out_path)
    return out_path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options of ``python -m datasets.synthetic``."""
    parser = argparse.ArgumentParser(
        prog="python -m datasets.synthetic",
        description="Write a learnable synthetic text-to-image person retrieval benchmark in the layout of "
        "CUHK-PEDES, ICFG-PEDES or RSTPReid.",
    )
    parser.add_argument("--root", required=True, help="folder that will hold <dataset_name>/imgs and annotations")
    parser.add_argument("--dataset_name", default="CUHK-PEDES", choices=[*LAYOUTS, "all"])
    parser.add_argument("--num_ids", type=int, default=300, help="identities over all splits")
    parser.add_argument("--num_test_ids", type=int, default=None, help="test identities (default num_ids // 6)")
    parser.add_argument("--num_val_ids", type=int, default=None, help="val identities (default num_ids // 6)")
    parser.add_argument("--images_per_id", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, nargs=2, default=(192, 64), metavar=("H", "W"))
    parser.add_argument("--jpeg_quality", type=int, default=90)
    parser.add_argument("--reuse", action="store_true",
                        help="keep a benchmark already written there with the same arguments")
    parser.add_argument("--languages", default=None, metavar="CODES",
                        help="also write the multilingual layout with captions in these languages, e.g. en,ch "
                        "(annos/{train,test}_reid_<lang>.json; val identities are left out of it)")
    parser.add_argument("--contact_sheet", default=None, metavar="PNG",
                        help="also tile the first training identities into this PNG (captions in PNG.txt)")
    args = parser.parse_args(argv)
    if args.num_ids < 2:
        parser.error(f"--num_ids must be at least 2, got {args.num_ids}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit status (2 after a one-line ``error:`` for bad input)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_main(parse_args, _write_all, argv)


def _write_all(args: argparse.Namespace) -> None:
    names = list(LAYOUTS) if args.dataset_name == "all" else [args.dataset_name]
    languages = None if args.languages is None else parse_languages(args.languages)
    for name in names:
        write_synthetic(
            args.root, name, num_ids=args.num_ids, seed=args.seed, images_per_id=args.images_per_id,
            num_test_ids=args.num_test_ids, num_val_ids=args.num_val_ids,
            image_size=tuple(args.image_size), jpeg_quality=args.jpeg_quality, reuse=args.reuse,
            languages=languages,
        )
        if args.contact_sheet:
            stem, ext = os.path.splitext(args.contact_sheet)
            out = args.contact_sheet if len(names) == 1 else f"{stem}_{name}{ext or '.png'}"
            render_contact_sheet(args.root, name, out)


if __name__ == "__main__":
    sys.exit(main())
