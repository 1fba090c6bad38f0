"""The benchmark workloads: defined here once, named, and used by every backend and report.

Each workload is a frozen dataclass that builds its inputs deterministically from its seed, so
that two runs (or two machines) time exactly the same features, boxes and output gradients.

Boxes are drawn like region proposals: a log-uniform size between ``box_min`` and ``box_max``
image pixels, a log-uniform aspect ratio between 0.5 and 2, a centre uniform over the image, and
the box clipped to the image (``height / spatial_scale`` by ``width / spatial_scale`` pixels).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy

PASSES = ("forward", "backward", "fwd+bwd")

# Shrinking applied by --quick: channels and boxes per image are divided, the feature map, the
# image and the box sizes are scaled, so that every workload runs anywhere in well under a second.
_QUICK_CHANNELS = 16
_QUICK_BOXES = 16
_QUICK_SPATIAL = 4


@dataclass(frozen=True)
class Inputs:
    """The arrays a workload runs on (all NumPy, host memory).

    Attributes:
        features (ndarray[N, C, H, W]): standard-normal features of the workload's dtype.
        rois (ndarray[K, 5]): ``(batch_index, x1, y1, x2, y2)`` rows in image coordinates,
            float32 (float64 for float64 features), image-major.
        grad_output (ndarray[K, C, PH, PW]): standard-normal gradient for the backward pass.
    """

    features: numpy.ndarray
    rois: numpy.ndarray
    grad_output: numpy.ndarray


@dataclass(frozen=True)
class Workload:
    """One benchmark case: an op, its arguments, and how to draw its inputs.

    Attributes:
        name (str): short unique name (``W1``, ``W7-sr0-large``, ``sweep-1024``, ``cpu-core``).
        description (str): one line for ``--help`` and the reports.
        op (str): ``"roi_align"`` or ``"roi_pool"``.
        batch, channels, height, width (int): the features' shape ``[N, C, H, W]``.
        boxes_per_image (int): RoIs drawn for each of the ``batch`` images.
        output_size (int): ``PH = PW``.
        spatial_scale (float): feature coordinates per image pixel.
        sampling_ratio (int): samples per bin per axis, ``<= 0`` adaptive (roi_align only).
        aligned (bool): roi_align's half-pixel shift.
        dtype (str): the features' dtype name.
        box_min, box_max (float): range of the proposals' size ``sqrt(w * h)`` in image pixels.
        device (str): ``"cuda"`` for a GPU workload, ``"cpu"`` for one sized for the CPU; at full
            size a workload is timed only on backends of its device unless they are named.
        group (str): family name for selection and plots (``"W7"``, ``"sweep"``), else the name.
        seed (int): seed of every random draw.
        quick (bool): True once shrunk by :meth:`shrunk`.
    """

    name: str
    description: str
    op: str = "roi_align"
    batch: int = 2
    channels: int = 256
    height: int = 200
    width: int = 304
    boxes_per_image: int = 512
    output_size: int = 7
    spatial_scale: float = 0.25
    sampling_ratio: int = 2
    aligned: bool = True
    dtype: str = "float32"
    box_min: float = 16.0
    box_max: float = 512.0
    device: str = "cuda"
    group: str = ""
    seed: int = 0
    quick: bool = False

    @property
    def num_rois(self) -> int:
        return self.batch * self.boxes_per_image

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.height, self.width)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.num_rois, self.channels, self.output_size, self.output_size)

    @property
    def image_size(self) -> tuple[float, float]:
        """``(height, width)`` of the image the boxes live in, in pixels."""
        return (self.height / self.spatial_scale, self.width / self.spatial_scale)

    @property
    def compute_dtype(self) -> numpy.dtype:
        """The boxes' dtype: float64 for float64 features, float32 otherwise."""
        return numpy.dtype(numpy.float64 if self.dtype == "float64" else numpy.float32)

    @property
    def family(self) -> str:
        return self.group or self.name

    def shrunk(self) -> Workload:
        """The ``--quick`` variant: fewer channels and boxes, a map and image a quarter the size."""
        if self.quick:
            return self
        s = _QUICK_SPATIAL
        return dataclasses.replace(
            self,
            channels=max(1, self.channels // _QUICK_CHANNELS),
            height=max(4, self.height // s),
            width=max(4, self.width // s),
            boxes_per_image=max(1, self.boxes_per_image // _QUICK_BOXES),
            box_min=self.box_min / s,
            box_max=self.box_max / s,
            quick=True,
        )

    def draw_rois(self) -> numpy.ndarray:
        """The workload's RoIs, ``[K, 5]`` in :attr:`compute_dtype`, image-major."""
        rng = numpy.random.default_rng([self.seed, 1])
        image_h, image_w = self.image_size
        k = self.num_rois
        size = numpy.exp(rng.uniform(math.log(self.box_min), math.log(self.box_max), k))
        aspect = numpy.exp(rng.uniform(math.log(0.5), math.log(2.0), k))  # height / width
        w, h = size / numpy.sqrt(aspect), size * numpy.sqrt(aspect)
        cx, cy = rng.uniform(0, image_w, k), rng.uniform(0, image_h, k)
        rois = numpy.empty((k, 5), dtype=numpy.float64)
        rois[:, 0] = numpy.repeat(numpy.arange(self.batch), self.boxes_per_image)
        rois[:, 1] = numpy.clip(cx - w / 2, 0, image_w)
        rois[:, 2] = numpy.clip(cy - h / 2, 0, image_h)
        rois[:, 3] = numpy.clip(cx + w / 2, 0, image_w)
        rois[:, 4] = numpy.clip(cy + h / 2, 0, image_h)
        if self.dtype == "float16":
            # Libraries that keep boxes in the features' dtype must see the very same boxes.
            rois = rois.astype(numpy.float16).astype(numpy.float64)
        return rois.astype(self.compute_dtype)

    def inputs(self) -> Inputs:
        """Draw the features, RoIs and output gradient (same seed, same arrays, every time)."""
        dtype = numpy.dtype(self.dtype)
        features = numpy.random.default_rng([self.seed, 0]).standard_normal(
            self.input_shape, dtype=numpy.float32
        )
        grad = numpy.random.default_rng([self.seed, 2]).standard_normal(
            self.output_shape, dtype=numpy.float32
        )
        return Inputs(features.astype(dtype, copy=False), self.draw_rois(),
                      grad.astype(dtype, copy=False))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- byte floor
def floor_bytes(workload: Workload, pass_: str) -> int:
    """The fewest bytes a pass must move: each input read once, each output written once.

    forward = features + boxes + output (+ the int64 argmax for roi_pool);
    backward = grad_output + boxes + grad_input (+ the argmax read, for roi_pool);
    fwd+bwd = forward + backward. Boxes count as ``[K, 5]`` of the compute dtype.
    """
    item = numpy.dtype(workload.dtype).itemsize
    features = math.prod(workload.input_shape) * item
    output = math.prod(workload.output_shape) * item
    boxes = workload.num_rois * 5 * workload.compute_dtype.itemsize
    argmax = math.prod(workload.output_shape) * 8 if workload.op == "roi_pool" else 0
    forward = features + boxes + output + argmax
    backward = output + boxes + features + argmax
    table = {"forward": forward, "backward": backward, "fwd+bwd": forward + backward}
    if pass_ not in table:
        raise ValueError(f"pass must be one of {', '.join(PASSES)}, got {pass_!r}")
    return table[pass_]


# ----------------------------------------------------------------------------- the catalogue
def _catalogue() -> tuple[Workload, ...]:
    w1 = Workload(
        "W1",
        "box head: [2, 256, 200, 304] f32 (800x1216 image, stride 4), 512 proposals/image, 7x7, "
        "sr 2, aligned",
        seed=1,
    )
    items = [
        w1,
        dataclasses.replace(
            w1, name="W2", description="mask head: W1 with 14x14 output, 128 boxes/image",
            output_size=14, boxes_per_image=128, seed=2,
        ),
        dataclasses.replace(
            w1, name="W3", description="adaptive: W1 with sampling_ratio 0", sampling_ratio=0,
        ),
        dataclasses.replace(
            w1, name="W4", description="latency: [1, 64, 50, 50] f32, 16 boxes, 7x7",
            batch=1, channels=64, height=50, width=50, boxes_per_image=16, box_min=16.0,
            box_max=200.0, seed=4,
        ),
        dataclasses.replace(w1, name="W5", description="half: W1 in float16", dtype="float16"),
        dataclasses.replace(
            w1, name="W6", description="roi_pool: W1's features and boxes through roi_pool",
            op="roi_pool",
        ),
    ]
    for ratio in (0, 2):
        for label, lo, hi in (("small", 16.0, 64.0), ("large", 256.0, 1024.0)):
            items.append(dataclasses.replace(
                w1, name=f"W7-sr{ratio}-{label}",
                description=f"large map: [1, 512, 256, 256] f32, 512 {label} boxes "
                            f"({lo:g}-{hi:g} px), 7x7, sr {ratio}",
                batch=1, channels=512, height=256, width=256, sampling_ratio=ratio,
                box_min=lo, box_max=hi, group="W7", seed=7,
            ))
    for count in (16, 64, 256, 1024, 4096):
        items.append(dataclasses.replace(
            w1, name=f"sweep-{count}",
            description=f"sweep: W1 with {count} boxes in all ({count // 2}/image)",
            boxes_per_image=count // 2, group="sweep",
        ))
    core = Workload(
        "cpu-core",
        "CPU: [2, 256, 64, 64] f32, 256 proposals (128/image, 4-64 px on the 64x64 map), 7x7, "
        "sr 2, aligned=False",
        channels=256, height=64, width=64, boxes_per_image=128, spatial_scale=1.0,
        aligned=False, box_min=4.0, box_max=64.0, device="cpu", group="cpu", seed=8,
    )
    aligned = dataclasses.replace(
        core, name="cpu-aligned", description="CPU: cpu-core with aligned=True", aligned=True,
    )
    many = dataclasses.replace(
        aligned, name="cpu-many",
        description="CPU: [2, 64, 64, 64] f32, 2048 proposals (4-64 px), 7x7, sr 2, aligned",
        channels=64, boxes_per_image=1024, seed=9,
    )
    large = dataclasses.replace(
        aligned, name="cpu-large",
        description="CPU: [1, 64, 200, 304] f32, 256 large proposals (128-800 px at stride 4), "
                    "7x7, adaptive, aligned",
        batch=1, channels=64, height=200, width=304, boxes_per_image=256, spatial_scale=0.25,
        sampling_ratio=0, box_min=128.0, box_max=800.0, seed=10,
    )
    one = dataclasses.replace(
        aligned, name="cpu-one",
        description="CPU per-call overhead: [1, 16, 14, 14] f32, one box (4-14 px), 7x7, sr 2",
        batch=1, channels=16, height=14, width=14, boxes_per_image=1, box_min=4.0, box_max=14.0,
        seed=11,
    )
    items += [
        core,
        dataclasses.replace(core, name="cpu-pool", op="roi_pool",
                            description="CPU: cpu-core's features and boxes through roi_pool, 7x7"),
        aligned,
        dataclasses.replace(aligned, name="cpu-adaptive", sampling_ratio=0,
                            description="CPU: cpu-aligned with sampling_ratio 0"),
        dataclasses.replace(aligned, name="cpu-f64", dtype="float64",
                            description="CPU: cpu-aligned in float64"),
        dataclasses.replace(aligned, name="cpu-mask", output_size=14,
                            description="CPU: cpu-aligned with 14x14 output"),
        many,
        dataclasses.replace(many, name="cpu-pool-many", op="roi_pool",
                            description="CPU: cpu-many's features and boxes through roi_pool"),
        large,
        dataclasses.replace(large, name="cpu-pool-large", op="roi_pool",
                            description="CPU: cpu-large's features and boxes through roi_pool"),
        one,
        dataclasses.replace(
            one, name="cpu-two",
            description="CPU per-call overhead: [1, 4, 8, 8] f32, two boxes (2-8 px), 2x2, sr 2",
            channels=4, height=8, width=8, boxes_per_image=2, output_size=2, box_min=2.0,
            box_max=8.0, seed=12,
        ),
    ]
    return tuple(items)


WORKLOADS: dict[str, Workload] = {w.name: w for w in _catalogue()}


def select(names: str | None) -> list[Workload]:
    """Workloads by comma-separated names or families (``W7``, ``sweep``, ``cpu``); None gives
    all.

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    if not names:
        return list(WORKLOADS.values())
    chosen: list[Workload] = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        matches = [w for w in WORKLOADS.values() if name in (w.name, w.group)]
        if not matches:
            known = ", ".join(list(WORKLOADS) + ["W7", "sweep", "cpu"])
            raise ValueError(f"workloads must be among {known}; got {name!r}")
        chosen += [w for w in matches if w not in chosen]
    return chosen
