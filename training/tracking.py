"""Where training metrics go: TensorBoard event files in the stage's tb/ always, and the same scalars to a
Weights & Biases run when `--wandb PROJECT` names one.

W&B's own settings come from the environment of the command (WANDB_MODE=offline writes the run locally and sends
nothing; WANDB_DIR, WANDB_ENTITY); they are read once in the command's process and handed to the process that logs
(a Ray Train worker, Tune's logging actor), so both log the same way. The API key is never read into a config:
it stays in WANDB_API_KEY or `wandb login`'s file.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from models.errors import ConfigError

_FROM_ENV = {"mode": "WANDB_MODE", "dir": "WANDB_DIR", "entity": "WANDB_ENTITY"}


@dataclass
class TrackingConfig:
    wandb: str = ""
    """Weights & Biases project to log the training metrics to as well (off when empty; WANDB_MODE=offline keeps the
    run on this machine)."""


def wandb_settings(project: str, name: str = "") -> dict | None:
    """`wandb.init` arguments for `--wandb PROJECT` (None when it is empty), checked here so that a missing package
    or login is one clear line before any work starts."""
    if not project:
        return None
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("--wandb: the wandb package is not installed (pip install wandb)") from None
    settings = {"project": project, **({"name": name} if name else {})}
    settings.update({key: os.environ[var] for key, var in _FROM_ENV.items() if os.environ.get(var)})
    if settings.get("mode") not in ("offline", "disabled") and not _has_api_key():
        raise ConfigError("--wandb: no W&B API key (run `wandb login` or set WANDB_API_KEY), or set WANDB_MODE=offline "
                          "to write the run locally")
    return settings


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class MetricWriter:
    """Scalars under namespaced keys (`sae/fvu`, `ppo/vf_loss`) to TensorBoard and, given `wandb_settings`, to a
    W&B run holding `config` (the stage's config record; no secrets)."""

    def __init__(self, tb_dir: Path, wandb: dict | None = None, config: Mapping | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(tb_dir))
        self.run = None
        if wandb is not None:
            import wandb as wandb_lib

            where = {} if "dir" in wandb else {"dir": str(Path(tb_dir).parent)}  # default: beside tb/
            self.run = wandb_lib.init(**wandb, **where, config=dict(config or {}), reinit="create_new")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.tb.add_scalar(key, value, step)
        self.tb.flush()
        if self.run is not None:
            self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.tb.close()
        if self.run is not None:
            self.run.finish()
