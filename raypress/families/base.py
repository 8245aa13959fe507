"""The Family interface: everything that differs between compression families lives behind it.

A family (sparsity, quant, depth, width) is one module in this package with one `Family`
subclass. It declares what it accepts (`methods`, the family-specific config `keys`, the one-shot
`schedules` it offers) and implements the five steps of a search that depend on it:

    space(cfg, adapter)                  the SearchSpace from the model's shapes alone (no weights,
                                         no database): what `raypress plan` and the up-front checks use
    prepare(cfg, model, adapter, calib)  -> Prepared: the space, the level database, the applier
                                         that evaluators use, and inputs for schedules
    initial(prep)                        the most uniform feasible config (the search's start and
                                         the "uniform" baseline; `start` when the family has its own)
    schedule(name, prep, ...)            a one-shot config (OWL, Hessian, DP, ShortGPT, ...)
    export(...)                          the compressed model as a Hugging Face folder

Nothing outside raypress/families/ branches on a family's name: callers ask `get_family(name)`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RayPressError

#: config keys every family reads; a family adds its own in `keys`
COMMON_KEYS = ("model", "family", "method", "target", "data", "searcher", "evaluator", "tracking", "ray_address",
               "output", "database.cache_dir")
#: family-specific keys some family reads; a config that sets one its family does not read is refused
SPECIFIC_KEYS = ("target_bytes", "levels", "units", "database.storage_dtype", "database.group_size", "database.symmetric", "database.granularity",
                 "database.parallel", "database.device", "database.placement", "database.stream")


@dataclass
class Prepared:
    space: object  # SearchSpace
    applier: object | None  # Applier (driver-side prototype; pickled to evaluators); None when serve=False
    db: object | None = None  # the family's database (LevelDatabase, width dict), if it has one
    context: dict = field(default_factory=dict)  # extra inputs for schedules (db, method, stats, ...)
    describe: dict = field(default_factory=dict)  # family facts for MLflow params
    hints: dict = field(default_factory=dict)  # searcher settings the family suggests (e.g. three_way)


class Family(ABC):
    name: str = ""
    #: accepted values of `method` (the first is the default)
    methods: tuple[str, ...] = ()
    #: family-specific config keys it reads (from SPECIFIC_KEYS)
    keys: tuple[str, ...] = ()
    #: one-shot schedules it offers ("uniform" is always among them)
    schedules: tuple[str, ...] = ("uniform",)
    #: the schedules among them that start with the dense-model statistics pass (calibrate.StatsCache;
    #: `raypress plan` estimates the pass for a family that has any)
    calibrated_schedules: tuple[str, ...] = ()
    #: what a level value means, for reports
    value_kind: str = ""
    #: True when prepare() builds (or finds cached) a database: `raypress build-db` applies
    has_database: bool = False

    # ------------------------------------------------------------------ config
    def check_config(self, cfg, explicit: set[str] | None = None) -> None:
        """One-line errors for a config this family cannot run. explicit: dotted keys the user set
        (YAML or --set); setting a family-specific key this family does not read is an error."""
        if cfg.method not in self.methods:
            raise RayPressError(f"unknown method '{cfg.method}' for family {self.name}; use one of "
                                f"{', '.join(self.methods)}")
        for key in sorted(explicit or ()):
            if key in SPECIFIC_KEYS and key not in self.keys:
                takes = ", ".join(self.keys) or "none"
                raise RayPressError(f"config key '{key}' is not used by family {self.name} (its own keys: {takes}); "
                                    "remove it")

    def target_note(self, cfg) -> str:
        """How cfg.target came from what the user wrote, when it was not written as is ("" if it was)."""
        return ""

    # ------------------------------------------------------------------ the five steps
    @abstractmethod
    def space(self, cfg, adapter):
        """The SearchSpace of cfg.target from the model's shapes (a meta-device model works)."""

    @abstractmethod
    def prepare(self, cfg, model, adapter, calib, *, serve: bool = True) -> Prepared:
        """Space, database and applier of a search (serve=False: no applier, e.g. for export)."""

    def start(self, prep: Prepared) -> dict | None:
        """The family's own most uniform feasible config when `space.uniform()` is not it (width:
        attention and MLP ladders differ), else None."""
        return None

    def initial(self, prep: Prepared) -> dict:
        """The most uniform exactly-feasible config (the "uniform" baseline and the default start)."""
        return self.start(prep) or prep.space.uniform()

    def schedule(self, name: str, cfg, prep: Prepared, model, adapter, calib) -> dict:
        """A one-shot config of schedule `name` (one of `schedules`)."""
        if name == "uniform":
            return self.initial(prep)
        raise RayPressError(f"the {name} schedule is not offered by family {self.name}; it offers "
                            f"{', '.join(self.schedules)}")

    @abstractmethod
    def export(self, model, adapter, best: dict, prep: Prepared, out_dir, *, tokenizer=None, source: str = "",
               overwrite: bool = False, extra_info: dict | None = None) -> Path:
        """Write `best` (a config of prep.space) as a Hugging Face folder."""

    #: export formats it writes ("hf": a plain Hugging Face folder, every family)
    formats: tuple[str, ...] = ("hf",)

    def export_as(self, fmt: str, model, adapter, best: dict, prep: Prepared, out_dir, *, tokenizer=None,
                  source: str = "", overwrite: bool = False, extra_info: dict | None = None) -> tuple[Path, dict]:
        """Write `best` in a serving format other than "hf" (one of `formats`): (folder, sizes)."""
        raise RayPressError(f"family {self.name} exports {', '.join(self.formats)}, not {fmt}")

    def load_export(self, path):
        """The model of an export folder this family wrote."""
        from ..export import load_exported

        return load_exported(path)[0]

    def database_bytes(self, cfg, adapter, space) -> int | None:
        """Bytes its database will take, from shapes alone (0: no database; None: not estimated)."""
        return None if self.has_database else 0

    def driver_model(self, cfg, model=None) -> dict:
        """load_model keyword arguments for the driver's copy of the model (the weight families stream
        random:<arch> models block by block in the storage dtype; the others load it whole). model:
        cfg.model on the meta device, when the caller has it (saves building it again)."""
        return {}

    def build_database(self, cfg, model, adapter, calib):
        """Build (or find cached) the database only; families without one say so."""
        raise RayPressError(f"family '{self.name}' needs no database; run `raypress search` directly")
