"""What a benchmark run produces: one :class:`Row` per measurement, gathered in a :class:`Record`.

The record is what the JSON file holds (``Record.as_dict`` / ``Record.from_dict`` round-trip it)
and what the table, markdown and plot writers read.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from roi_cupy._bench.timing import Stats

SCHEMA = "roi_cupy-bench/1"

# Row statuses: OK passed the check; INVALID failed it (its timings are shown but not to be
# trusted); ERROR raised (no timings); UNCHECKED was timed without a reference to check against.
OK, INVALID, ERROR, UNCHECKED = "ok", "INVALID", "ERROR", "unchecked"


@dataclass
class Row:
    """One (workload, pass, backend) measurement.

    Attributes:
        workload, pass_, backend (str): what was measured (``pass_`` is ``"pass"`` in JSON).
        device (str): ``"cuda"`` or ``"cpu"``.
        validate (bool or None): roi_cupy's ``validate`` (None for torchvision).
        status (str): ``ok``, ``INVALID``, ``ERROR`` or ``unchecked``.
        detail (str): the check's account or the error.
        max_error, tolerance (float or None): the check's scaled error and its bound.
        stats (Stats or None): timings (None after an error).
        floor_bytes (int): the fewest bytes the pass must move.
        gbps (float or None): ``floor_bytes`` over the median time, in GB/s (1e9 bytes).
        floor_fraction (float or None): the copy-bandwidth time for ``floor_bytes`` over the
            median time (1.0 would run at the measured copy bandwidth).
        speedup (float or None): torchvision's median on the same device in the same run divided
            by this row's median (> 1: faster than torchvision); check both rows' status.
        extra_mib (float or None): for roi_cupy on the CPU, the most memory one call held beyond
            its inputs and the arrays it returned, in MiB (tracemalloc's peak, which NumPy
            reports its allocations to); None elsewhere.
    """

    workload: str
    pass_: str
    backend: str
    device: str
    validate: bool | None
    status: str
    detail: str = ""
    max_error: float | None = None
    tolerance: float | None = None
    stats: Stats | None = None
    floor_bytes: int = 0
    gbps: float | None = None
    floor_fraction: float | None = None
    speedup: float | None = None
    extra_mib: float | None = None

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["pass"] = d.pop("pass_")
        d["stats"] = self.stats.as_dict() if self.stats else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Row:
        d = dict(d)
        d["pass_"] = d.pop("pass")
        d["stats"] = Stats.from_dict(d["stats"]) if d.get("stats") else None
        return cls(**d)


@dataclass
class Record:
    """A whole run.

    Attributes:
        variant (str): ``"quick"`` or ``"full"``.
        date (str): ISO date of the run; ``timestamp`` the ISO time it started (UTC).
        command (list of str): the arguments it was run with.
        environment (dict): host, CPU, GPU, driver, CUDA and library versions.
        bandwidth (dict): per device (``cpu``, ``cuda``), the measured copy bandwidth.
        workloads (dict): per workload name, its definition as run (after ``--quick``).
        rows (list of Row): every measurement, in run order.
        skipped (list of dict): ``{"backend", "reason", "workloads"}`` for what did not run.
        plot (dict): ``{"path": ...}`` or ``{"skipped": reason}``.
        repeat, warmup (int): calls timed and calls run untimed before them.
    """

    variant: str
    date: str
    timestamp: str
    command: list[str]
    environment: dict
    bandwidth: dict
    workloads: dict
    repeat: int
    warmup: int
    rows: list[Row] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    plot: dict = field(default_factory=dict)
    schema: str = SCHEMA

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status in (INVALID, ERROR)]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["rows"] = [r.as_dict() for r in self.rows]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Record:
        if d.get("schema") != SCHEMA:
            raise ValueError(f"record schema must be {SCHEMA!r}, got {d.get('schema')!r}")
        d = dict(d)
        d["rows"] = [Row.from_dict(r) for r in d["rows"]]
        return cls(**d)
