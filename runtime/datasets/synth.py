"""Synthetic dense-scene datasets in the PerSense-D layout, with exact ground truth.

Layout written by `generate_dataset(out, ...)`:
    out/Images/<class>/NN.jpg, NN.png   00 = reference (mask of ONE instance); 01..N = test images
                                        (mask = union of all instances), 0/255 single channel
    out/meta/<class>/NN.json            count, inclusive (x0, y0, x1, y1) boxes of the visible pixels,
                                        (x, y) centres; for 00 also the reference instance's label
    out/meta/<class>/NN_density.npy     float32 HxW, one unit-mass Gaussian per instance (sum = count)
    out/meta/<class>/NN_instances.png   uint16 label map of the visible pixels, 0 = background

Scenes: objects sit on a jittered grid (so they crowd, touch and partly occlude one another, later
objects drawn over earlier ones); instance sizes follow the scene's density, varied by ±30%.
Distractors (other shapes and hues) are drawn in the same order but are never in the masks.
"""

from __future__ import annotations

import colorsys
import io
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from persense.runtime.errors import PersenseError
from persense.runtime.imageio import atomic_write_bytes, write_image, write_json

SHAPES = ("ellipse", "rounded_rect", "star", "polygon", "ring")
TEXTURES = ("solid", "stripes", "dots", "checker")
MAX_IMAGES = 99  # names are two digits; eval_miou skips any path containing "00", so 100+ cannot work
_COLOUR_NAMES = ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "blue", "violet", "pink")
_FILL = 1.15  # grid cells per object: a few empty cells leave gaps in the crowd
_JITTER = 0.2  # centre jitter, as a fraction of the cell size
_RADIUS = 0.48  # mean outer radius, as a fraction of the cell size: neighbours touch and overlap
_MIN_RADIUS = 4.0  # smallest mean radius in pixels for a readable object


@dataclass(frozen=True)
class Template:
    """One object class: shape family, proportions, colour (HSV) and texture."""

    shape: str
    aspect: float  # minor / major axis
    vertices: int  # star points or polygon sides
    hue: float  # degrees
    saturation: float
    value: float
    texture: str
    period: float  # texture period as a fraction of the object radius

    @property
    def rgb(self) -> np.ndarray:
        """The base colour as float RGB in 0..255."""
        return 255.0 * np.array(colorsys.hsv_to_rgb(self.hue / 360.0, self.saturation, self.value))

    @property
    def name(self) -> str:
        """A readable, digit-free name such as "teal-star"."""
        colour = _COLOUR_NAMES[int(self.hue // (360 / len(_COLOUR_NAMES))) % len(_COLOUR_NAMES)]
        return f"{colour}-{self.shape.replace('_', '-')}"


@dataclass(frozen=True)
class Scene:
    """A rendered scene and its exact ground truth."""

    image: np.ndarray  # HxWx3 uint8 RGB
    mask: np.ndarray  # HxW bool, union of the visible instance pixels
    labels: np.ndarray  # HxW uint16, 0 = background, 1..count = visible pixels of each instance
    boxes: np.ndarray  # (count, 4) int64 inclusive (x0, y0, x1, y1) of each instance's visible pixels
    centres: np.ndarray  # (count, 2) float64 (x, y) placement centres
    density: np.ndarray  # HxW float32, a unit-mass Gaussian per instance centre
    top_label: int  # label of the fully visible instance drawn last (the reference instance for 00)

    @property
    def count(self) -> int:
        """Number of instances with at least one visible pixel."""
        return len(self.centres)


def random_template(rng: np.random.Generator, avoid: Template | None = None) -> Template:
    """A random object template; with `avoid`, a different shape and a hue at least 60° away."""
    shapes = [s for s in SHAPES if avoid is None or s != avoid.shape]
    shape = shapes[rng.integers(len(shapes))]
    hue = rng.uniform(0, 360) if avoid is None else (avoid.hue + rng.uniform(60, 300)) % 360
    round_shape = shape in ("ellipse", "rounded_rect", "ring")
    return Template(
        shape=shape,
        aspect=float(rng.uniform(0.5, 0.9) if round_shape else 1.0),
        vertices=int(rng.integers(5, 9) if shape == "star" else rng.integers(3, 7)),
        hue=float(hue),
        saturation=float(rng.uniform(0.55, 0.95)),
        value=float(rng.uniform(0.6, 0.95)),
        texture=TEXTURES[rng.integers(len(TEXTURES))],
        period=float(rng.uniform(0.35, 0.7)),
    )


def _outline(template: Template) -> list[np.ndarray]:
    """Unit contours of the template's shape (max radius 1); a ring has an outer and an inner one."""
    t = np.linspace(0.0, 2.0 * np.pi, 72, endpoint=False)
    cos, sin = np.cos(t), np.sin(t)
    if template.shape == "rounded_rect":
        power = 2.0 / 5.0  # superellipse |x|^5 + |y|^5 = 1
        points = np.stack([np.sign(cos) * np.abs(cos) ** power, np.sign(sin) * np.abs(sin) ** power], 1)
    elif template.shape == "star":
        angles = np.linspace(0.0, 2.0 * np.pi, 2 * template.vertices, endpoint=False)
        radii = np.where(np.arange(angles.size) % 2 == 0, 1.0, 0.5)
        points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    elif template.shape == "polygon":
        angles = np.linspace(0.0, 2.0 * np.pi, template.vertices, endpoint=False)
        points = np.stack([np.cos(angles), np.sin(angles)], 1)
    else:  # ellipse, ring
        points = np.stack([cos, sin], 1)
    points = points * np.array([1.0, template.aspect])
    points /= np.linalg.norm(points, axis=1).max()
    return [points, 0.55 * points] if template.shape == "ring" else [points]


def max_instances(size: tuple[int, int]) -> float:
    """Most instances a (W, H) scene holds with objects of at least _MIN_RADIUS (distractors add up to 30%)."""
    width, height = size
    return width * height * _RADIUS**2 / (_FILL * _MIN_RADIUS**2) / 1.3


def _check_density(count: int, size: tuple[int, int]) -> None:
    """Refuse scenes whose objects would be too small to draw."""
    width, height = size
    if width < 32 or height < 32:
        raise PersenseError(f"image size {width}x{height} is too small; use at least 32x32")
    if count < 1:
        raise PersenseError(f"a scene needs at least one instance (got {count})")
    if count > max_instances(size):
        raise PersenseError(
            f"{count} instances do not fit in {width}x{height} (objects would be under "
            f"{2 * _MIN_RADIUS:.0f} px); use a larger --size or fewer --instances"
        )


def _grid(total: int, size: tuple[int, int]) -> tuple[int, int]:
    """Columns and rows of near-square cells, at least `_FILL * total` of them."""
    width, height = size
    cell = math.sqrt(width * height / (_FILL * total))
    while max(1, int(width // cell)) * max(1, int(height // cell)) < _FILL * total:
        cell *= 0.97
    return max(1, int(width // cell)), max(1, int(height // cell))


def _place(rng: np.random.Generator, total: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Jittered-grid centres (total, 2) and outer radii (total,) for the objects of one scene."""
    width, height = size
    cols, rows = _grid(total, size)
    cell_w, cell_h = width / cols, height / rows
    cells = rng.choice(cols * rows, size=total, replace=False)
    jitter = rng.uniform(-_JITTER, _JITTER, size=(total, 2))
    centres = np.stack([(cells % cols + 0.5 + jitter[:, 0]) * cell_w, (cells // cols + 0.5 + jitter[:, 1]) * cell_h], 1)
    radius = min(_RADIUS * min(cell_w, cell_h), min(width, height) / 8)
    return centres, radius * rng.uniform(0.7, 1.3, size=total)


def _polygons(template: Template, centres: np.ndarray, radii: np.ndarray, angles: np.ndarray) -> list[list[np.ndarray]]:
    """Fixed-point (shift 4) contours of each object: outline scaled, rotated and moved into place."""
    cos, sin = np.cos(angles), np.sin(angles)
    rotation = np.stack([np.stack([cos, -sin], 1), np.stack([sin, cos], 1)], 1)  # (n, 2, 2)
    contours = [
        np.einsum("nij,pj->npi", rotation * radii[:, None, None], unit) + centres[:, None, :]
        for unit in _outline(template)
    ]
    fixed = [np.round(c * 16).astype(np.int32) for c in contours]
    return [[c[i] for c in fixed] for i in range(len(centres))]


def _background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A muted textured background: base colour, smooth blotches and a linear gradient (float RGB)."""
    width, height = size
    base = 255.0 * np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.05, 0.3), rng.uniform(0.35, 0.75)))
    coarse = rng.uniform(-1.0, 1.0, size=(height // 48 + 2, width // 48 + 2, 3)).astype(np.float32)
    blotches = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xs * np.cos(angle) + ys * np.sin(angle)) / max(width, height)
    return base + 30.0 * blotches + 40.0 * ramp[..., None]


def _patterns(u: np.ndarray, v: np.ndarray, period: np.ndarray) -> np.ndarray:
    """Brightness factor of each texture in TEXTURES at local coordinates (u, v), shape (4, n)."""
    a, b = u / period, v / period
    stripes = np.where(np.sin(2 * np.pi * a) > 0, 1.0, 0.7)
    dots = np.where((a - np.round(a)) ** 2 + (b - np.round(b)) ** 2 < 0.07, 0.6, 1.0)
    checker = np.where((np.floor(a) + np.floor(b)) % 2 == 0, 1.0, 0.75)
    return np.stack([np.ones_like(u), stripes, dots, checker])


def _boxes(labels: np.ndarray, count: int) -> np.ndarray:
    """Inclusive (x0, y0, x1, y1) box of each label 1..count (every label must be present)."""
    ys, xs = np.nonzero(labels)
    order = np.argsort(labels[ys, xs], kind="stable")
    ys, xs = ys[order], xs[order]
    starts = np.searchsorted(labels[ys, xs], np.arange(1, count + 1))
    return np.stack(
        [
            np.minimum.reduceat(xs, starts),
            np.minimum.reduceat(ys, starts),
            np.maximum.reduceat(xs, starts),
            np.maximum.reduceat(ys, starts),
        ],
        1,
    ).astype(np.int64)


def _density(centres: np.ndarray, sigmas: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Sum of Gaussians, each normalised to unit mass over its in-image window (sum = count)."""
    width, height = size
    density = np.zeros((height, width), np.float64)
    for (cx, cy), sigma in zip(centres, sigmas):
        reach = int(math.ceil(3 * sigma))
        x0, x1 = max(0, int(cx) - reach), min(width, int(cx) + reach + 1)
        y0, y1 = max(0, int(cy) - reach), min(height, int(cy) + reach + 1)
        gx = np.exp(-0.5 * ((np.arange(x0, x1) + 0.5 - cx) / sigma) ** 2)
        gy = np.exp(-0.5 * ((np.arange(y0, y1) + 0.5 - cy) / sigma) ** 2)
        density[y0:y1, x0:x1] += np.outer(gy, gx) / (gy.sum() * gx.sum())
    return density.astype(np.float32)


@dataclass(frozen=True)
class _Objects:
    """The objects of one scene (instances first, then distractors) and their drawing order."""

    kinds: list[Template]
    centres: np.ndarray  # (n, 2) x, y
    radii: np.ndarray  # (n,) outer radius
    angles: np.ndarray  # (n,) rotation in radians
    order: np.ndarray  # drawing order, the last one on top


def _layout(rng: np.random.Generator, template: Template, count: int, size: tuple[int, int]) -> _Objects:
    """Place instances and distractors; the most inward instance is drawn last, fully visible."""
    n_distractors = int(rng.integers(max(1, count // 10), max(1, count // 4) + 1))
    others = [random_template(rng, avoid=template) for _ in range(2)]
    kinds = [template] * count + [others[i % 2] for i in range(n_distractors)]
    centres, radii = _place(rng, len(kinds), size)
    angles = rng.uniform(0, 2 * np.pi, size=len(kinds))
    order = rng.permutation(len(kinds))
    inset = np.minimum(centres, np.array(size) - centres).min(1) - radii
    top = int(np.argmax(inset[:count]))
    centres[top] = np.clip(centres[top], radii[top] + 1, np.array(size) - radii[top] - 2)
    return _Objects(kinds, centres, radii, angles, np.append(order[order != top], top))


def _owner_map(objects: _Objects, size: tuple[int, int]) -> np.ndarray:
    """HxW int32 map of the visible object at each pixel (index + 1, 0 = background)."""
    polygons: list[list[np.ndarray]] = [[]] * len(objects.kinds)
    for kind in dict.fromkeys(objects.kinds):
        members = np.array([i for i, k in enumerate(objects.kinds) if k == kind])
        shapes = _polygons(kind, objects.centres[members], objects.radii[members], objects.angles[members])
        for i, poly in zip(members, shapes):
            polygons[i] = poly
    owner = np.zeros((size[1], size[0]), np.int32)
    for i in objects.order:
        cv2.fillPoly(owner, polygons[i], int(i) + 1, lineType=cv2.LINE_8, shift=4)
    return owner


def _paint(rng: np.random.Generator, owner: np.ndarray, objects: _Objects) -> np.ndarray:
    """The RGB image: background, then each object pixel from its colour, texture and dome shading."""
    canvas = _background(rng, (owner.shape[1], owner.shape[0]))
    colours = np.array([k.rgb for k in objects.kinds]) + rng.uniform(-12, 12, size=(len(objects.kinds), 3))
    textures = np.array([TEXTURES.index(k.texture) for k in objects.kinds])
    periods = np.array([k.period for k in objects.kinds])
    ys, xs = np.nonzero(owner)
    idx = owner[ys, xs] - 1
    dx, dy = xs - objects.centres[idx, 0], ys - objects.centres[idx, 1]
    cos, sin, radius = np.cos(objects.angles[idx]), np.sin(objects.angles[idx]), objects.radii[idx]
    u, v = (dx * cos + dy * sin) / radius, (dy * cos - dx * sin) / radius
    texture = np.take_along_axis(_patterns(u, v, periods[idx]), textures[idx][None], 0)[0]
    shade = np.clip(1.0 - 0.35 * (u**2 + v**2), 0.55, 1.0)
    canvas[ys, xs] = colours[idx] * (shade * texture)[:, None]
    canvas += rng.normal(0.0, 4.0, size=canvas.shape)
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def _instance_labels(owner: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """uint16 labels 1..k of the instances with visible pixels, and the old -> new label table."""
    instance = np.where(owner <= count, owner, 0)
    visible = np.bincount(instance.ravel(), minlength=count + 1)[1:] > 0
    relabel = np.zeros(count + 1, np.int64)
    relabel[1:][visible] = np.arange(1, int(visible.sum()) + 1)
    return relabel[instance].astype(np.uint16), relabel


def render_scene(rng: np.random.Generator, template: Template, count: int, size: tuple[int, int]) -> Scene:
    """Render `count` instances of `template` plus distractors on a textured background of size (W, H)."""
    _check_density(count, size)
    objects = _layout(rng, template, count, size)
    owner = _owner_map(objects, size)
    image = _paint(rng, owner, objects)
    labels, relabel = _instance_labels(owner, count)
    kept = np.flatnonzero(relabel[1:])
    centres = objects.centres[kept]
    sigmas = objects.radii[kept] * math.sqrt(template.aspect) / 2  # a quarter of the size 2r*sqrt(aspect)
    return Scene(
        image=image,
        mask=labels > 0,
        labels=labels,
        boxes=_boxes(labels, kept.size),
        centres=centres,
        density=_density(centres, sigmas, size),
        top_label=int(relabel[objects.order[-1] + 1]),
    )


def _class_names(templates: list[Template]) -> list[str]:
    """Unique, digit-free folder names ("a-teal-star", "b-red-ring", ...; no "00" for eval_miou)."""

    def letters(i: int) -> str:
        return letters(i // 26 - 1) + chr(ord("a") + i % 26) if i >= 26 else chr(ord("a") + i)

    return [f"{letters(i)}-{t.name}" for i, t in enumerate(templates)]


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write a .npy file atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def _write_image_set(
    out: Path, name: str, stem: str, scene: Scene, mask: np.ndarray, extra: dict[str, int]
) -> list[Path]:
    """Write one image, its mask and its ground truth; return the paths written."""
    image_dir, meta_dir = out / "Images" / name, out / "meta" / name
    paths = [
        image_dir / f"{stem}.jpg",
        image_dir / f"{stem}.png",
        meta_dir / f"{stem}.json",
        meta_dir / f"{stem}_density.npy",
        meta_dir / f"{stem}_instances.png",
    ]
    write_image(paths[0], scene.image)
    write_image(paths[1], mask.astype(np.uint8) * 255)
    write_json(
        paths[2],
        {
            "image": f"Images/{name}/{stem}.jpg",
            "width": scene.image.shape[1],
            "height": scene.image.shape[0],
            "count": scene.count,
            "boxes": scene.boxes.tolist(),
            "centres": np.round(scene.centres, 3).tolist(),
            **extra,
        },
    )
    _save_npy(paths[3], scene.density)
    write_image(paths[4], scene.labels)
    return paths


def _check_request(
    out: Path, classes: int, images: int, instances: tuple[int, int], size: tuple[int, int], seed: int
) -> None:
    """Validate generate_dataset's arguments with messages that say what to change."""
    low, high = instances
    if seed < 0:
        raise PersenseError(f"--seed must be 0 or more (got {seed})")
    if classes < 1:
        raise PersenseError(f"--classes must be at least 1 (got {classes})")
    if not 1 <= images <= MAX_IMAGES:
        raise PersenseError(
            f"--images must be 1..{MAX_IMAGES} (got {images}): test images are named 01..NN "
            "and eval_miou treats any path containing '00' as the reference"
        )
    if not 1 <= low <= high:
        raise PersenseError(f"--instances must be A..B with 1 <= A <= B (got {low}..{high})")
    _check_density(high, size)
    for sub in ("Images", "meta"):
        if (out / sub).exists() and any((out / sub).iterdir()):
            raise PersenseError(f"{out / sub} already has content; choose an empty --out folder")


def generate_dataset(
    out: Path, classes: int, images: int, instances: tuple[int, int], size: tuple[int, int] = (768, 576), seed: int = 0
) -> list[Path]:
    """Write a deterministic synthetic PerSense-D dataset under `out`; return the files written."""
    out = Path(out)
    _check_request(out, classes, images, instances, size, seed)
    templates = [random_template(np.random.default_rng([seed, c])) for c in range(classes)]
    written: list[Path] = []
    for c, (name, template) in enumerate(zip(_class_names(templates), templates)):
        for index in range(images + 1):
            rng = np.random.default_rng([seed, c, index + 1])
            scene = render_scene(rng, template, int(rng.integers(instances[0], instances[1] + 1)), size)
            if index == 0:
                mask, extra = scene.labels == scene.top_label, {"reference_label": scene.top_label}
            else:
                mask, extra = scene.mask, {}
            written += _write_image_set(out, name, f"{index:02d}", scene, mask, extra)
    return written
