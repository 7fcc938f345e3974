"""Closed vocabularies shared by the procedural families: colours, shapes, numbers and words.

Everything a procedural sample names comes from these tables, so each family's answer vocabulary
is finite and enumerable (`answer_vocabulary`). Colours are chosen to stay distinguishable after
micro's global-view downscale (designed for the first micro's 112 px view; the shipped one's is 224 px); backgrounds are pale so every object colour contrasts.
"""
from __future__ import annotations

# Object colours: name -> RGB. Names are the canonical answers; VQA-style references add the
# variants below for a few annotators, as real annotators disagree on spelling and near-synonyms.
COLOURS_RGB: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 205, 20),
    "orange": (250, 130, 10),
    "purple": (135, 55, 185),
    "pink": (245, 110, 180),
    "brown": (130, 80, 35),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
}
COLOUR_VARIANTS: dict[str, tuple[str, ...]] = {"gray": ("grey",), "purple": ("violet",)}

# Pale backgrounds: name -> RGB. All keep contrast with every object colour (gray included).
BACKGROUNDS_RGB: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "beige": (245, 238, 220),
    "light blue": (225, 238, 250),
    "light green": (228, 244, 226),
    "light gray": (232, 232, 232),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon")

SIZE_WORDS: tuple[str, ...] = ("small", "large")
SIZE_VARIANTS: dict[str, tuple[str, ...]] = {"small": ("little",), "large": ("big",)}

NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six",
    "seven", "eight", "nine", "ten", "eleven", "twelve",
)


# Plates of signs: colours that read as a sign and carry black or white text.
SIGN_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "black")
CASES: tuple[str, ...] = ("upper", "lower", "title")


def styled(word: str, case: str) -> str:
    """`word` printed in one of `CASES`; references stay lower case whatever the print case."""
    return word.upper() if case == "upper" else word.title() if case == "title" else word


def plural(noun: str) -> str:
    """English plural of a shape or item noun used by the generators."""
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def article(word: str) -> str:
    """'a' or 'an' before `word` (all generator words are regular in this respect)."""
    return "an" if word[0] in "aeiou" else "a"


# Scene-text vocabulary: common short words (3..7 letters) of signs, shops and labels. Long enough
# that memorising is useless, short enough that a small model can learn the set.
SCENE_WORDS: tuple[str, ...] = tuple(
    """
    stop open exit sale cafe pizza hotel taxi bus park bank shop food bar pub inn gym spa zoo
    road east west north south left right push pull enter closed free fresh hot cold ice milk
    bread cake tea coffee juice water fire police school church museum market garden river lake
    beach hill city town main king queen star moon sun rain snow wind cloud storm lion tiger bear
    wolf fox deer horse sheep goat duck fish bird frog owl cat dog mouse apple lemon grape peach
    pear plum melon corn rice bean soup salad steak grill burger taco sushi noodle pasta donut
    candy cookie honey sugar salt pepper cheese butter egg ham jam pie tart waffle toast wine beer
    soda cola lime mint basil olive onion garlic tomato potato carrot radio music dance movie
    cinema video photo camera phone email post mail office store depot dock port gate door room
    hall floor stair lift wash clean dry fast slow safe wait walk run jump swim ride drive fly
    sail stay sleep dream smile happy lucky magic gold silver iron steel stone wood glass paper
    book read write print art craft toy game play team club cup goal ball golf tennis polo chess
    card dice blue red green pink black white gray brown orange purple yellow bright dark light
    big small tall short long wide new old young good best top hello thanks love peace hope joy
    home house farm barn field forest ocean island bridge tower castle palace temple studio salon
    barber bakery dental clinic doctor nurse vet pharma repair motor tire fuel gas oil diesel
    parking ticket tour travel plaza avenue street lane way route metro train tram
    ferry plane jet boat ship truck van bike auto cab lorry
    """.split()
)
