"""Synthetic children's stories from a probabilistic grammar of our own, with each story's exact probability.

Owns the story grammar (`tell_story`), its sampler (`generate_corpus`) and the corpus's entropy
floor (`entropy_bits_per_byte`). It exists so that tests and the
quickstart learn from text we may ship (no copy or slice of TinyStories), and so that learning is judged against a
known floor: a model that knew this grammar would pay exactly `Story.bits` for a story and the `<|endoftext|>`
closing it (0 bytes in the trainer's bpb), so sum(bits) / sum(UTF-8 bytes) is the bpb no model beats in
expectation on fresh stories (each predicted from its start; stories are independent draws).

Exactness: every choice goes through `Choices`, so a story's bits are the sum of -log2 p over the choices that
wrote it. That is -log2 P(text) only if the grammar is unambiguous: no two choice sequences write the same text.
(A story's end is the end of its choices, marked by `<|endoftext|>`, so a story that is a prefix of another does
no harm.) The grammar is built for that: the alternatives of a choice are distinct strings, each optional part
carries words of its own ("also", "First,", "Then", "Nearby,"), and a choice that writes nothing yet (the plot,
the number of attempts) shows in the next words. tests/unit/test_synthetic.py proves it with a recogniser that re-runs
`tell_story` along every alternative a text allows and finds exactly one choice sequence, with the sampler's bits,
for 2,000 stories; it also enumerates parts of the grammar exhaustively (distinct texts, probabilities
summing to 1).

Randomness: `random.Random(seed)`, drawn only through `randrange` on integers (no floats, no hash order), so a
seed gives byte-identical stories on any machine and Python version. `generate_corpus(2000, seed=0)` measures
0.132 bits per byte (the floor: 69.5 bits over 527 bytes a story), 108 words a story and 469 distinct words; a
template grammar fixes most words, so its floor sits below natural text's.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
Weights = Sequence[int] | None


@dataclass(frozen=True)
class Story:
    """One story and what it costs under the grammar."""

    text: str
    bits: float  # -log2 P(choices that wrote it) = -log2 P(text), the grammar being unambiguous


class Choices:
    """The one door through which the grammar chooses and writes, so bits add up every choice's -log2 p.

    Each choice is drawn from `rng` with its stated probability, integers only (so the same on every machine);
    the tests' recogniser overrides `_choose` to follow a text instead.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng
        self.bits = 0.0
        self.parts: list[str] = []

    def _choose(self, n: int, weights: Weights, texts: Sequence[str] | None) -> int:
        if weights is None:
            return self.rng.randrange(n)
        return bisect.bisect_right(list(itertools.accumulate(weights)), self.rng.randrange(sum(weights)))

    def emit(self, text: str) -> None:
        self.parts.append(text)

    def _index(self, n: int, weights: Weights, texts: Sequence[str] | None) -> int:
        i = self._choose(n, weights, texts)
        self.bits += math.log2(n) if weights is None else math.log2(sum(weights)) - math.log2(weights[i])
        return i

    def pick(self, options: Sequence[T], weights: Weights = None) -> T:
        """A choice that writes nothing yet (the plot, how many attempts): its effect shows in later words."""
        return options[self._index(len(options), weights, None)]

    def say(self, texts: Sequence[str], weights: Weights = None) -> int:
        """Write one of `texts` (weights: positive integers, None for uniform); the index says which."""
        i = self._index(len(texts), weights, texts)
        self.emit(texts[i])
        return i


def generate_corpus(n: int, seed: int) -> list[Story]:
    """`n` independent stories with their exact bits; the same seed gives byte-identical stories everywhere."""
    rng = random.Random(seed)
    stories = []
    for _ in range(n):
        c = Choices(rng)
        tell_story(c)
        stories.append(Story("".join(c.parts), c.bits))
    return stories


def entropy_bits_per_byte(stories: Iterable[Story]) -> float:
    """The floor of the trainer's bpb on these stories: their bits over their UTF-8 bytes (separators: 0 bytes)."""
    stories = list(stories)
    return sum(s.bits for s in stories) / sum(len(s.text.encode()) for s in stories)


# ---- the grammar: words ('|' separates alternatives) -----------------------------------------------------------

GIRLS = "Lily Mia Amy Lucy Emma Anna Sara Zoe Ella Kate Rose Maya Ruby Lena Jane Molly Daisy Nora".split()
BOYS = "Tom Ben Max Sam Tim Jack Leo Finn Jake Bob Dan Joe Noah Luke Ryan Owen Eli Theo".split()
NAMES = GIRLS + BOYS
KIDS = {True: "little girl|girl|kind little girl|happy girl|curious little girl|brave girl".split("|"),
        False: "little boy|boy|kind little boy|happy boy|curious little boy|brave boy".split("|")}
ANIMALS = "little bunny|small puppy|fluffy cat|little bird|brown bear|tiny mouse|little fox|yellow duck|orange cat|" \
    "old dog".split("|")
SETTINGS = "small town|big forest|quiet village|sunny land|green valley|little house by the sea".split("|")
HOMES = "in a small house.|in a big house.|near the woods.|by the sea.|on a farm.|in a busy city.".split("|")
TRAITS = "kind funny smart brave shy gentle curious happy quiet cheerful silly helpful".split()
ACTIVITIES = ("play in the park|play with {his} toys|sing songs|draw pictures|run and jump|look at the stars|"
              "read books|dance in the sun|play in the sand|help in the garden|pick flowers|play with {his} friends|"
              "splash in puddles|climb trees|bake cookies|ride {his} bike").split("|")
WHEN = ".| every morning.| after lunch.| on sunny days.| all day long.| in the evening.".split("|")
COLORS = "red blue green yellow pink purple orange white".split()
DAYS = " One day, | One sunny day, | One morning, | One afternoon, | One cold day, | One warm day, ".split("|")
SCENE_ADJECTIVES = "little big brown white black funny fat tiny old young".split()
SCENE_ANIMALS = "dog cat bird squirrel duck frog rabbit horse cow butterfly owl goat".split()
SCENE_DOING = "sleeping eating playing resting hiding sitting".split()
SCENE_PLACES = "by the road.|under a tree.|near the river.|in the grass.|on a fence.|in a field.|next to a rock.|" \
    "behind a bush.".split("|")
SADLY = ".| sadly.| with a sigh.| in a small voice.".split("|")
KINDLY = ".| with a smile.| kindly.| softly.".split("|")
CLOSINGS = (" It was the best day ever.", " That night, {he} went to bed with a big smile.",
            " {Name} would never forget that day.", " {Name} felt happy all day long.")
TOYS = "ball|doll|teddy bear|kite|toy car|hat|book|toy train|blanket|shoe|drum".split("|")
TOY_ADJECTIVES = ["", *(f"{a} " for a in (*COLORS, *"little new favorite soft shiny old special".split()))]
LOOK = ("under the bed|behind the door|in the toy box|under the table|in the garden|behind the couch|"
        "near the big tree|in the kitchen|under a pile of leaves|by the pond|in the car|on the shelf").split("|")
FAMILY = (("mom", "Mom", True), ("dad", "Dad", False), ("grandma", "Grandma", True), ("grandpa", "Grandpa", False))
SAD = "sad|very sad|worried|upset|scared|a little sad|lonely|angry".split("|")
UP_HIGH = "kite|ball|balloon|hat|paper plane|frisbee".split("|")
PARKS = "in the park.|in the garden.|near the house.|on the hill.|by the river.|in the yard.".split("|")
HIGH_PLACES = "in a tall tree|on the roof|on a high wall|on top of a big rock".split("|")
TRIES = ("{he} jumped as high as {he} could, but {he} could not reach it.",
         "{he} tried to climb up, but it was too high.", "{he} threw {his} shoe at it, but the {thing} did not move.",
         "{he} got a long stick, but it was too short.", "{he} stood on a chair, but it was still too high.",
         "{he} called to the {thing}, but it stayed there.")
GROWNUPS = (("a tall man", False), ("a kind woman", True), ("{his} dad", False), ("{his} big sister", True),
            ("an old farmer", False), ("a friendly teacher", True))
HURT = (("bird", "wing"), ("kitten", "paw"), ("puppy", "paw"), ("duck", "wing"), ("bunny", "leg"), ("frog", "leg"))
HURT_ADJECTIVES = "little small baby tiny sad brown white gray".split()
OUTSIDE = "in the garden.|near the pond.|under a bush.|by the road.|in the tall grass.|behind the barn.".split("|")
CARE = ("{He} gave it some water.", "{He} made it a soft bed in a box.", "{He} gave it some food.",
        "{He} kept it warm with {his} blanket.", "{He} sang it a quiet song.", "{He} put a small bandage on it.",
        "{He} told it a story.", "{He} let it rest by the window.")
PLAYGROUNDS = "park.|beach.|playground.|lake.|zoo.|fair.".split("|")
GAMES = ("played with a ball|built a big sandcastle|ran and laughed|played tag|looked for shells|flew a kite|"
         "played hide and seek|shared a snack|drew funny pictures|sang silly songs").split("|")


def an(word: str) -> str:
    """'a' or 'an' by the vowel rule (the vocabulary has no 'hour'/'unicorn' exceptions)."""
    return ("an " if word[0] in "aeiouAEIOU" else "a ") + word


@dataclass(frozen=True)
class Character:
    ref: str  # how the story names them: "Lily", "her mom"
    female: bool
    call: str = ""  # how they are spoken to: "Lily", "Mom"

    def words(self, p: str = "") -> dict[str, str]:
        """Template slots: name, he, him, his, call, and the same capitalised (Name, He, ...), prefixed by `p`."""
        he, him, his = ("she", "her", "her") if self.female else ("he", "him", "his")
        w = {"name": self.ref, "he": he, "him": him, "his": his, "call": self.call or self.ref}
        return {**{p + k: v for k, v in w.items()}, **{p + k.capitalize(): v[0].upper() + v[1:] for k, v in w.items()}}


def _fill(templates: Sequence[str], words: dict[str, str], **slots: Sequence[str]) -> tuple[str, ...]:
    """Every template with every combination of slot values, in a fixed order (memoised: the recogniser
    re-runs the grammar many times per story)."""
    return _fill_cached(tuple(templates), tuple(words.items()), tuple((k, tuple(v)) for k, v in slots.items()))


@functools.lru_cache(maxsize=1 << 15)
def _fill_cached(templates: tuple[str, ...], words: tuple[tuple[str, str], ...],
                 slots: tuple[tuple[str, tuple[str, ...]], ...]) -> tuple[str, ...]:
    keys, values = [k for k, _ in slots], [v for _, v in slots]
    return tuple(t.format(**dict(words), **dict(zip(keys, vals))) for t in templates
                 for vals in itertools.product(*values))


def _says(c: Choices, w: dict[str, str], *templates: str, **slots: Sequence[str]) -> int:
    return c.say(_fill(templates, w, **slots))


def _optional(c: Choices, texts: Sequence[str], absent: int = 1) -> None:
    """One of `texts` or nothing, nothing weighted `absent` against 1 for each text."""
    c.say(["", *texts], weights=[absent, *[1] * len(texts)])


def _happy(c: Choices) -> bool:
    return c.pick((True, False), weights=(3, 1))


# ---- the grammar: sentences ------------------------------------------------------------------------------------

_KINDS = (*KIDS[True], *KIDS[False], *ANIMALS)
_A_KINDS = tuple(an(k) for k in _KINDS)
_PAIRS = tuple(f"{a} and {b}." for a in TRAITS for b in TRAITS if a != b)
_HURT_ANIMALS = tuple(an(f"{a} {h[0]}") for a in HURT_ADJECTIVES for h in HURT)


def _opening(c: Choices) -> Character:
    form = c.say(("Once upon a time, there was ", "Once upon a time, in ", "There was once ", ""))
    if form == 1:
        c.say([f"{an(s)}, there lived " for s in SETTINGS])
    if form == 3:  # the name first: "Lily was a little girl who lived by the sea."
        name = NAMES[c.say(NAMES)]
        c.say([f" was {an(k)} who lived " for k in (*KIDS[name in GIRLS], *ANIMALS)])
        c.say(HOMES)
    else:
        kind = _KINDS[c.say(_A_KINDS)]
        names = GIRLS if kind in KIDS[True] else BOYS if kind in KIDS[False] else NAMES
        name = names[c.say([f" named {n}." for n in names])]
    hero = Character(name, name in GIRLS)
    if c.pick((True, False), weights=(3, 1)):
        _says(c, hero.words(), " {He} was ", " {He} was very ")
        c.say(_PAIRS)
    return hero


def _habits(c: Choices, w: dict[str, str]) -> None:
    acts = [a.format(**w) for a in ACTIVITIES]
    form = _says(c, w, " {He} loved to ", " {He} liked to ", " Every day, {he} liked to ")
    first = c.say(acts)
    c.say(_fill(WHEN, w) if form < 2 else ["."])
    rest = [a for i, a in enumerate(acts) if i != first]
    _optional(c, _fill((" {He} also liked to {act}.",), w, act=rest), absent=len(rest))
    _optional(c, _fill((" {His} favorite color was {color}.",), w, color=COLORS), absent=2 * len(COLORS))


def _scene(c: Choices, lead: str) -> None:
    """A passer-by: " On the way, she saw a little brown dog sleeping under a tree." """
    c.say([f" {lead} {an(a)} " for a in SCENE_ADJECTIVES])
    c.say([f"{a} " for a in SCENE_ANIMALS])
    c.say([f"{d} " for d in SCENE_DOING])
    c.say(SCENE_PLACES)


def _helper(c: Choices, hero: Character, w: dict[str, str]) -> Character:
    """Someone who comes to help: family ("her mom") or a friend with a name, as likely one as the other."""
    family = _fill((" {His} {who} came to help.", " {His} {who} heard {him} and came to help."), w,
                   who=[f[0] for f in FAMILY])
    friends = [n for n in NAMES if n != hero.ref]
    weights = [len(friends)] * len(family) + [len(family)] * len(friends)
    i = c.say([*family, *_fill((" {His} friend {friend} came to help.",), w, friend=friends)], weights)
    if i < len(family):
        ref, call, female = FAMILY[i % len(FAMILY)]
        return Character(f"{w['his']} {ref}", female, call)
    return Character(friends[i - len(family)], friends[i - len(family)] in GIRLS)


def _lost(c: Choices, hero: Character, w: dict[str, str]) -> None:
    form = _says(c, w, "{he} could not find {his} ", "{he} lost {his} ", "{he} looked for {his} ")
    w = {**w, "toy": TOYS[c.say([a + t for a in TOY_ADJECTIVES for t in TOYS]) % len(TOYS)]}
    c.emit(", but it was gone." if form == 2 else ".")
    _says(c, w, " {He} felt {feel}.", " {He} looked {feel}.", feel=SAD)
    _says(c, w, ' "Where is my {toy}?" {he} asked', ' "I lost my {toy}!" {he} cried',
          ' "Oh no, my {toy} is gone!" {he} said')
    c.say(SADLY)
    w = {**w, **_helper(c, hero, w).words("h_")}
    _says(c, w, ' "Don\'t worry, we will find it," {h_name} said', ' "Let\'s look together," {h_name} said',
          ' "I will help you look," {h_name} said')
    c.say(KINDLY)
    places = list(LOOK)
    for k in range(c.pick((0, 1, 2), weights=(1, 2, 1))):
        c.say([" First, they"] if k == 0 else [" Then they", " Next, they"])
        places.pop(c.say([f" looked {p}, but the {w['toy']} was not there." for p in places]))
    if _happy(c):
        _says(c, w, " At last, they looked {p}, and there it was!", " Then {h_name} looked {p} and found it!", p=places)
        _says(c, w, " {Name} was so happy.", " {Name} smiled and hugged {his} {toy}.",
              " {Name} jumped up and down with joy.")
        _says(c, w, ' "Thank you, {h_call}!" {he} said.', ' "You are the best, {h_call}!" {he} said.')
        _optional(c, _fill((" From that day on, {name} always kept {his} {toy} in a safe place.",
                            " {Name} learned to put {his} things away."), w), absent=2)
        _optional(c, _fill(CLOSINGS, w), absent=4)
    else:
        _says(c, w, " They looked everywhere, but they could not find the {toy}.")
        _says(c, w, " {Name} was sad, but {h_name} gave {him} a big hug.",
              " {Name} cried, and {h_name} held {his} hand.")
        _optional(c, _fill((" The next day, {his} mom gave {him} a new {toy}, and {he} felt a little better.",), w))


def _stuck(c: Choices, hero: Character, w: dict[str, str]) -> None:
    w = {**w, "thing": UP_HIGH[_says(c, w, "{he} was playing with {his} {thing} ", thing=UP_HIGH)]}
    c.say(PARKS)
    if c.pick((True, False)):
        _scene(c, "Nearby, there was")
    _says(c, w, " The wind blew hard, and the {thing} got stuck ", " Suddenly, the {thing} flew up and got stuck ")
    high = HIGH_PLACES[c.say([h + "." for h in HIGH_PLACES])]
    _says(c, w, ' "Oh no! My {thing}!" {he} cried', ' "How can I get it down?" {he} asked')
    c.say(SADLY)
    tries = [t.format(**w) for t in TRIES]
    for k in range(c.pick((1, 2, 3), weights=(1, 2, 1))):
        c.emit(" First, " if k == 0 else " Then ")
        tries.pop(c.say(tries))
    if _happy(c):
        grownups = [(g.format(**w), female) for g, female in GROWNUPS]
        g, female = grownups[c.say([f" Then {g} came by." for g, _ in grownups])]
        w = {**w, **Character(g, female).words("g_")}
        _says(c, w, " {g_He} reached up and got the {thing} down.", " {g_He} helped {name} get the {thing} down.")
        _says(c, w, ' "Thank you so much!" {name} said', ' "Thank you! You are so kind," {name} said')
        c.say(KINDLY)
        _optional(c, _fill((" {Name} learned that it is good to ask for help.",), w))
        _optional(c, _fill(CLOSINGS, w), absent=4)
    else:
        _says(c, w, " The {thing} stayed stuck {high}.", " The {thing} never came down.", high=[high])
        _says(c, w, " {Name} went home feeling sad.", " {Name} was sad and walked home slowly.")
        _optional(c, _fill((" But the next day, {his} dad gave {him} a new {thing}.",), w))


def _hurt_animal(c: Choices, hero: Character, w: dict[str, str]) -> None:
    _says(c, w, "{he} found ", "{he} saw ")
    animal, part = HURT[c.say(_HURT_ANIMALS) % len(HURT)]
    w = {**w, "animal": animal, "part": part}
    _says(c, w, " with a hurt {part} ")
    c.say(OUTSIDE)
    _says(c, w, ' "Poor little {animal}," {he} said', ' "Don\'t be scared, I will help you," {he} said',
          ' "Are you hurt, little {animal}?" {he} asked')
    c.say(KINDLY)
    _says(c, w, " {He} {how} picked it up and took it home.", how=("carefully", "gently", "slowly"))
    if c.pick((True, False), weights=(1, 3)):
        _scene(c, f"On the way home, {w['he']} saw")
    care = [" " + t.format(**w) for t in CARE]
    for _ in range(c.pick((1, 2, 3), weights=(1, 2, 1))):
        care.pop(c.say(care))
    if _happy(c):
        _says(c, w, " After a few days, the {animal}'s {part} was better.", " Soon the {animal} felt much better.")
        c.say([" It flapped its wings and flew up into the sky." if part == "wing" else " It jumped and ran around."])
        _says(c, w, ' "Goodbye, little {animal}!" {name} said with a big smile.', " {Name} was very proud.",
              " {Name} felt warm and happy inside.")
        _optional(c, _fill(CLOSINGS, w), absent=4)
    else:
        _says(c, w, " But the {animal} was still weak.", " But the {animal} did not get better.")
        _says(c, w, " {Name}'s mom took it to the animal doctor.")
        _says(c, w, " {Name} was sad to say goodbye, but {he} knew the doctor would help.")


def _new_friend(c: Choices, hero: Character, w: dict[str, str]) -> None:
    _says(c, w, "{he} went to the ")
    c.say(PLAYGROUNDS)
    if c.pick((True, False)):
        _scene(c, f"On the way, {w['he']} saw")
    kids = (*KIDS[True], *KIDS[False])
    kind = kids[_says(c, w, " There {he} saw {kid} sitting all alone.", kid=[an(k) for k in kids])]
    _says(c, w, ' "Hi, I am {name}. What is your name?" {he} asked.',
          ' "Hello! My name is {name}. Do you want to play?" {he} asked.')
    names = [n for n in (GIRLS if kind in KIDS[True] else BOYS) if n != hero.ref]
    w = {**w, "friend": names[c.say([f' "I am {n}," the {kind} said ' for n in names])]}
    c.say(("quietly.", "softly.", "with a small smile."))
    games = list(GAMES)
    games.pop(_says(c, w, " {name} and {friend} {game}.", game=games))
    _optional(c, [f" Then they {g}." for g in games], absent=len(games))
    if _happy(c):
        c.say([" They had so much fun together.", " They laughed all day long."])
        _says(c, w, " From that day on, {name} and {friend} were best friends.",
              " {Name} was happy to have a new friend.")
        _optional(c, _fill(CLOSINGS, w), absent=4)
    else:
        c.say([" Soon it was time to go home.", " Then it started to rain, and they had to go home."])
        _says(c, w, " Sadly, {friend} was moving to a new town the next week.")
        _says(c, w, " {Name} was sad to say goodbye, but {he} hoped to see {friend} again.")


def tell_story(c: Choices) -> None:
    """Write one story through `c`: the whole grammar."""
    hero = _opening(c)
    w = hero.words()
    _habits(c, w)
    plot = c.pick((_lost, _stuck, _hurt_animal, _new_friend))
    c.say(DAYS)
    plot(c, hero, w)
