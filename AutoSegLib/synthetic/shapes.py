"""Smooth solid shapes in physical space: the building blocks of the phantom anatomy.

A :class:`Blob` is an ellipsoid (centre, orientation, semi-axes in mm) whose surface is
pushed in and out by a few low-frequency cosine "wobbles" of the direction from its centre,
so organs look like organs rather than textbook ellipsoids while staying analytic:

* ``inside(q)`` is a handful of vectorised array operations on body-frame points (mm);
* ``support(v)`` bounds the blob along a unit direction in closed form, which lets the
  renderer evaluate each organ only on the voxel block it can occupy and lets the grid
  sampler choose a field of view that is guaranteed to contain every labelled organ.

Everything here is pure: parameters in, boolean masks or numbers out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def rotation(axis, angle_rad: float) -> np.ndarray:
    """Rotation matrix about ``axis`` (Rodrigues); orthonormal to float64 rounding."""
    axis = np.asarray(axis, float)
    x, y, z = axis / np.linalg.norm(axis)
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1.0 - np.cos(angle_rad)) * (k @ k)


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A rotation about a uniformly random axis by an angle uniform in [-max_deg, max_deg]."""
    return rotation(rng.normal(size=3), np.radians(rng.uniform(-max_deg, max_deg)))


@dataclass(frozen=True)
class Blob:
    """A wobbly ellipsoid.

    Attributes:
        centre: (x, y, z) in mm, body frame.
        axes: 3x3 rotation; its columns are the blob's own axes in the body frame.
        semi: semi-axis lengths in mm along those columns.
        freqs: (k, 3) wobble frequencies over the unit direction from the centre.
        amps: (k,) wobble amplitudes as a fraction of the radius.
        phases: (k,) wobble phases.
    """

    centre: np.ndarray
    axes: np.ndarray
    semi: np.ndarray
    freqs: np.ndarray
    amps: np.ndarray
    phases: np.ndarray

    @classmethod
    def sample(cls, rng: np.random.Generator, centre, semi, tilt_deg: float = 0.0, base=None,
               wobble: float = 0.08, terms: int = 3) -> "Blob":
        """Draw a blob around a nominal centre/size; ``base`` is its nominal orientation."""
        axes = random_rotation(rng, tilt_deg) @ (np.eye(3) if base is None else np.asarray(base, float))
        amps = rng.dirichlet(np.ones(terms)) * wobble
        # |freq| about 2-3 cycles over the sphere of directions: lobes, not ripples.
        freqs = rng.normal(size=(terms, 3)) * 1.6
        return cls(np.asarray(centre, float), axes, np.asarray(semi, float), freqs, amps,
                   rng.uniform(0, 2 * np.pi, terms))

    @property
    def reach(self) -> float:
        """Largest outward push of the wobble, as a fraction of the radius."""
        return float(np.sum(np.abs(self.amps)))

    def local(self, q: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        """Body-frame points -> the blob's unit-sphere coordinates (one array per axis)."""
        d = [q[c] - np.float32(self.centre[c]) for c in range(3)]
        return tuple(sum(d[c] * np.float32(self.axes[c, m] / self.semi[m]) for c in range(3))
                     for m in range(3))

    def inside(self, q: tuple[np.ndarray, ...]) -> np.ndarray:
        u = self.local(q)
        r2 = u[0] * u[0] + u[1] * u[1] + u[2] * u[2]
        if not self.amps.any():
            return r2 < 1.0
        inv = 1.0 / (np.sqrt(r2) + np.float32(1e-6))
        wobble = sum(np.float32(a) * np.cos(sum(np.float32(f[m]) * u[m] for m in range(3)) * inv + np.float32(p))
                     for a, f, p in zip(self.amps, self.freqs, self.phases))
        limit = 1.0 + wobble
        return r2 < limit * limit

    def support(self, v: np.ndarray) -> tuple[float, float]:
        """(centre . v, half-width) of the blob along unit body-frame direction ``v``."""
        half = np.linalg.norm(self.semi * (self.axes.T @ v)) * (1.0 + self.reach)
        return float(self.centre @ v), float(half)

    def point(self, u) -> np.ndarray:
        """Body-frame position of unit-sphere coordinates ``u`` (wobble ignored)."""
        return self.centre + self.axes @ (self.semi * np.asarray(u, float))

    def scaled(self, factor, shift=(0.0, 0.0, 0.0)) -> "Blob":
        """The same blob with semi-axes times ``factor`` and centre shifted in its own frame."""
        factor = np.broadcast_to(np.asarray(factor, float), (3,))
        return Blob(self.point(shift), self.axes, self.semi * factor, self.freqs, self.amps, self.phases)


_ENDLESS = 1e5  # mm; a tube runs through any field of view


@dataclass(frozen=True)
class Tube:
    """An elliptic cylinder along the body's z axis (vessel, spinal column, long muscle).

    Testing only x and y makes it several times cheaper than a blob on the full grid,
    which matters because a tube crosses every slice.
    """

    cx: float
    cy: float
    rx: float
    ry: float

    def inside(self, q: tuple[np.ndarray, ...]) -> np.ndarray:
        u = (q[0] - np.float32(self.cx)) * np.float32(1.0 / self.rx)
        v = (q[1] - np.float32(self.cy)) * np.float32(1.0 / self.ry)
        return u * u + v * v < 1.0

    def support(self, v: np.ndarray) -> tuple[float, float]:
        half = np.hypot(self.rx * v[0], self.ry * v[1]) + abs(v[2]) * _ENDLESS
        return float(self.cx * v[0] + self.cy * v[1]), float(half)

    def section(self, z: float) -> Blob:
        """A thin disc of the tube at height ``z``: a finite stand-in for bounding boxes."""
        return Blob(np.array([self.cx, self.cy, z]), np.eye(3), np.array([self.rx, self.ry, 0.5]),
                    np.zeros((0, 3)), np.zeros(0), np.zeros(0))

    def scaled(self, factor: float) -> "Tube":
        return Tube(self.cx, self.cy, self.rx * factor, self.ry * factor)


@dataclass(frozen=True)
class Capsule:
    """A straight vessel segment: points within ``radius`` mm of the segment ``start``-``end``.

    Vessels that branch sideways (renal arteries and veins, the portal vein) are chains of
    capsules; their rounded ends join without gaps.
    """

    start: np.ndarray
    end: np.ndarray
    radius: float

    def inside(self, q: tuple[np.ndarray, ...]) -> np.ndarray:
        axis = np.asarray(self.end, float) - np.asarray(self.start, float)
        length2 = float(axis @ axis)
        d = [q[c] - np.float32(self.start[c]) for c in range(3)]
        t = sum(d[c] * np.float32(axis[c] / length2) for c in range(3))
        t = np.clip(t, np.float32(0.0), np.float32(1.0))
        r2 = sum((d[c] - t * np.float32(axis[c])) ** 2 for c in range(3))
        return r2 < np.float32(self.radius * self.radius)

    def support(self, v: np.ndarray) -> tuple[float, float]:
        a, b = float(np.asarray(self.start) @ v), float(np.asarray(self.end) @ v)
        return (a + b) / 2, abs(b - a) / 2 + self.radius


def chain(points, radius: float) -> tuple[Capsule, ...]:
    """Capsules joining consecutive ``points`` (a polyline vessel of one radius)."""
    points = [np.asarray(p, float) for p in points]
    return tuple(Capsule(a, b, radius) for a, b in zip(points[:-1], points[1:]))
