"""Where the interpretation stage reads and writes inside a run directory.

A RUN is a folder holding a decoder (`RUN/decoder/decoder.json`, or the decoder files directly) and
an SAE (`RUN/sae/cfg.json`, or the SAE recorded in decoder.json). Everything this stage makes goes
to `RUN/interpret/`, one file per step, so later steps (and the dashboard) read what earlier ones wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.errors import ConfigError


@dataclass(frozen=True)
class InterpretRun:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    # -- inputs -------------------------------------------------------------------------
    @property
    def decoder_dir(self) -> Path:
        for d in (self.root / "decoder", self.root / "distill" / "decoder", self.root):
            if (d / "decoder.json").is_file():
                return d
        raise ConfigError(
            f"RUN {self.root}: no decoder found (expected {self.root / 'decoder' / 'decoder.json'}); "
            "point RUN at a `faithlens decoder train` or `ppo export` output folder"
        )

    def sae_dir(self, recorded: str | None = None) -> Path:
        """RUN/sae if present, else the SAE recorded in decoder.json (`recorded`)."""
        from sae.metrics import resolve_sae_dir

        if (self.root / "sae").is_dir():
            return resolve_sae_dir(self.root / "sae")
        if not recorded:
            raise ConfigError(f"RUN {self.root}: no sae/ folder and decoder.json records no SAE path")
        return resolve_sae_dir(Path(recorded))

    # -- outputs ------------------------------------------------------------------------
    @property
    def dir(self) -> Path:
        return self.root / "interpret"

    @property
    def importance(self) -> Path:
        return self.dir / "importance.json"

    @property
    def evidence(self) -> Path:
        return self.dir / "evidence.json"

    @property
    def labels(self) -> Path:
        return self.dir / "labels.json"

    @property
    def label_cache(self) -> Path:
        return self.dir / "label_cache.json"

    @property
    def scores(self) -> Path:
        return self.dir / "scores.json"

    @property
    def reviews(self) -> Path:
        return self.dir / "reviews.json"

    @property
    def clusters(self) -> Path:
        return self.dir / "clusters.json"

    @property
    def explainer(self) -> Path:
        return self.dir / "explainer"

    def require(self, path: Path, command: str) -> Path:
        if not path.is_file():
            raise ConfigError(f"RUN {self.root}: {path.name} not found; run `faithlens {command} {self.root}` first")
        return path
