"""The frozen causal LM: residual-stream hooks at block outputs, early stop, splicing, logit lens.

Layer L is the residual stream after block L (transformers' `hidden_states[L]`), read through
hooks on the blocks so that the last layer is the last block's raw output, before the final
norm, like every other layer. Layer 0 is the input of the first block (the embedding output).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor, nn

from models.errors import ConfigError
from models.placement import main_device, module_tensors

# Where common architectures keep their blocks and final norm (first match wins).
_BLOCK_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")
_NORM_PATHS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm")

Patch = Callable[[Tensor], Tensor]


class _StopForward(Exception):
    """Raised by a hook once the last needed layer has run, so upper blocks never execute."""


class FrozenLM:
    """A causal LM in eval mode with gradients off, read and patched at block boundaries."""

    def __init__(self, model: nn.Module, tokenizer, name: str):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.blocks: nn.ModuleList = _find_module(model, _BLOCK_PATHS, "transformer blocks")
        self.final_norm: nn.Module = _find_module(model, _NORM_PATHS, "final norm")
        self.unembed: nn.Module = model.get_output_embeddings()

    # -- shape facts ---------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.unembed.weight.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.unembed.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go and outputs, residuals and head weights come back (a dispatched model's main device)."""
        return main_device(self.model, self.unembed.weight.device)

    def weights(self, module: nn.Module) -> dict[str, Tensor]:
        """`module`'s own parameters on `device`, loaded from CPU or disk offload where accelerate put them."""
        return module_tensors(module, self.device)

    @contextmanager
    def loaded(self, modules: Iterable[nn.Module]) -> Iterator[None]:
        """Within the block, the weights of `modules` that accelerate offloaded (to the meta device) are loaded, so
        that their state dicts hold real tensors; they are offloaded again on exit."""
        from accelerate.utils import align_module_device

        with ExitStack() as stack:
            for module in modules:
                for sub in module.modules():
                    if getattr(sub, "_hf_hook", None) is not None:
                        stack.enter_context(align_module_device(sub))
            yield

    @property
    def bos_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        if bos is None:
            raise ConfigError(
                f"--model: the tokenizer of {self.name} has no BOS token; faithlens starts every "
                "sequence with BOS, so choose a model whose tokenizer defines bos_token"
            )
        return bos

    @property
    def eos_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return self.bos_token_id if eos is None else eos

    def check_layer(self, layer: int, flag: str = "--layer") -> int:
        """`layer`, if this model has it; `flag` names where it came from in the message."""
        if not 0 <= layer <= self.n_layers:
            raise ConfigError(
                f"{flag}: layer {layer} is outside {self.name}'s range 0..{self.n_layers} "
                f"(0 = embeddings, {self.n_layers} = last block's output)"
            )
        return layer

    def fingerprint(self) -> dict:
        """What identifies this model's computation, for cache keys."""
        cfg = self.model.config.to_dict()
        cfg.pop("_name_or_path", None)
        cfg.pop("transformers_version", None)
        probe = self.weights(self.unembed)["weight"][:4, :16].float().sum().item()
        return {"name": self.name, "config": cfg, "dtype": str(self.dtype), "probe": round(probe, 6)}

    # -- hooks -----------------------------------------------------------------------------
    @contextmanager
    def hooks(
        self,
        read: Iterable[int] = (),
        write: Mapping[int, Patch] | None = None,
        stop_after: int | None = None,
    ) -> Iterator[dict[int, Tensor]]:
        """Within the block, forward passes store layer outputs into the yielded dict.

        `write[L]` replaces the residual at layer L by `fn(h)`; `read` stores the value before
        any write. With `stop_after`, the pass stops after that layer (catch via `run_to`).
        All hooks are removed on exit.
        """
        write = dict(write or {})
        read = set(read)
        for layer in read | set(write) | ({stop_after} if stop_after is not None else set()):
            self.check_layer(layer, "layer")
        store: dict[int, Tensor] = {}
        with ExitStack() as stack:
            for layer in sorted(read | set(write) | ({stop_after} if stop_after is not None else set())):
                fn = _make_hook(layer, store, layer in read, write.get(layer), layer == stop_after, self.device)
                if layer == 0:
                    handle = self.blocks[0].register_forward_pre_hook(fn, with_kwargs=True)
                else:
                    handle = self.blocks[layer - 1].register_forward_hook(fn)
                stack.callback(handle.remove)
            yield store

    @torch.inference_mode()
    def residuals(self, input_ids_BT: Tensor, layers: Iterable[int]) -> dict[int, Tensor]:
        """Residual streams at `layers`; blocks above the highest one do not run."""
        layers = sorted(set(layers))
        with self.hooks(read=layers, stop_after=layers[-1]) as store:
            try:
                self.model(input_ids=input_ids_BT.to(self.device), use_cache=False)
            except _StopForward:
                pass
        return store

    @torch.inference_mode()
    def forward(
        self, input_ids_BT: Tensor, layers: Iterable[int] = (), write: Mapping[int, Patch] | None = None
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Full forward: logits_BTV and the residuals at `layers` (read before any write)."""
        with self.hooks(read=layers, write=write) as store:
            out = self.model(input_ids=input_ids_BT.to(self.device), use_cache=False)
        return out.logits, store

    @torch.inference_mode()
    def logit_lens(self, h_BTD: Tensor) -> Tensor:
        """The frozen final norm and unembedding applied to a residual stream (and the model's logit soft cap)."""
        logits = self.unembed(self.final_norm(h_BTD.to(self.device, self.dtype)))
        cap = self.logit_softcap
        return (torch.tanh(logits / cap) * cap if cap else logits).to(self.device)

    @property
    def logit_softcap(self) -> float | None:
        """Gemma-2's final soft cap: logits = cap · tanh(head(h) / cap); None for most models."""
        return getattr(self.model.config, "final_logit_softcapping", None) or None


def _make_hook(layer: int, store: dict, read: bool, patch: Patch | None, stop: bool, device: torch.device):
    # On a dispatched model a block's output sits on that block's device: reads and patches see the main device.
    def apply(h: Tensor) -> Tensor:
        if read:
            store[layer] = h.detach().to(device)
        if patch is not None:
            h = patch(h.to(device)).to(h.device, h.dtype)
        return h

    if layer == 0:
        def pre_hook(module, args, kwargs):
            if args:
                h = apply(args[0])
                result = ((h, *args[1:]), kwargs)
            else:
                kwargs = {**kwargs, "hidden_states": apply(kwargs["hidden_states"])}
                result = (args, kwargs)
            if stop:
                raise _StopForward
            return result if patch is not None else None
        return pre_hook

    def hook(module, args, output):
        is_tuple = isinstance(output, tuple)
        h = apply(output[0] if is_tuple else output)
        if stop:
            raise _StopForward
        if patch is None:
            return None
        return (h, *output[1:]) if is_tuple else h
    return hook


def _find_module(model: nn.Module, paths: tuple[str, ...], what: str) -> nn.Module:
    for path in paths:
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if module is not None:
            return module
    raise ConfigError(
        f"--model: cannot find the {what} of {type(model).__name__} (looked for {', '.join(paths)}); "
        "this architecture is not supported yet"
    )
