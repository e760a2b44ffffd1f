"""The shapes world: deterministic synthetic scenes with captions and question/answer pairs.

Each image holds 1..``max_objects`` coloured shapes, one per cell of a coarse 3x3 grid, on a plain or
grainy tinted background. Everything (scene, pixels, captions, questions) is a pure function of
(split, index, seed), so every machine generates byte-identical data.

The ``compositional`` split tests generalisation to unseen attribute bindings: a fixed set of
colour-shape combinations (``HELD_OUT``, 6 of 30) never appears in train/val/test images or text,
and every compositional image contains at least one of them.

Generated English uses US spelling, as VQA does ("color", "gray", "center").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from blip2.errors import InputError
from blip2.io import write_text_atomically

SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
COLOURS = {  # name -> RGB; hues far apart so a frozen ImageNet encoder separates them easily
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 30),
    "purple": (150, 50, 190),
    "orange": (245, 135, 25),
}
SIZES = ("small", "large")
BACKGROUNDS = {"white": 235, "gray": 128, "black": 30}  # name -> grey level of the tint
TEXTURES = ("plain", "grainy")
SPLITS = ("train", "val", "test", "compositional")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
MAX_OBJECTS = len(NUMBER_WORDS) - 1

# (row, column) on the 3x3 grid -> name; only the five one-word cells are asked about in questions
CELL_NAMES = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}  # fmt: skip
# how captions place an object in a one-word cell; corner cells read "in the top left corner"
CELL_PHRASES = {
    "top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right",
    "center": "in the center",
}  # fmt: skip
CELLS = tuple(CELL_NAMES)

# 6 of the 30 colour-shape combinations (20%): every colour once, every shape at least once, so each
# colour and each shape is still seen in training, only never bound together this way
HELD_OUT = (
    ("red", "triangle"),
    ("green", "star"),
    ("blue", "cross"),
    ("yellow", "circle"),
    ("purple", "square"),
    ("orange", "triangle"),
)

DEFAULT_SIZES = {"train": 10_000, "val": 500, "test": 1_000, "compositional": 1_000}
VQA_ANSWER_COPIES = 10  # VQAv2 has 10 human answers per question; the standard accuracy formula expects 10
FORMAT_VERSION = 2  # 2: chat.json
META_FILE = "shapes.json"

# geometry, as fractions of a grid cell
_RADIUS = {"small": 0.24, "large": 0.40}
_JITTER = 0.6  # how much of the free space around a shape the centre may move into
_GRAIN_SIGMA = 14.0  # grey-level standard deviation of the grainy texture
_GRAIN_BLOCK = 56  # the grain is a noise field of about 56 x 56 blocks, whatever the image size


@dataclass(frozen=True)
class ShapesConfig:
    """How scenes are drawn. ``repeat_prob``: chance that an extra object copies an earlier object's
    colour and shape (so "two blue squares" and counting questions occur)."""

    image_size: int = 224
    max_objects: int = 3
    seed: int = 0
    held_out: tuple[tuple[str, str], ...] = HELD_OUT
    repeat_prob: float = 0.25

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise InputError(f"ShapesConfig.image_size must be >= 32 pixels, got {self.image_size}")
        if not 1 <= self.max_objects <= MAX_OBJECTS:
            raise InputError(f"ShapesConfig.max_objects must be in 1..{MAX_OBJECTS}, got {self.max_objects}")
        if not 0.0 <= self.repeat_prob <= 1.0:
            raise InputError(f"ShapesConfig.repeat_prob must be in [0, 1], got {self.repeat_prob}")
        held = tuple(tuple(pair) for pair in self.held_out)
        object.__setattr__(self, "held_out", held)  # accept lists (e.g. from YAML/JSON)
        for colour, shape in held:
            if colour not in COLOURS or shape not in SHAPES:
                raise InputError(
                    f"ShapesConfig.held_out has unknown combination ({colour!r}, {shape!r}); "
                    f"colours: {sorted(COLOURS)}, shapes: {list(SHAPES)}"
                )
        if not held or len(set(held)) >= len(COLOURS) * len(SHAPES):
            raise InputError("ShapesConfig.held_out must hold at least one and not every colour-shape combination")

    def seen_combos(self) -> list[tuple[str, str]]:
        """The colour-shape combinations allowed in train/val/test."""
        held = set(self.held_out)
        return [(colour, shape) for colour in COLOURS for shape in SHAPES if (colour, shape) not in held]


@dataclass(frozen=True)
class ShapeObject:
    """One shape. ``cell`` is (row, column) on the 3x3 grid; ``offset`` (-1..1 each) jitters the centre
    inside its cell; ``scale`` jitters the size; ``angle`` rotates (degrees); ``rgb`` is the jittered colour."""

    shape: str
    colour: str
    size: str
    cell: tuple[int, int]
    offset: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    angle: float = 0.0
    rgb: tuple[int, int, int] | None = None

    @property
    def position(self) -> str:
        return CELL_NAMES[self.cell]

    @property
    def combo(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str = "gray"
    texture: str = "plain"
    noise_seed: int = 0


# ----------------------------------------------------------------------------------------- scenes


def _seeded(seed: int, split: str, index: int, purpose: str) -> int:
    """A stable 64-bit seed for one (seed, split, index, purpose); independent of PYTHONHASHSEED."""
    digest = hashlib.sha256(f"shapes/{seed}/{split}/{index}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def text_rng(split: str, index: int, cfg: ShapesConfig) -> random.Random:
    """The random stream that picks caption wording and questions for one image."""
    return random.Random(_seeded(cfg.seed, split, index, "text"))


def make_scene(split: str, index: int, cfg: ShapesConfig) -> Scene:
    """The scene for image ``index`` of ``split``: 1..max_objects objects in distinct grid cells."""
    if split not in SPLITS:
        raise InputError(f"unknown shapes split {split!r}; splits: {list(SPLITS)}")
    if index < 0:
        raise InputError(f"image index must be >= 0, got {index}")
    rng = random.Random(_seeded(cfg.seed, split, index, "scene"))
    count = rng.randint(1, cfg.max_objects)
    cells = rng.sample(CELLS, count)
    combos: list[tuple[str, str]] = []
    for slot in range(count):
        if slot == 0 and split == "compositional":
            combos.append(rng.choice(cfg.held_out))  # the novel binding every compositional image shows
        elif slot > 0 and rng.random() < cfg.repeat_prob:
            combos.append(rng.choice(combos))
        elif split == "compositional":
            combos.append((rng.choice(list(COLOURS)), rng.choice(SHAPES)))
        else:
            combos.append(rng.choice(cfg.seen_combos()))
    objects = tuple(_jittered_object(rng, colour, shape, cell) for (colour, shape), cell in zip(combos, cells))
    return Scene(
        objects=objects,
        background=rng.choice(list(BACKGROUNDS)),
        texture=rng.choice(TEXTURES),
        noise_seed=rng.getrandbits(32),
    )


def _jittered_object(rng: random.Random, colour: str, shape: str, cell: tuple[int, int]) -> ShapeObject:
    base = COLOURS[colour]
    rgb = tuple(min(255, max(0, channel + rng.randint(-12, 12))) for channel in base)
    return ShapeObject(
        shape=shape,
        colour=colour,
        size=rng.choice(SIZES),
        cell=cell,
        offset=(rng.uniform(-1, 1), rng.uniform(-1, 1)),
        scale=rng.uniform(0.92, 1.08),
        angle=rng.uniform(-15, 15),
        rgb=rgb,
    )


# -------------------------------------------------------------------------------------- rendering


def render(scene: Scene, cfg: ShapesConfig) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``cfg.image_size`` pixels square."""
    size = cfg.image_size
    image = Image.fromarray(_background(scene, size))
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for obj in scene.objects:
        radius = _RADIUS[obj.size] * obj.scale * cell
        free = max(0.0, cell / 2 - radius * 1.15)  # keep the shape (incl. pointy corners) inside its cell
        row, column = obj.cell
        cx = (column + 0.5) * cell + obj.offset[0] * free * _JITTER
        cy = (row + 0.5) * cell + obj.offset[1] * free * _JITTER
        fill = obj.rgb or COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        else:
            draw.polygon(_outline(obj.shape, cx, cy, radius, obj.angle), fill=fill)
    return image


def _background(scene: Scene, size: int) -> np.ndarray:
    level = BACKGROUNDS[scene.background]
    if scene.texture == "plain":
        return np.full((size, size, 3), level, dtype=np.uint8)  # [S, S, 3]
    # grainy: blocky grey noise (compresses well as PNG, unlike per-pixel noise)
    block = max(1, size // _GRAIN_BLOCK)
    cells = math.ceil(size / block)
    noise = np.random.default_rng(scene.noise_seed).normal(0.0, _GRAIN_SIGMA, (cells, cells))  # [C, C]
    noise = np.repeat(np.repeat(noise, block, axis=0), block, axis=1)[:size, :size]  # [S, S]
    grey = np.clip(np.rint(level + noise), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)  # [S, S, 3]


def _outline(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of a (non-circle) shape centred at (cx, cy), rotated by ``angle`` degrees."""
    if shape == "square":
        polar = [(radius * 0.82 * math.sqrt(2), 45 + 90 * k) for k in range(4)]
    elif shape == "triangle":
        polar = [(radius * 1.2, -90 + 120 * k) for k in range(3)]  # pointing up
    elif shape == "star":
        polar = [(radius * (1.15 if k % 2 == 0 else 0.52), -90 + 36 * k) for k in range(10)]
    elif shape == "cross":
        arm, length = radius * 0.34, radius * 1.05
        corners = [(arm, length), (arm, arm), (length, arm), (length, -arm), (arm, -arm), (arm, -length)]
        corners += [(-x, -y) for x, y in corners]  # the other half, by point symmetry
        polar = [(math.hypot(x, y), math.degrees(math.atan2(y, x))) for x, y in corners]
    else:
        raise InputError(f"unknown shape {shape!r}; shapes: {list(SHAPES)}")
    return [
        (cx + r * math.cos(math.radians(theta + angle)), cy + r * math.sin(math.radians(theta + angle)))
        for r, theta in polar
    ]


# ---------------------------------------------------------------------------------------- captions


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _counted(count: int, colour: str, shape: str) -> str:
    """'a red circle', 'two blue squares'."""
    if count == 1:
        return _article(f"{colour} {shape}")
    return f"{NUMBER_WORDS[count]} {colour} {PLURALS[shape]}"


def _counted_shape(count: int, shape: str) -> str:
    """'a circle', 'two squares'."""
    return _article(shape) if count == 1 else f"{NUMBER_WORDS[count]} {PLURALS[shape]}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _where(obj: ShapeObject) -> str:
    name = obj.position
    return CELL_PHRASES.get(name, f"in the {name} corner")


def _described(obj: ShapeObject) -> str:
    """'a large red circle on the left'."""
    return f"{_article(f'{obj.size} {obj.colour} {obj.shape}')} {_where(obj)}"


def captions(scene: Scene, rng: random.Random) -> list[str]:
    """Five paraphrases of ``scene`` at different levels of detail: an inventory, the inventory with
    the background, a sentence with sizes and positions, a counted list, and the shapes alone.
    Word order varies with ``rng``."""
    groups = list(Counter(obj.combo for obj in scene.objects).items())
    rng.shuffle(groups)
    inventory = _join([_counted(count, colour, shape) for (colour, shape), count in groups])
    objects = list(scene.objects)
    rng.shuffle(objects)
    shape_counts = list(Counter(obj.shape for obj in objects).items())
    count = len(scene.objects)
    noun = "shape" if count == 1 else "shapes"
    backdrop = f"a {scene.texture} {scene.background} background"
    return [
        inventory,
        f"{inventory} on {backdrop}",
        "there is " + _join([_described(obj) for obj in objects]),
        f"{NUMBER_WORDS[count]} {noun} on {backdrop}: "
        + _join([_article(f"{obj.colour} {obj.shape}") for obj in objects]),
        "an image of " + _join([_counted_shape(n, shape) for shape, n in shape_counts]),
    ]


# --------------------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class Question:
    """A question with its type; ``questions`` returns just (question, answer)."""

    kind: str  # count | color | shape | position | exists
    question: str
    answer: str
    held_out: bool  # whether it names a held-out colour-shape combination (or asks about such an object)


def questions(
    scene: Scene, rng: random.Random, held_out: tuple[tuple[str, str], ...] = HELD_OUT
) -> list[tuple[str, str]]:
    """Up to five unambiguous (question, single-word answer) pairs, at most one per question type."""
    return [(q.question, q.answer) for q in typed_questions(scene, rng, held_out)]


def typed_questions(
    scene: Scene, rng: random.Random, held_out: tuple[tuple[str, str], ...] = HELD_OUT
) -> list[Question]:
    """Like ``questions`` with each question's type and whether it involves a held-out combination.

    Questions prefer objects with a held-out combination when the scene has one (compositional split),
    and never name a held-out combination when it has none (so train/val/test text never does).
    """
    held = set(held_out)
    asked = [
        _count_question(scene, rng),
        _colour_question(scene, rng, held),
        _shape_question(scene, rng, held),
        _position_question(scene, rng, held),
        _existence_question(scene, rng, held),
    ]
    return [q for q in asked if q is not None]


def _prefer_held_out(candidates: list[ShapeObject], held: set[tuple[str, str]]) -> list[ShapeObject]:
    novel = [obj for obj in candidates if obj.combo in held]
    return novel or candidates


def _count_question(scene: Scene, rng: random.Random) -> Question:
    shapes = Counter(obj.shape for obj in scene.objects)
    colours = Counter(obj.colour for obj in scene.objects)
    subject = rng.choice(("all", "present shape", "absent shape", "colour"))
    if subject == "all":
        text, count = "how many shapes are there?", len(scene.objects)
    elif subject == "present shape":
        shape = rng.choice(sorted(shapes))
        text, count = f"how many {PLURALS[shape]} are there?", shapes[shape]
    elif subject == "absent shape" and len(shapes) < len(SHAPES):
        shape = rng.choice([s for s in SHAPES if s not in shapes])
        text, count = f"how many {PLURALS[shape]} are there?", 0
    else:
        colour = rng.choice(sorted(colours))
        text, count = f"how many {colour} shapes are there?", colours[colour]
    return Question("count", text, NUMBER_WORDS[count], held_out=False)


def _colour_question(scene: Scene, rng: random.Random, held: set[tuple[str, str]]) -> Question | None:
    shapes = Counter(obj.shape for obj in scene.objects)
    unique = [obj for obj in scene.objects if shapes[obj.shape] == 1]
    if not unique:
        return None
    obj = rng.choice(_prefer_held_out(unique, held))
    return Question("color", f"what color is the {obj.shape}?", obj.colour, obj.combo in held)


def _shape_question(scene: Scene, rng: random.Random, held: set[tuple[str, str]]) -> Question | None:
    colours = Counter(obj.colour for obj in scene.objects)
    unique = [obj for obj in scene.objects if colours[obj.colour] == 1]
    if not unique:
        return None
    obj = rng.choice(_prefer_held_out(unique, held))
    return Question("shape", f"what shape is the {obj.colour} object?", obj.shape, obj.combo in held)


def _position_question(scene: Scene, rng: random.Random, held: set[tuple[str, str]]) -> Question | None:
    combos = Counter(obj.combo for obj in scene.objects)
    askable = [obj for obj in scene.objects if combos[obj.combo] == 1 and obj.position in CELL_PHRASES]
    if not askable:
        return None
    obj = rng.choice(_prefer_held_out(askable, held))
    return Question(
        "position", f"where is the {obj.colour} {obj.shape}?", obj.position, obj.combo in held
    )


def _existence_question(scene: Scene, rng: random.Random, held: set[tuple[str, str]]) -> Question:
    present = {obj.combo for obj in scene.objects}
    if rng.random() < 0.5:
        colour, shape = rng.choice(_prefer_held_out(list(scene.objects), held)).combo
        answer = "yes"
    else:
        shows_novel = bool(present & held)
        pool = [
            (c, s) for c in COLOURS for s in SHAPES
            if (c, s) not in present and ((c, s) in held) == shows_novel
        ]  # fmt: skip
        # half the time a near miss (shares the colour or the shape of a present object): tests binding
        near = [(c, s) for c, s in pool if any(c == pc or s == ps for pc, ps in present)]
        colour, shape = rng.choice(near if near and rng.random() < 0.5 else pool)
        answer = "no"
    return Question(
        "exists", f"is there {_article(f'{colour} {shape}')}?", answer, (colour, shape) in held
    )


# ------------------------------------------------------------------------------------------- chat

OPENERS = ("describe the picture.", "what do you see?", "what is in this image?", "tell me about this picture.")
DESCRIBED_SHARE = 0.5  # conversations that open with a description; the rest start with a question


@dataclass(frozen=True)
class Turn:
    """One question of a conversation with its expected single-word answer; ``follow_up``: it refers to the turn
    before ("where is it?")."""

    kind: str
    question: str
    answer: str
    follow_up: bool = False


def chat_rng(split: str, index: int, cfg: ShapesConfig) -> random.Random:
    """The random stream of one image's conversation (apart from the captions' and questions' stream)."""
    return random.Random(_seeded(cfg.seed, split, index, "chat"))


def chat_turns(scene: Scene, rng: random.Random, held_out: tuple[tuple[str, str], ...] = HELD_OUT) -> list[Turn]:
    """Three questions about ``scene``, each answered by one word: one question, then another of a different type
    followed up by a question about what it asked ("where is it?", "how many red shapes are there?"). An existence
    question whose honest answer is "no" is as likely as one answered "yes", and counts of absent shapes ("zero")
    occur. (Three plain questions in the rare scene that allows no follow-up.)"""
    asked = typed_questions(scene, rng, held_out)
    rng.shuffle(asked)
    texts = {q.question for q in asked}
    for second in asked:
        follow = _follow_up(scene, second, rng)
        if follow is not None and follow.question not in texts:
            first = next(q for q in asked if q is not second)
            return [Turn(first.kind, first.question, first.answer), Turn(second.kind, second.question, second.answer),
                    follow]
    return [Turn(q.kind, q.question, q.answer) for q in asked[:3]]


def _follow_up(scene: Scene, question: Question, rng: random.Random) -> Turn | None:
    """A question that refers back to ``question`` ("it", "them"), answered from the scene; None when none fits."""
    words = question.question.rstrip("?").split()
    if question.kind == "exists" and question.answer == "yes":  # "is there a red star?" -> where is it?
        colour, shape = words[-2], words[-1]
        same = [o for o in scene.objects if o.combo == (colour, shape)]
        if len(same) == 1 and same[0].position in CELL_PHRASES:
            return Turn("position", "where is it?", same[0].position, follow_up=True)
        return Turn("count", "how many of them are there?", NUMBER_WORDS[len(same)], follow_up=True)
    if question.kind == "exists":  # "is there a blue cross?" no -> how many crosses are there?
        shape = words[-1]
        count = sum(o.shape == shape for o in scene.objects)
        return Turn("count", f"how many {PLURALS[shape]} are there?", NUMBER_WORDS[count], follow_up=True)
    if question.kind == "color":  # "what color is the star?" red -> how many red shapes are there?
        count = sum(o.colour == question.answer for o in scene.objects)
        return Turn("count", f"how many {question.answer} shapes are there?", NUMBER_WORDS[count], follow_up=True)
    if question.kind == "shape":  # "what shape is the red object?" star -> where is it?
        colour = words[-2]
        obj = next(o for o in scene.objects if o.colour == colour)
        if obj.position in CELL_PHRASES and sum(o.combo == obj.combo for o in scene.objects) == 1:
            return Turn("position", "where is it?", obj.position, follow_up=True)
    return None


def conversation(
    scene: Scene, rng: random.Random, held_out: tuple[tuple[str, str], ...] = HELD_OUT
) -> tuple[list[dict], list[Turn]]:
    """A chat about ``scene`` as messages: the three ``chat_turns``, answered in one word each, after (in half of the
    conversations) a request to describe the picture, answered with a caption; the other half open with the first
    question, as `blip2 eval chat` does. Returns (messages, turns)."""
    description = rng.choice(captions(scene, rng)[:3])
    opener = [{"role": "user", "content": rng.choice(OPENERS)}, {"role": "assistant", "content": description}]
    turns = chat_turns(scene, rng, held_out)
    messages = opener if rng.random() < DESCRIBED_SHARE else []  # drawn last: the turns do not depend on it
    for turn in turns:
        messages += [{"role": "user", "content": turn.question}, {"role": "assistant", "content": turn.answer}]
    return messages, turns


# ---------------------------------------------------------------------------------------- writing


def image_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def write_split(root: Path, split: str, n: int, cfg: ShapesConfig, progress: bool = True) -> Path:
    """Write ``n`` images of ``split`` under ``root/split`` and its manifests:

    - ``images/000000.png`` ...
    - ``captions.jsonl``: one {"image", "captions", "image_id"} per line (the project's manifest)
    - ``vqa.json``: a list of {"image", "question", "answers", "question_id", "image_id", "question_type", "held_out"}
    - ``coco_captions.json``: COCO caption layout {"images", "annotations", ...} for caption metrics
    - ``chat.json``: a list of {"image", "image_id", "messages"} (``conversation``: three questions answered in one
      word, half of them after a description) and {"turns": [{"question", "answer", "kind", "follow_up"}]}, the three
      questions alone (what ``blip2 eval chat`` asks)
    - ``shapes.json``: size and config, written last: its presence marks the split complete
    """
    out = Path(root) / split
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)
    caption_rows, vqa_rows, chat_rows, coco_images, coco_annotations = [], [], [], [], []
    for index in tqdm(range(n), desc=f"shapes/{split}", unit="img", disable=not progress):
        scene = make_scene(split, index, cfg)
        relative = f"images/{index:06d}.png"
        render(scene, cfg).save(out / relative, format="PNG", compress_level=1)
        rng = text_rng(split, index, cfg)
        texts = captions(scene, rng)
        ident = image_id(split, index)
        caption_rows.append({"image": relative, "captions": texts, "image_id": ident})
        coco_images.append({"id": index, "file_name": relative, "width": cfg.image_size, "height": cfg.image_size})
        coco_annotations.extend(
            {"id": index * len(texts) + k, "image_id": index, "caption": text} for k, text in enumerate(texts)
        )
        for k, qa in enumerate(typed_questions(scene, rng, cfg.held_out)):
            vqa_rows.append({
                "image": relative,
                "question": qa.question,
                "answers": [qa.answer] * VQA_ANSWER_COPIES,
                "question_id": f"{ident}_q{k}",
                "image_id": ident,
                "question_type": qa.kind,
                "held_out": qa.held_out,
            })  # fmt: skip
        messages, turns = conversation(scene, chat_rng(split, index, cfg), cfg.held_out)
        chat_rows.append({"image": relative, "image_id": ident, "messages": messages,
                          "turns": [dataclasses.asdict(turn) for turn in turns]})
    write_text_atomically(out / "captions.jsonl", "".join(json.dumps(row) + "\n" for row in caption_rows))
    write_text_atomically(out / "vqa.json", json.dumps(vqa_rows))
    write_text_atomically(out / "chat.json", json.dumps(chat_rows))
    coco = {
        "info": {"description": f"blip2 shapes world, split {split}", "version": str(FORMAT_VERSION)},
        "licenses": [],
        "type": "captions",
        "images": coco_images,
        "annotations": coco_annotations,
    }
    write_text_atomically(out / "coco_captions.json", json.dumps(coco))
    write_text_atomically(out / META_FILE, json.dumps(_meta(split, n, cfg), indent=2))
    return out


def _meta(split: str, n: int, cfg: ShapesConfig) -> dict:
    # through JSON so tuples compare equal to the lists read back
    meta = {"format_version": FORMAT_VERSION, "split": split, "n": n, "config": dataclasses.asdict(cfg)}
    return json.loads(json.dumps(meta))


def is_complete(root: Path, split: str, n: int, cfg: ShapesConfig) -> bool:
    """Whether ``root/split`` already holds exactly this split (same size, config and format)."""
    meta = Path(root) / split / META_FILE
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()) == _meta(split, n, cfg)
    except json.JSONDecodeError:
        return False


def generate(
    root: str | Path,
    sizes: dict[str, int] | None = None,
    cfg: ShapesConfig = ShapesConfig(),
    progress: bool = True,
) -> dict[str, Path]:
    """Write every split in ``sizes`` (default ``DEFAULT_SIZES``) under ``root``; splits already
    complete with the same size and config are skipped. Returns split -> folder."""
    sizes = DEFAULT_SIZES if sizes is None else sizes
    unknown = sorted(set(sizes) - set(SPLITS))
    if unknown:
        raise InputError(f"unknown shapes splits {unknown}; splits: {list(SPLITS)}")
    root = Path(root)
    folders = {}
    for split, n in sizes.items():
        if is_complete(root, split, n, cfg):
            folders[split] = root / split
        else:
            folders[split] = write_split(root, split, n, cfg, progress=progress)
    return folders
