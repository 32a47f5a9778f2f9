"""Procedural scenes: a labelled dense-vision dataset generated on the spot, no download.

Each scene looks at a textured, slanted background plane with a few objects of five classes in
front of it. The objects are 3D surfaces, so depth and surface normals vary inside each one:

    sphere    a disc seen as a hemisphere           box   a flat square tile, tilted
    pyramid   a triangle rising to its centre       ring  a torus-like annulus
    star      a five-pointed star rising as a cone

Objects have a metric size (about 0.6 m, varying by a third), so their size in pixels falls with
depth; colours and stripe textures are drawn independently of the class. Surfaces are
z-buffered (nearer objects occlude farther ones), lit by a directional light (Lambert with an ambient
term), dimmed by distance fog, and the image gets Gaussian noise. Labels per pixel: class
(0 = background), instance, depth in metres and the unit surface normal in camera coordinates
(x right, y down, z forward; normals face the camera, so their z is negative). Per object: its
visible box and a few keypoints.

Scene ``i`` of a split depends only on the `SceneSpec`, the split and ``i`` (its own random
generator), so a larger split starts with the scenes of a smaller one, and changing the training
size leaves validation and test untouched. Splits are written once to a cache folder as ``.npy``
arrays and a JSON of boxes and keypoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

CLASS_NAMES = ("background", "sphere", "box", "pyramid", "ring", "star")
MAX_KEYPOINTS = 6  # per object: the centre and at most five corners (the star's tips); see _keypoints
SPLITS = ("train", "val", "test")
ARRAYS = ("image", "seg", "instance", "depth", "normals")
OBJECTS_FILE = "objects.json"
# Bump when rendering changes, so cached scenes of an older generator are not reused.
GENERATOR_VERSION = 1
_OBJECT_SIZE = 0.6  # metres: every class has the same typical size, so size does not give the class away
_CHUNK = 256  # scenes rendered at once


@dataclass(frozen=True)
class SceneSpec:
    """What a scene looks like; scenes differ only by the seed and their index."""

    image_size: int = 64
    seed: int = 0
    min_objects: int = 2
    max_objects: int = 6
    noise: float = 0.04  # standard deviation of the Gaussian pixel noise (images in [0, 1])

    def key(self) -> str:
        """A short hash naming this spec's cache folder."""
        text = json.dumps({"version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Scenes:
    """A split of scenes: per-pixel arrays (N first) and per-scene metadata."""

    image: np.ndarray  # [N, H, W, 3] uint8
    seg: np.ndarray  # [N, H, W] uint8, class index, 0 = background
    instance: np.ndarray  # [N, H, W] uint8, 0 = background, k = the scene's object with "instance" k
    depth: np.ndarray  # [N, H, W] float32, metres
    normals: np.ndarray  # [N, H, W, 3] float32, unit vectors
    objects: list[dict[str, Any]]  # per scene: plane, light, and its visible objects (box, keypoints)

    def __len__(self) -> int:
        return len(self.image)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dualhead/scenes`` (``~/.cache/dualhead/scenes``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dualhead" / "scenes"


def load_scenes(spec: SceneSpec, split: str, count: int, root: str | Path | None = None) -> Scenes:
    """The first `count` scenes of `split`, rendered once into ``<root>/<spec key>/<split>-<count>/``."""
    directory = Path(root or default_cache_dir()).expanduser() / spec.key() / f"{split}-{count}"
    if not (directory / OBJECTS_FILE).is_file():
        _write(render_split(spec, split, count), directory, spec)
    try:
        arrays = {name: np.load(directory / f"{name}.npy") for name in ARRAYS}
        objects = json.loads((directory / OBJECTS_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read cached scenes in {directory} ({err}); delete the folder to regenerate") from err
    return Scenes(**arrays, objects=objects)


def _write(scenes: Scenes, directory: Path, spec: SceneSpec) -> None:
    """Write beside the final folder and rename it into place, so readers never see half a split."""
    staging = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ARRAYS:
        np.save(staging / f"{name}.npy", getattr(scenes, name))
    (staging.parent / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
    (staging / OBJECTS_FILE).write_text(json.dumps(scenes.objects))
    try:
        staging.rename(directory)
    except OSError:  # another process finished the same split first
        shutil.rmtree(staging, ignore_errors=True)


def render_split(spec: SceneSpec, split: str, count: int) -> Scenes:
    """Render scenes ``0 .. count-1`` of `split` in memory."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if not 1 <= spec.min_objects <= spec.max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {spec.min_objects}, {spec.max_objects}")
    parts = [
        _render_chunk(spec, [_draw_scene(spec, split, i) for i in range(start, min(start + _CHUNK, count))])
        for start in range(0, count, _CHUNK)
    ]
    if not parts:
        raise ValueError(f"a split needs at least one scene, got count={count}")
    return Scenes(
        **{name: np.concatenate([getattr(part, name) for part in parts]) for name in ARRAYS},
        objects=[scene for part in parts for scene in part.objects],
    )


# -- drawing the parameters of one scene ---------------------------------------------------------


def _draw_scene(spec: SceneSpec, split: str, index: int) -> dict[str, Any]:
    """Everything random about scene `index`, from its own generator."""
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), index])
    size = spec.image_size
    tilt, tilt_angle = rng.uniform(0.0, 0.7), rng.uniform(0, 2 * np.pi)
    plane = {"depth": rng.uniform(6.0, 10.0), "slope": [tilt * np.cos(tilt_angle), tilt * np.sin(tilt_angle)]}
    objects = []
    for _ in range(rng.integers(spec.min_objects, spec.max_objects + 1)):
        cu, cv = rng.uniform(0.05, 0.95, size=2) * size
        behind = _plane_depth(plane["depth"], *plane["slope"], (cu - size / 2) / size, (cv - size / 2) / size)
        depth = rng.uniform(2.0, max(2.5, 0.8 * behind))
        radius = np.clip(size * _OBJECT_SIZE * rng.uniform(0.75, 1.33) / depth, 0.06 * size, 0.3 * size)
        objects.append({
            "class": int(rng.integers(1, len(CLASS_NAMES))),
            "center": [cu, cv],
            "radius": radius,
            "depth": depth,
            "rotation": rng.uniform(0, 2 * np.pi),
            "tilt": list(rng.uniform(-0.6, 0.6, size=2)),  # box: depth slope of the tile
            "slope": rng.uniform(0.4, 1.2),  # pyramid, star: steepness of the faces
            "inner": rng.uniform(0.4, 0.6),  # ring: inner radius; star: inner vertices (fractions of radius)
            "color": list(rng.uniform(0.1, 1.0, size=3)),
            "stripes": [rng.uniform(0.0, 0.45), rng.uniform(0.15, 0.6), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)],
        })
    return {
        "plane": plane,
        "light": [rng.uniform(-0.8, 0.8), rng.uniform(-0.8, 0.8), -1.0],
        "ambient": rng.uniform(0.25, 0.45),
        "light_color": list(rng.uniform(0.85, 1.15, size=3)),
        "fog": [rng.uniform(0.0, 0.08), rng.uniform(0.5, 0.9)],  # density per metre, grey level
        "background": {
            "colors": [list(rng.uniform(0.1, 0.9, size=3)), list(rng.uniform(0.1, 0.9, size=3))],
            # Waves of about one cycle per metre: their period in pixels tells the plane's depth.
            "waves": [_wave(rng.uniform(0.8, 1.25), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)) for _ in range(2)],
            "checker": rng.uniform(0.0, 1.0),  # blend of a checkerboard into the smooth waves
        },
        "objects": objects,
        "noise": rng.standard_normal((size, size, 3)).astype(np.float32) * spec.noise,
    }


def _plane_depth(depth: Any, slope_x: Any, slope_y: Any, x: Any, y: Any) -> Any:
    """Depth of the background plane at normalised image coordinates (x, y) (weak perspective:
    linear in the image, `depth` at the centre); scalars or broadcastable arrays."""
    return depth * (1 + slope_x * x + slope_y * y)


def _wave(frequency: float, direction: float, phase: float) -> list[float]:
    """[kx, ky, phase]: a plane wave of `frequency` cycles per metre along angle `direction`."""
    return [frequency * np.cos(direction), frequency * np.sin(direction), phase]


# -- rendering a chunk of scenes at once ---------------------------------------------------------


def _stack(scenes: list[dict[str, Any]], key: str, fill: float = 0.0) -> np.ndarray:
    """Per-object parameter `key` as an [n, K] (or [n, K, d]) array, `fill` where a scene has fewer objects."""
    width = max(len(s["objects"]) for s in scenes)
    sample = np.asarray(scenes[0]["objects"][0][key], dtype=np.float64)
    out = np.full((len(scenes), width, *sample.shape), fill, dtype=np.float64)
    for i, scene in enumerate(scenes):
        for k, obj in enumerate(scene["objects"]):
            out[i, k] = obj[key]
    return out


def _render_chunk(spec: SceneSpec, scenes: list[dict[str, Any]]) -> Scenes:
    size = spec.image_size
    n, f, c = len(scenes), float(size), size / 2
    v, u = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    x, y = (u - c) / f, (v - c) / f  # normalised image coordinates

    # Background plane: depth linear in the image (weak perspective), one normal per scene.
    z0 = np.array([s["plane"]["depth"] for s in scenes])[:, None, None]
    slope = np.array([s["plane"]["slope"] for s in scenes])
    plane_depth = _plane_depth(z0, slope[:, 0, None, None], slope[:, 1, None, None], x, y)
    plane_normal = np.broadcast_to(np.concatenate([slope, -np.ones((n, 1))], axis=1)[:, None, None, :], (n, size, size, 3))
    plane_albedo = _background_albedo(scenes, x * plane_depth, y * plane_depth)

    # Objects: per-class surfaces, z-buffered against the plane and each other.
    classes = _stack(scenes, "class").astype(np.int64)  # 0 where a scene has fewer objects
    depth_stack = np.full((n, classes.shape[1] + 1, size, size), np.inf)
    depth_stack[:, 0] = plane_depth
    normal_stack = np.zeros((n, classes.shape[1] + 1, size, size, 3))
    normal_stack[:, 0] = plane_normal
    albedo_stack = np.zeros_like(normal_stack)
    albedo_stack[:, 0] = plane_albedo
    params = {key: _stack(scenes, key) for key in ("center", "radius", "depth", "rotation", "tilt", "slope", "inner", "color", "stripes")}
    for cls in range(1, len(CLASS_NAMES)):
        scene_idx, obj_idx = np.nonzero(classes == cls)
        if not len(scene_idx):
            continue
        p = {key: value[scene_idx, obj_idx] for key, value in params.items()}
        dx = u[None] - p["center"][:, 0, None, None]
        dy = v[None] - p["center"][:, 1, None, None]
        mask, height, normal = _SURFACES[CLASS_NAMES[cls]](dx, dy, p)
        z = p["depth"][:, None, None]
        depth_stack[scene_idx, obj_idx + 1] = np.where(mask, z - height * z / f, np.inf)
        normal_stack[scene_idx, obj_idx + 1] = normal
        albedo_stack[scene_idx, obj_idx + 1] = _object_albedo(dx, dy, p)

    owner = depth_stack.argmin(axis=1)  # [n, H, W]: 0 = plane, k = object k-1
    depth = np.take_along_axis(depth_stack, owner[:, None], axis=1)[:, 0]
    normal = np.take_along_axis(normal_stack, owner[:, None, ..., None], axis=1)[:, 0]
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    albedo = np.take_along_axis(albedo_stack, owner[:, None, ..., None], axis=1)[:, 0]
    seg = np.take_along_axis(np.concatenate([np.zeros((n, 1), np.int64), classes], axis=1), owner.reshape(n, -1), axis=1)

    image = _shade(scenes, albedo, normal, depth)
    return Scenes(
        image=np.round(np.clip(image, 0, 1) * 255).astype(np.uint8),
        seg=seg.reshape(n, size, size).astype(np.uint8),
        instance=owner.astype(np.uint8),
        depth=depth.astype(np.float32),
        normals=normal.astype(np.float32),
        objects=_annotations(scenes, owner, size),
    )


def _background_albedo(scenes: list[dict[str, Any]], px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Waves and a checkerboard in metric plane coordinates: their frequency in pixels follows depth."""
    out = []
    for scene, sx, sy in zip(scenes, px, py, strict=True):
        bg = scene["background"]
        waves = [np.sin(2 * np.pi * (kx * sx + ky * sy) + phase) for kx, ky, phase in bg["waves"]]
        checker = np.sign(waves[0]) * np.sign(waves[1])
        t = 0.5 + 0.2 * ((1 - bg["checker"]) * (waves[0] + waves[1]) + bg["checker"] * 2 * checker)
        low, high = np.asarray(bg["colors"][0]), np.asarray(bg["colors"][1])
        out.append(low + (high - low) * t[..., None])
    return np.stack(out)


def _object_albedo(dx: np.ndarray, dy: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    """Each object's colour with stripes of its own strength, period (in radii), angle and phase."""
    strength, period, angle, phase = (p["stripes"][:, i, None, None] for i in range(4))
    along = (dx * np.cos(angle) + dy * np.sin(angle)) / (period * p["radius"][:, None, None])
    shade = 1 - strength * (0.5 + 0.5 * np.sin(2 * np.pi * along + phase))
    return p["color"][:, None, None, :] * shade[..., None]


def _shade(scenes: list[dict[str, Any]], albedo: np.ndarray, normal: np.ndarray, depth: np.ndarray) -> np.ndarray:
    light = np.array([s["light"] for s in scenes])
    light /= np.linalg.norm(light, axis=1, keepdims=True)
    ambient = np.array([s["ambient"] for s in scenes])[:, None, None, None]
    lambert = np.clip(np.einsum("nhwc,nc->nhw", normal, light), 0, None)[..., None]
    color = albedo * (ambient + (1 - ambient) * lambert) * np.array([s["light_color"] for s in scenes])[:, None, None, :]
    density, grey = (np.array([s["fog"][i] for s in scenes])[:, None, None, None] for i in range(2))
    transmission = np.exp(-density * depth[..., None])
    color = color * transmission + grey * (1 - transmission)
    return color + np.stack([s["noise"] for s in scenes])


# -- object surfaces: (mask, height towards the camera in pixels, unnormalised normal) ------------


def _rotated(dx: np.ndarray, dy: np.ndarray, p: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    cos, sin = np.cos(p["rotation"])[:, None, None], np.sin(p["rotation"])[:, None, None]
    return dx * cos + dy * sin, -dx * sin + dy * cos


def _normal(gx: np.ndarray, gy: np.ndarray, gz: np.ndarray) -> np.ndarray:
    return np.stack(np.broadcast_arrays(gx, gy, gz), axis=-1)


def _sphere(dx, dy, p):
    radius = p["radius"][:, None, None]
    r2 = dx**2 + dy**2
    mask = r2 < radius**2
    height = np.sqrt(np.clip(radius**2 - r2, 0, None))
    return mask, height, _normal(dx, dy, -height)


def _box(dx, dy, p):
    a, b = _rotated(dx, dy, p)
    half = 0.8 * p["radius"][:, None, None]
    tx, ty = p["tilt"][:, 0, None, None], p["tilt"][:, 1, None, None]
    mask = (np.abs(a) < half) & (np.abs(b) < half)
    return mask, tx * dx + ty * dy, _normal(-tx, -ty, -np.ones_like(dx))


def _pyramid(dx, dy, p):
    """A triangle whose three faces rise to the centre: the nearest edge decides the face."""
    radius, slope = p["radius"][:, None, None], p["slope"][:, None, None]
    angles = p["rotation"][:, None] + np.pi / 3 + 2 * np.pi * np.arange(3)[None] / 3  # outward edge normals
    cos, sin = np.cos(angles)[..., None, None], np.sin(angles)[..., None, None]
    to_edge = radius[:, None] / 2 - (dx[:, None] * cos + dy[:, None] * sin)  # [M, 3, H, W]
    face = to_edge.argmin(axis=1)[:, None]
    nearest = np.take_along_axis(to_edge, face, axis=1)[:, 0]
    gx = slope * np.take_along_axis(np.broadcast_to(cos, to_edge.shape), face, axis=1)[:, 0]
    gy = slope * np.take_along_axis(np.broadcast_to(sin, to_edge.shape), face, axis=1)[:, 0]
    return nearest > 0, slope * nearest, _normal(gx, gy, -np.ones_like(dx))


def _ring(dx, dy, p):
    outer = p["radius"][:, None, None]
    inner = outer * p["inner"][:, None, None]
    half_width, middle = (outer - inner) / 2, (outer + inner) / 2
    r = np.sqrt(dx**2 + dy**2) + 1e-9
    offset = r - middle
    mask = np.abs(offset) < half_width
    height = np.sqrt(np.clip(half_width**2 - offset**2, 0, None))
    return mask, height, _normal(offset * dx / r, offset * dy / r, -height)


def _star(dx, dy, p):
    """A five-pointed star rising as a cone to its centre."""
    outer, slope = p["radius"][:, None, None], p["slope"][:, None, None]
    inner = outer * p["inner"][:, None, None] * 0.8
    a, b = _rotated(dx, dy, p)
    r = np.sqrt(a**2 + b**2) + 1e-9
    sector = np.mod(np.arctan2(b, a), 2 * np.pi / 5)
    folded = np.minimum(sector, 2 * np.pi / 5 - sector)  # angle from the nearest tip, in [0, pi/5]
    # Edge from the tip (outer, 0) to the inner vertex (inner, pi/5): inside if on the centre's side.
    ex, ey = inner * np.cos(np.pi / 5) - outer, inner * np.sin(np.pi / 5)
    mask = (r * np.cos(folded) - outer) * ey - r * np.sin(folded) * ex < 0
    return mask, slope * (outer - r), _normal(slope * dx / r, slope * dy / r, -np.ones_like(dx))


_SURFACES = {"sphere": _sphere, "box": _box, "pyramid": _pyramid, "ring": _ring, "star": _star}


# -- annotations -----------------------------------------------------------------------------------


def _keypoints(obj: dict[str, Any]) -> np.ndarray:
    """The centre, then the class's corners: box corners, pyramid vertices, star tips, or four
    points on the rim (sphere) or the middle circle (ring) at the object's rotation. Corners sit a
    tenth of the way in from the outline, so that a visible one lands on its object's pixels."""
    name, radius, rotation = CLASS_NAMES[obj["class"]], obj["radius"], obj["rotation"]
    count, distance, offset = {
        "sphere": (4, 0.9 * radius, 0.0),
        "box": (4, 0.9 * 0.8 * np.sqrt(2) * radius, np.pi / 4),
        "pyramid": (3, 0.9 * radius, 0.0),
        "ring": (4, radius * (1 + obj["inner"]) / 2, 0.0),
        "star": (5, 0.9 * radius, 0.0),
    }[name]
    angles = rotation + offset + 2 * np.pi * np.arange(count) / count
    corners = np.stack([np.cos(angles), np.sin(angles)], axis=1) * distance + obj["center"]
    return np.concatenate([[obj["center"]], corners])


def _annotations(scenes: list[dict[str, Any]], owner: np.ndarray, size: int) -> list[dict[str, Any]]:
    """Per scene: the plane, the light, and each visible object's class, depth, tight box
    ``[x0, y0, x1, y1)`` of its visible pixels and keypoints ``[x, y, v]`` (COCO visibility: 2 seen,
    1 hidden behind something, 0 outside the image)."""
    width = max(len(s["objects"]) for s in scenes)
    present = owner[:, None] == np.arange(1, width + 1)[None, :, None, None]  # [n, K, H, W]
    cols, rows = present.any(axis=2), present.any(axis=3)  # [n, K, W], [n, K, H]
    x0, x1 = cols.argmax(-1), size - cols[..., ::-1].argmax(-1)
    y0, y1 = rows.argmax(-1), size - rows[..., ::-1].argmax(-1)
    out = []
    for i, scene in enumerate(scenes):
        objects = []
        for k, obj in enumerate(scene["objects"]):
            if not cols[i, k].any():
                continue  # fully hidden
            points = []
            for px, py in np.round(_keypoints(obj), 2).tolist():
                col, row = int(np.floor(px)), int(np.floor(py))
                inside = 0 <= col < size and 0 <= row < size
                visible = 0 if not inside else 2 if owner[i, row, col] == k + 1 else 1
                points.append([px, py, visible])
            objects.append({
                "instance": k + 1,
                "class": obj["class"],
                "name": CLASS_NAMES[obj["class"]],
                "depth": round(float(obj["depth"]), 4),
                "box": [int(x0[i, k]), int(y0[i, k]), int(x1[i, k]), int(y1[i, k])],
                "keypoints": points,
            })
        out.append({
            "plane": {"depth": float(scene["plane"]["depth"]), "slope": [float(s) for s in scene["plane"]["slope"]]},
            "light": [float(value) for value in scene["light"]],
            "objects": objects,
        })
    return out
