"""Embedded offline data: a template language, a pretext corpus and seven GLUE-format tasks.

Nothing here is real GLUE or BooksCorpus. The sentences come from a small template grammar (film
reviews and events such as "anna bought the red car in rome ."), and each task has a rule a model
can learn from them, so the numbers of the embedded run measure something:

- ``cola``: grammatical sentence (1) or one corrupted by a word swap, a dropped verb or a repeated
  word (0);
- ``sst2``: sentiment of a review sentence, flipped by "not";
- ``rte``: the hypothesis keeps the premise's subject, verb and object (entailed, 0) or changes one
  of them or negates it ("nobody bought the car .", "anna never bought the car .") (1); a share
  of the entailed hypotheses carries a negation word too ("no one but anna bought the car ."), so
  a negation word alone does not decide the label;
- ``qnli``: the sentence answers the question (0) or is about another event or a film (1);
- ``mrpc``/``qqp``: the second text restates the first with synonyms and reordering (1) or changes
  one participant or negates it (0); ``qqp`` uses questions;
- ``stsb``: similarity 0-5 from the number of matching event slots (1 + matches, noise 0.25), and
  about 0 for unrelated pairs.

A share :data:`EASY_FRACTION` of the negative pairs carries an easy cue (a negation, an unrelated
topic); the rest differ only in one slot and need the two texts compared, and the changed slot
takes its value mostly from half of the slot's words (:data:`SKEW`: a weak word-level cue). A
task that is all easy cue is learned to the same predictions by every fine-tuning seed, one with no
cue a small model does not leave the constant prediction on (four of the seven tasks gave every seed
the same score with an earlier generator, and RTE, with the default share of easy cues, kept the
majority prediction); between the two the seeds give different scores (checked on the stored study
by ``tests/recipes/test_study_conclusions.py``). RTE's negations are of several forms, some rare
(:data:`NEGATIONS`), and some entailed hypotheses carry one too (:data:`ENTAILED_NEGATIONS`): a
rule "negation word means not entailed" is learned by every seed alike, so the model has to be
only partly right for the seeds to differ.

Labels follow the GLUE conventions of ``datasets`` (entailment = 0 for RTE and QNLI). A fraction
``label_noise`` of the binary labels is flipped (and STS-B scores get noise of that many points
× 2) so that no task is solved perfectly and training on noisy labels depends on the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .glue import RawSplit

SUBJECTS = ["anna", "ben", "carl", "dora", "eve", "finn", "gina", "hugo", "ida", "jon"]
VERBS = {  # past tense, present for questions, synonym
    "bought": ("buy", "purchased"),
    "painted": ("paint", "coloured"),
    "found": ("find", "discovered"),
    "cleaned": ("clean", "washed"),
    "sold": ("sell", "traded"),
    "built": ("build", "constructed"),
    "visited": ("visit", "saw"),
    "fixed": ("fix", "repaired"),
}
OBJECTS = {
    "car": "automobile",
    "house": "home",
    "boat": "ship",
    "garden": "yard",
    "shop": "store",
    "bridge": "crossing",
    "picture": "painting",
    "bike": "bicycle",
    "table": "desk",
}
ADJECTIVES = ["red", "old", "small", "big", "new", "blue"]
PLACES = {
    "in rome": "at rome",
    "in paris": "at paris",
    "on monday": "on the monday",
    "in june": "during june",
    "at night": "in the night",
    "in the city": "in town",
}
REVIEW_SUBJECTS = [
    "the movie",
    "the film",
    "the story",
    "the acting",
    "the music",
    "the plot",
    "the cast",
    "the ending",
    "the script",
    "the show",
]
POSITIVE = [
    "great",
    "wonderful",
    "brilliant",
    "charming",
    "delightful",
    "excellent",
    "moving",
    "clever",
]
NEGATIVE = ["terrible", "boring", "awful", "dull", "clumsy", "weak", "tedious", "bland"]
LINKS = ["was", "seemed", "felt"]
ADVERBS = ["really", "very", "quite", "truly", ""]
#: The share of negative pairs with an easy cue (negation, unrelated topic).
EASY_FRACTION = 0.3
#: Tasks whose negative pairs carry the easy cue more often than :data:`EASY_FRACTION`.
EASY_FRACTIONS: dict[str, float] = {"rte": 0.6}
#: How often a changed slot takes a value from the first half of its pool (a weak cue).
SKEW = 0.8


@dataclass(frozen=True)
class Event:
    """One template event: who did what to which object, where/when."""

    subject: str
    verb: str
    adjective: str
    obj: str
    place: str

    def sentence(self, synonyms: bool = False, fronted: bool = False) -> str:
        """``"anna bought the red car in rome ."``, optionally with synonyms or the place first."""
        verb = VERBS[self.verb][1] if synonyms else self.verb
        obj = OBJECTS[self.obj] if synonyms else self.obj
        place = PLACES[self.place] if synonyms else self.place
        core = f"{self.subject} {verb} the {self.adjective} {obj}"
        return f"{place} {core} ." if fronted else f"{core} {place} ."

    def question(self, synonyms: bool = False) -> str:
        """``"who bought the car ?"``."""
        verb = VERBS[self.verb][1] if synonyms else self.verb
        obj = OBJECTS[self.obj] if synonyms else self.obj
        return f"who {verb} the {obj} {self.place} ?"


def random_event(rng: random.Random) -> Event:
    """Draw an event uniformly from the template slots."""
    return Event(
        rng.choice(SUBJECTS),
        rng.choice(list(VERBS)),
        rng.choice(ADJECTIVES),
        rng.choice(list(OBJECTS)),
        rng.choice(list(PLACES)),
    )


def changed(event: Event, rng: random.Random, slots: tuple[str, ...]) -> Event:
    """Return ``event`` with one of ``slots`` replaced by a different value, drawn from the first
    half of the slot's values with probability :data:`SKEW` (a weak word-level cue, like the
    annotation artefacts of real GLUE: many words each slightly predictive of the label, which a
    small model learns partly, differently from seed to seed)."""
    slot = rng.choice(slots)
    pools = {"subject": SUBJECTS, "verb": list(VERBS), "obj": list(OBJECTS), "place": list(PLACES)}
    current = getattr(event, slot)
    pool = pools[slot]
    half = pool[: len(pool) // 2] if rng.random() < SKEW else pool
    value = rng.choice([v for v in half if v != current] or [v for v in pool if v != current])
    fields = {**event.__dict__, slot: value}
    return Event(**fields)


def review(rng: random.Random) -> tuple[str, int]:
    """A review sentence and its sentiment (1 positive), possibly negated."""
    positive = rng.random() < 0.5
    adjective = rng.choice(POSITIVE if positive else NEGATIVE)
    negated = rng.random() < 0.3
    adverb = rng.choice(ADVERBS)
    words = [rng.choice(REVIEW_SUBJECTS), rng.choice(LINKS)]
    words += ["not"] if negated else []
    words += [adverb] if adverb else []
    words += [adjective, "."]
    return " ".join(words), int(positive != negated)


def corrupt(sentence: str, rng: random.Random) -> str:
    """Make a sentence ungrammatical: swap two neighbours, drop the verb or repeat a word."""
    words = sentence.split()[:-1]
    kind = rng.randrange(3)
    if kind == 0:
        i = rng.randrange(len(words) - 1)
        if words[i] != words[i + 1]:
            words[i], words[i + 1] = words[i + 1], words[i]
            return " ".join(words) + " ."
    if kind <= 1:
        verbs = set(VERBS) | set(LINKS)
        kept = [w for w in words if w not in verbs]
        if len(kept) < len(words):
            return " ".join(kept) + " ."
    i = rng.randrange(len(words))
    return " ".join(words[: i + 1] + [words[i]] + words[i + 1 :]) + " ."


def pretext_corpus(num_sentences: int, seed: int) -> list[str]:
    """Paragraphs of template text for language-model pretraining (one paragraph per item).

    Follow-up sentences depend on the sentence before them ("... dull . so i hated it ."; a
    restatement with synonyms; the answer to a question), so predicting them requires carrying the
    meaning of a sentence past its full stop, as natural text does.
    """
    rng = random.Random(seed)
    paragraphs, sentences = [], []
    for _ in range(num_sentences):
        r = rng.random()
        if r < 0.35:
            text, positive = review(rng)
            sentences.append(text)
            if rng.random() < 0.7:
                verb = rng.choice(["liked", "loved", "enjoyed"] if positive else
                                  ["hated", "disliked", "regretted"])
                sentences.append(f"so i {verb} it .")
        elif r < 0.75:
            event = random_event(rng)
            sentences.append(event.sentence(fronted=rng.random() < 0.3))
            if rng.random() < 0.6:
                sentences.append("in other words " + event.sentence(synonyms=True))
        else:
            event = random_event(rng)
            sentences.append(event.question(synonyms=rng.random() < 0.5))
            sentences.append(f"{event.subject} {event.verb} it .")
        if len(sentences) >= 8:
            paragraphs.append(" ".join(sentences))
            sentences = []
    if sentences:
        paragraphs.append(" ".join(sentences))
    return paragraphs


#: Negations of an event and how often each is used: common forms a model learns from any data
#: order, rare ones it learns or misses depending on the fine-tuning seed (like the rare cue words
#: of real GLUE data).
NEGATIONS: tuple[tuple[str, float], ...] = (
    ("{nobody} {verb} the {obj} .", 0.45),
    ("{subject} never {verb} the {obj} .", 0.25),
    ("{subject} did not {present} the {obj} .", 0.15),
    ("none of them {verb} the {obj} .", 0.1),
    ("{subject} hardly {verb} the {obj} .", 0.05),
)


#: Hypotheses that carry a negation word and are still entailed (RTE), so that a negation word
#: alone does not decide the label: the model has to read its scope, which it learns partly.
ENTAILED_NEGATIONS: tuple[tuple[str, float], ...] = (
    ("no one but {subject} {verb} the {obj} .", 0.5),
    ("{subject} did not fail to {present} the {obj} .", 0.3),
    ("{subject} {verb} nothing but the {obj} .", 0.2),
)
#: The share of RTE's entailed pairs whose hypothesis is one of :data:`ENTAILED_NEGATIONS`.
ENTAILED_NEGATIONS_FRACTION = 0.3


def _negated(event: Event, rng: random.Random,
             forms: tuple[tuple[str, float], ...] = NEGATIONS) -> str:
    """A hypothesis with a negation, one of ``forms`` (:data:`NEGATIONS` contradict ``event``:
    "nobody bought the car .", "anna never bought the car .", ...)."""
    forms, weights = zip(*forms)
    form = rng.choices(forms, weights)[0]
    return form.format(nobody=rng.choice(["nobody", "no one"]), subject=event.subject,
                       verb=event.verb, present=VERBS[event.verb][0], obj=event.obj)


def _example(task: str, rng: random.Random) -> tuple[str, str | None, float]:
    if task == "sst2":  # no full stop: the sentiment word ends the text, "not" sits before it
        text, label = review(rng)
        return text[:-2], None, label
    if task == "cola":
        text = review(rng)[0] if rng.random() < 0.5 else random_event(rng).sentence()
        return (text, None, 1) if rng.random() < 0.5 else (corrupt(text, rng), None, 0)
    event = random_event(rng)
    positive = rng.random() < 0.5
    # Some negative pairs differ by an easy cue, the rest only by comparing the two texts.
    easy = rng.random() < EASY_FRACTIONS.get(task, EASY_FRACTION)
    if task == "rte":
        if not positive and easy:
            return event.sentence(), _negated(event, rng), 1
        if positive and rng.random() < ENTAILED_NEGATIONS_FRACTION:
            return event.sentence(), _negated(event, rng, ENTAILED_NEGATIONS), 0
        other = event if positive else changed(event, rng, ("subject", "verb", "obj"))
        return event.sentence(), f"{other.subject} {other.verb} the {other.obj} .", int(
            not positive)
    if task == "qnli":
        if not positive and easy:
            return event.question(), review(rng)[0], 1
        other = event if positive else changed(event, rng, ("verb", "obj", "place"))
        return other.question(), event.sentence(fronted=rng.random() < 0.3), int(not positive)
    if task in ("mrpc", "qqp"):
        other = event if positive else changed(event, rng, ("subject", "verb", "obj", "place"))
        if task == "qqp":
            second = _negated(event, rng)[:-1] + "?" if not positive and easy else \
                other.question(synonyms=True)
            return event.question(), second, int(positive)
        second = _negated(event, rng) if not positive and easy else other.sentence(
            synonyms=True, fronted=rng.random() < 0.5)
        return event.sentence(), second, int(positive)
    if task == "stsb":
        if rng.random() < 0.2:  # unrelated pair
            return event.sentence(), review(rng)[0], round(max(0.0, rng.gauss(0.2, 0.2)), 2)
        other = event
        slots = ["subject", "verb", "obj", "place"]
        for _ in range(rng.randrange(5)):
            slot = rng.choice(slots)
            slots.remove(slot)
            other = changed(other, rng, (slot,))
        matches = sum(getattr(event, s) == getattr(other, s)
                      for s in ("subject", "verb", "obj", "place"))
        score = min(5.0, max(0.0, 1.0 + matches + rng.gauss(0.0, 0.25)))
        return event.sentence(), other.sentence(synonyms=rng.random() < 0.5), round(score, 2)
    raise ValueError(f"no synthetic generator for task {task!r}")


def synthetic_task(
    task: str, num_train: int, num_test: int, seed: int, label_noise: float = 0.05
) -> tuple[RawSplit, RawSplit]:
    """Generate ``(train, test)`` for one task; the test split plays GLUE's validation split."""
    rng = random.Random(f"{task}-{seed}")
    splits = []
    for size in (num_train, num_test):
        a, b, labels = [], [], []
        for _ in range(size):
            first, second, label = _example(task, rng)
            if task == "stsb":
                label = round(min(5.0, max(0.0, label + rng.gauss(0.0, 2.0 * label_noise))), 2)
            elif rng.random() < label_noise:
                label = 1 - label
            a.append(first)
            b.append(second)
            labels.append(label)
        splits.append(RawSplit(a, None if b[0] is None else b, labels))
    return splits[0], splits[1]
