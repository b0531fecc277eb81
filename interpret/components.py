"""Load what a run's interpretation needs: the frozen model, its SAE and the decoder reading it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from torch import Tensor

from distill.student import sae_features
from interpret.run import InterpretRun
from models.config import DEFAULT_MODEL, ModelConfig
from models.decoder import FeatureDecoder, load_decoder, read_decoder_meta
from models.errors import ConfigError
from models.frozen import FrozenLM
from models.head import FrozenHead
from models.loading import load_frozen
from sae.model import SparseAutoencoder


@dataclass
class Components:
    run: InterpretRun
    frozen: FrozenLM
    sae: SparseAutoencoder
    decoder: FeatureDecoder
    layer: int
    meta: dict

    @cached_property
    def token_strings(self) -> list[str]:
        """Every vocabulary id decoded on its own (whitespace kept), for showing examples."""
        return [self.token_string(i) for i in range(self.frozen.vocab_size)]

    def features(self, resid_BTD: Tensor) -> tuple[Tensor, Tensor]:
        return sae_features(self.sae, resid_BTD)

    def token_string(self, token_id: int) -> str:
        """One vocabulary id decoded on its own (whitespace kept)."""
        return self.frozen.tokenizer.decode([int(token_id)])

    def decoder_logits(self, indices_BTK: Tensor, values_BTK: Tensor) -> Tensor:
        """Decoder logits at every position (context decoders read the whole sequence)."""
        return self.decoder(indices_BTK, values_BTK).float()

    def direct_effects(self, feature_ids: Tensor) -> Tensor:
        """Logit change per unit activation of each feature through the decoder's direct path [n, V]
        (`FeatureDecoder.direct_effects`)."""
        return self.decoder.direct_effects(feature_ids)


def load_components(run: InterpretRun, model_cfg: ModelConfig | None = None, frozen: FrozenLM | None = None) -> Components:
    meta = read_decoder_meta(run.decoder_dir)
    model_cfg = model_cfg or ModelConfig()
    if model_cfg.model == DEFAULT_MODEL and meta.get("model"):
        model_cfg = model_cfg.model_config(model=meta["model"])
    frozen = frozen or load_frozen(model_cfg)
    sae = SparseAutoencoder.load(run.sae_dir(meta.get("sae")))
    sae.eval()
    decoder = load_decoder(run.decoder_dir, FrozenHead.from_frozen(frozen))
    for p in list(decoder.parameters()) + list(sae.parameters()):
        p.requires_grad_(False)
    if "layer" not in meta:
        raise ConfigError(f"{run.decoder_dir}/decoder.json records no layer; retrain or add \"layer\" to it")
    layer = int(meta["layer"])
    layer = frozen.check_layer(layer, f"{run.decoder_dir}/decoder.json: layer")
    return Components(run=run, frozen=frozen, sae=sae, decoder=decoder, layer=layer, meta=meta)
