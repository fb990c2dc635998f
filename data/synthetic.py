"""Synthetic coloured shapes: the embedded default dataset of every paper script (no files needed).

Item i is drawn from its own `np.random.default_rng([seed, i])`, so it is the same in every process, worker and epoch.
An item is a low-contrast textured background (a coloured plane: soft linear gradient + gentle stripes) with 1-3
saturated shapes on it. The class label is the type of the largest shape, which is also the nearest one, so it is
never occluded; the 0-2 smaller shapes have random types. Every shape type has its own hue band (circle red, ...),
which together with the silhouette makes the classes easy to tell apart; the set is meant to let a tiny diffusion
model improve within minutes on a CPU. `class_hues=False` draws the same scenes with every shape coloured at random:
the demos' judge (eval/shape_classifier.py) trains on that, so it has to read the silhouettes.

Returns (image, label) with image a float (3, H, W) tensor in [-1, 1], or with `dense=True` a dict
    image   (3, H, W) float32 in [-1, 1]
    label   int, the class (type of the largest shape)
    semseg  (H, W) int64, 0 background, 1..num_classes the shape type (no 255: every pixel is labelled)
    depth   (H, W) float32 metres along the optical axis: a sloped background plane at ~6-8 m, flat shapes as
            fronto-parallel planes at ~2-5.5 m, circles as spheres (the centre nearer than the rim)
    normals (3, H, W) float32 unit vectors, camera frame x right, y down, z forward (OpenCV), facing the camera
            (n_z < 0): the plane normal for the background and flat shapes, sphere normals on circles
    edge    (H, W) float32 {0, 1}, 2 px wide, where the shape instance (hence also where semseg) changes
    sal     (H, W) float32 {0, 1}, foreground = semseg > 0
The image is anti-aliased (coverage from a signed distance); the labels are the hard masks at pixel centres.
Spheres use weak perspective (a sphere of image radius r at depth Z has radius r * Z / FOCAL metres).
Horizontal flips are NOT done here: the training loops flip batches on the device, so a resumed run is exact.
"""
import colorsys
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPE_TYPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "hexagon")
SEMSEG_CLASSES = ("background",) + SHAPE_TYPES[:4]  # the default num_classes = 4
NUM_SEG_CLASSES = len(SEMSEG_CLASSES)  # num_classes + 1
FOCAL = 2.0  # focal length in units of the image half-width (a ~53 degree field of view)
LIGHT = np.array([-0.4, -0.5, -0.75]) / np.linalg.norm([-0.4, -0.5, -0.75])  # towards the light: up-left-front


#################################################################################
#                         Signed distances of the shapes                        #
#################################################################################

# Regular polygons: (number of sides, angle of the first outward edge normal, apothem / size). y points down, so
# the triangle's bottom edge has the normal at +90 degrees and its apex points up.
POLYGONS = {
    "square": (4, 0.0, 0.82),
    "triangle": (3, np.pi / 2, 0.6),
    "diamond": (4, np.pi / 4, 0.78),
    "hexagon": (6, 0.0, 0.86),
}


def box_sdf(x, y, half_w, half_h):
    """Exact signed distance to an axis-aligned box centred at the origin (negative inside)."""
    qx, qy = np.abs(x) - half_w, np.abs(y) - half_h
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def polygon_sdf(x, y, sides, phase, apothem):
    """Signed distance to a regular convex polygon: max over edge half-planes (exact inside, ~exact near edges)."""
    angles = phase + 2 * np.pi * np.arange(sides) / sides
    dist = x * np.cos(angles[0]) + y * np.sin(angles[0])
    for a in angles[1:]:
        dist = np.maximum(dist, x * np.cos(a) + y * np.sin(a))
    return dist - apothem


def shape_sdf(kind, x, y, size):
    """Signed distance of shape type `kind` with size (~radius) `size`, centred at the origin, axis-aligned."""
    if kind == "circle":
        return np.hypot(x, y) - size
    if kind == "ring":
        return np.abs(np.hypot(x, y) - 0.7 * size) - 0.3 * size
    if kind == "cross":
        return np.minimum(box_sdf(x, y, size, 0.34 * size), box_sdf(x, y, 0.34 * size, size))
    sides, phase, apothem = POLYGONS[kind]
    return polygon_sdf(x, y, sides, phase, apothem * size)


#################################################################################
#                                Scene sampling                                 #
#################################################################################

@dataclass
class Shape:
    kind: int  # index into SHAPE_TYPES, also the class; semseg id = kind + 1
    size: float  # ~radius in units of the image half-width
    centre: np.ndarray  # (x, y) in [-1, 1]
    angle: float  # rotation in radians
    rgb: np.ndarray  # (3,) in [0, 1]
    depth: float  # metres: the plane's depth, or a sphere's rim (centre-plane) depth


@dataclass
class Scene:
    label: int
    shapes: list  # far to near; the last one is the labelled shape
    background_rgb: np.ndarray
    gradient: tuple  # (direction, amplitude)
    stripes: tuple  # (direction, cycles per image width, phase, amplitude)
    plane_normal: np.ndarray  # unit, camera frame, n_z < 0
    plane_depth: float  # depth of the background plane at the image centre


def sample_scene(rng, num_classes, class_hues=True):
    """Draw the random parameters of one item from rng (one vectorised draw: generation must stay < 1 ms);
    class_hues=False draws every shape's hue uniformly, so only the silhouette tells the class (same geometry)."""
    draws = iter(rng.random(48).tolist())  # >= the 40 needed by 3 shapes + background, consumed in a fixed order
    uniform = lambda low, high: low + (high - low) * next(draws)
    label = int(next(draws) * num_classes)
    num_extra = int(next(draws) * 3)
    kinds = [int(next(draws) * num_classes) for _ in range(num_extra)] + [label]
    shapes, depth = [], uniform(4.5, 5.5)  # far to near: the labelled (largest) shape is drawn last, in front
    for i, kind in enumerate(kinds):
        main = i == num_extra
        size = uniform(0.36, 0.52) if main else uniform(0.14, 0.24)
        span = 0.3 if main else 0.75
        centre = np.array([uniform(-span, span), uniform(-span, span)])
        angle = uniform(-np.pi / 12, np.pi / 12) if SHAPE_TYPES[kind] not in ("circle", "ring") else 0.0
        # One hue band per type keeps the classes apart; saturated and bright so they pop from the background.
        # Without class hues the same draw spreads over the whole circle: the scene's geometry is unchanged.
        jitter = uniform(-0.2, 0.2)
        hue = (kind + jitter) / num_classes % 1.0 if class_hues else (jitter + 0.2) / 0.4
        rgb = np.array(colorsys.hsv_to_rgb(hue, uniform(0.75, 1.0), uniform(0.8, 1.0)))
        shapes.append(Shape(kind, size, centre, angle, rgb, depth))
        # The next (nearer) shape starts in front of this one's front surface, so no two shapes interpenetrate
        # and drawing far-to-near is exact.
        front = depth - size * depth / FOCAL if SHAPE_TYPES[kind] == "circle" else depth
        depth = front - uniform(0.2, 0.6)
    background_rgb = np.array(colorsys.hsv_to_rgb(uniform(0, 1), uniform(0.05, 0.25), uniform(0.35, 0.6)))
    gradient = (uniform(0, 2 * np.pi), uniform(0.03, 0.08))
    stripes = (uniform(0, np.pi), uniform(1.5, 4.0), uniform(0, 2 * np.pi), uniform(0.015, 0.04))
    plane_normal = np.array([uniform(-0.12, 0.12), uniform(-0.12, 0.12), -1.0])  # tilted a few degrees
    plane_normal /= np.linalg.norm(plane_normal)
    return Scene(label, shapes, background_rgb, gradient, stripes, plane_normal, uniform(6.5, 7.2))


#################################################################################
#                                   Rendering                                   #
#################################################################################

def pixel_grid(image_size):
    """Pixel-centre coordinates (x, y), each (H, W) in (-1, 1); y points down."""
    c = (np.arange(image_size) + 0.5) / image_size * 2 - 1
    return np.meshgrid(c, c, indexing="xy")


def shape_window(shape, coords):
    """Row/column slice covering the shape (its circumradius is < 1.25 * size) plus a pixel of anti-aliasing."""
    reach = 1.25 * shape.size + 2 * (coords[1] - coords[0])
    cols = slice(*np.searchsorted(coords, [shape.centre[0] - reach, shape.centre[0] + reach]))
    rows = slice(*np.searchsorted(coords, [shape.centre[1] - reach, shape.centre[1] + reach]))
    return rows, cols


def render_scene(scene, grid, dense=False):
    """Rasterise a scene: the anti-aliased image (3, H, W) in [0, 1], plus the hard label maps when dense."""
    x, y = grid
    coords = x[0]
    pixel = coords[1] - coords[0]
    # Background: soft gradient + gentle stripes on a greyish colour, i.e. low contrast.
    g_dir, g_amp = scene.gradient
    s_dir, s_freq, s_phase, s_amp = scene.stripes
    shade = g_amp * (np.cos(g_dir) * x + np.sin(g_dir) * y)
    shade += s_amp * np.sin(np.pi * s_freq * (np.cos(s_dir) * x + np.sin(s_dir) * y) + s_phase)
    image = scene.background_rgb[:, None, None] + shade[None]
    if dense:
        # Background plane n.P = c through (0, 0, plane_depth): along the ray P = Z (x/f, y/f, 1), Z = c / (n.d).
        n = scene.plane_normal
        depth = n[2] * scene.plane_depth / (n[0] * x / FOCAL + n[1] * y / FOCAL + n[2])
        normals = np.repeat(n[:, None, None], x.size, axis=1).reshape((3,) + x.shape)
        semseg = np.zeros(x.shape, np.int64)
        instance = np.zeros(x.shape, np.int64)

    for i, s in enumerate(scene.shapes):  # far to near (painter's algorithm)
        win = shape_window(s, coords)
        cos, sin = np.cos(s.angle), np.sin(s.angle)
        dx, dy = x[win] - s.centre[0], y[win] - s.centre[1]
        sdf = shape_sdf(SHAPE_TYPES[s.kind], cos * dx + sin * dy, -sin * dx + cos * dy, s.size)
        coverage = np.clip(0.5 - sdf / pixel, 0.0, 1.0)[None]  # anti-aliasing: fraction of the pixel inside
        sphere = SHAPE_TYPES[s.kind] == "circle"
        if sphere:
            # Unit sphere normal (a, b, -sqrt(1 - a^2 - b^2)) with (a, b) the offset in disc radii.
            a, b = dx / s.size, dy / s.size
            nz = -np.sqrt(np.clip(1 - a * a - b * b, 0.0, 1.0))
            lambert = np.clip(a * LIGHT[0] + b * LIGHT[1] + nz * LIGHT[2], 0.0, 1.0)[None]
            colour = s.rgb[:, None, None] * (0.35 + 0.65 * lambert) + 0.25 * lambert ** 12  # + a small highlight
        else:
            colour = (0.92 * s.rgb)[:, None, None]
        image[(slice(None),) + win] += coverage * (colour - image[(slice(None),) + win])
        if dense:
            mask = sdf < 0  # == coverage > 0.5
            semseg[win][mask] = s.kind + 1
            instance[win][mask] = i + 1
            if sphere:
                radius_m = s.size * s.depth / FOCAL  # weak perspective
                depth[win][mask] = (s.depth + radius_m * nz)[mask]
                normals[(slice(None),) + win][:, mask] = np.stack([a, b, nz])[:, mask]
            else:
                depth[win][mask] = s.depth
                normals[(slice(None),) + win][:, mask] = np.array([0.0, 0.0, -1.0])[:, None]  # fronto-parallel

    out = {"image": np.clip(image, 0.0, 1.0), "label": scene.label}
    if dense:
        # Boundary on both sides of every instance change (so also of every semseg change): 2 px wide.
        edge = np.zeros(x.shape, bool)
        dh, dv = instance[:, 1:] != instance[:, :-1], instance[1:] != instance[:-1]
        edge[:, 1:] |= dh
        edge[:, :-1] |= dh
        edge[1:] |= dv
        edge[:-1] |= dv
        out.update(semseg=semseg, instance=instance, depth=depth.astype(np.float32),
                   normals=normals.astype(np.float32), edge=edge.astype(np.float32),
                   sal=(semseg > 0).astype(np.float32))
    return out


#################################################################################
#                                    Dataset                                    #
#################################################################################

class SyntheticShapes(Dataset):
    """Deterministic coloured-shape images (num_classes shape types); dense=True adds the 5 dense task labels;
    class_hues=False colours every shape at random (the shape-only judge of eval/shape_classifier.py)."""

    def __init__(self, num_samples=10000, image_size=32, seed=0, num_classes=4, dense=False, class_hues=True):
        if not 1 <= num_classes <= len(SHAPE_TYPES):
            raise ValueError(f"num_classes={num_classes} is not supported; choose 1..{len(SHAPE_TYPES)} "
                             f"(shape types {', '.join(SHAPE_TYPES)})")
        if image_size < 8:
            raise ValueError(f"image_size={image_size} is too small to draw shapes; use 8 or more (e.g. 32)")
        self.num_samples, self.image_size, self.seed = num_samples, image_size, seed
        self.num_classes, self.dense, self.class_hues = num_classes, dense, class_hues
        self.semseg_classes = ("background",) + SHAPE_TYPES[:num_classes]
        self.num_seg_classes = num_classes + 1
        self.grid = pixel_grid(image_size)

    def __len__(self):
        return self.num_samples

    def render(self, idx, dense=None):
        """Numpy arrays of item idx (image in [0, 1]; when dense also the label maps and the instance ids)."""
        if not -self.num_samples <= idx < self.num_samples:
            raise IndexError(f"index {idx} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, idx % self.num_samples])
        scene = sample_scene(rng, self.num_classes, self.class_hues)
        return render_scene(scene, self.grid, self.dense if dense is None else dense)

    def __getitem__(self, idx):
        out = self.render(idx)
        image = torch.from_numpy(out["image"] * 2 - 1).float()
        if not self.dense:
            return image, out["label"]
        return {"image": image, "label": out["label"], "semseg": torch.from_numpy(out["semseg"]),
                "depth": torch.from_numpy(out["depth"]), "normals": torch.from_numpy(out["normals"]),
                "edge": torch.from_numpy(out["edge"]), "sal": torch.from_numpy(out["sal"])}
