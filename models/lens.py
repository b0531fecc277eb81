"""The tuned lens (Belrose et al. 2023): an affine translator on the raw residual stream.

logits = head(h + A·h + b), A and b zero-initialised so training starts at the logit lens; the
frozen final norm and unembedding do the rest. Saved as lens.json + lens.safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor, nn

from models.errors import ConfigError
from models.head import FrozenHead
from models.io import atomic_path, load_safetensors, read_json


class TunedLens(nn.Module):
    def __init__(self, d_model: int, head: FrozenHead):
        super().__init__()
        self.translator = nn.Linear(d_model, d_model)
        nn.init.zeros_(self.translator.weight)
        nn.init.zeros_(self.translator.bias)
        self.head = head

    def forward(self, h_BTD: Tensor, first: int = 0) -> Tensor:
        """Logits of positions first..T−1 (the decoders' convention, so that a student is called one way)."""
        h = h_BTD[:, first:].float()
        return self.head(h + self.translator(h))

    def save(self, directory: Path, extra: dict | None = None) -> None:
        meta = {"kind": "tuned_lens", "d_model": self.translator.in_features, **(extra or {})}
        with atomic_path(Path(directory)) as tmp:
            tmp.mkdir()
            save_file({k: v.contiguous() for k, v in self.translator.state_dict().items()}, str(tmp / "lens.safetensors"))
            (tmp / "lens.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: Path, head: FrozenHead) -> TunedLens:
        directory = Path(directory)
        if (directory / "lens").is_dir():
            directory = directory / "lens"
        if not (directory / "lens.json").is_file():
            raise ConfigError(f"--lens {directory}: not a tuned-lens folder (expected lens.json and lens.safetensors)")
        meta = read_json(directory / "lens.json")
        if not isinstance(meta, dict) or "d_model" not in meta:
            raise ConfigError(f"{directory / 'lens.json'}: expected a JSON object with d_model")
        lens = cls(meta["d_model"], head)
        try:
            lens.translator.load_state_dict(load_safetensors(directory / "lens.safetensors"))
        except RuntimeError as e:  # shapes that disagree with lens.json or with the model
            raise ConfigError(f"{directory / 'lens.safetensors'}: weights do not fit ({' '.join(str(e).split())[:300]})") from None
        lens.meta = meta
        return lens.eval()
