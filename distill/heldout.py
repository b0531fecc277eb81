"""A fixed held-out sample with exact teacher log-probs: the distillation curve and PPO's faithfulness check."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from corpus.config import CorpusConfig
from corpus.packing import sequences
from distill.loss import kl_full
from distill.metrics import next_token_accuracy
from distill.student import sae_features, student_logits
from interpret.attribution import prediction_top_shares
from models.frozen import FrozenLM
from sae.model import SparseAutoencoder
from training.config import pick


class HeldOut:
    """`eval_tokens` positions of the eval split (or `split`) of `cfg`'s corpus, with the frozen model's log-probs."""

    def __init__(self, cfg: CorpusConfig, frozen: FrozenLM, layer: int, eval_tokens: int, batch_size: int = 4,
                 split: str = "eval"):
        eval_cfg = pick(cfg, CorpusConfig, split=split, tokens=eval_tokens)
        seqs = list(sequences(eval_cfg, frozen.tokenizer, frozen.bos_token_id, frozen.eos_token_id, frozen))
        self.batches, self.ids, self.next_ids = [], [], []
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            ids = torch.from_numpy(np.stack([p.tokens for p in chunk]))
            logits, store = frozen.forward(ids, [layer])
            self.ids.append(ids)
            self.next_ids.append(torch.from_numpy(np.stack([p.next_ids for p in chunk])).long())
            # bf16 log-probs keep the sample small (~0.1 nat/token of rounding on tiny probabilities only)
            self.batches.append((store[layer].float(), logits[:, 1:].float().log_softmax(-1).to(torch.bfloat16)))
        self.tokens = sum(t.shape[0] * t.shape[1] for _, t in self.batches)

    @torch.no_grad()
    def measure(self, student: nn.Module, sae: SparseAutoencoder | None, share_predictions: int = 0,
                seed: int = 0) -> dict:
        """kl, kl_reverse, top1 and next_token_acc (argmax = the data's next token) over the sample; with
        `share_predictions` (a decoder only), `top10_share`: the mean top-10 share of |attribution| over that
        many predictions at positions drawn with `seed` (the same ones on every call)."""
        kl = kl_reverse = top1 = correct = 0.0
        was_training = student.training
        student.eval()
        for (resid, teacher_logp), next_ids in zip(self.batches, self.next_ids):
            logits = student_logits(student, sae, resid)
            teacher = teacher_logp.flatten(0, 1).float()
            kl += kl_full(teacher, logits).sum().item()
            # KL(p_student ‖ p_frozen): what the RL reward r_faith − log π(a) optimises in expectation
            kl_reverse += kl_full(logits.float().log_softmax(-1), teacher).sum().item()
            top1 += (logits.argmax(-1) == teacher.argmax(-1)).sum().item()
            # position t predicts the token at t + 1
            correct += next_token_accuracy(logits, next_ids[:, 1:].flatten()) * logits.shape[0]
        out = {"kl": kl / self.tokens, "kl_reverse": kl_reverse / self.tokens, "top1": top1 / self.tokens,
               "next_token_acc": correct / self.tokens}
        if share_predictions and sae is not None:
            out["top10_share"] = self.top10_share(student, sae, share_predictions, seed)
        student.train(was_training)
        return out

    def top10_share(self, decoder, sae: SparseAutoencoder, n: int, seed: int = 0) -> float:
        """Mean top-10 share of |attribution| per prediction (the design's "top-10 features explain 30%"), over n
        predictions drawn uniformly without replacement from the sample."""
        sizes = [resid.shape[0] * (resid.shape[1] - 1) for resid, _ in self.batches]  # scored predictions per batch
        picks = np.random.default_rng(seed).choice(sum(sizes), size=min(n, sum(sizes)), replace=False)
        starts = np.cumsum([0, *sizes])
        shares = []
        for i, (resid, _) in enumerate(self.batches):
            mine = picks[(picks >= starts[i]) & (picks < starts[i + 1])] - starts[i]
            if not len(mine):
                continue
            T = resid.shape[1] - 1
            indices, values = sae_features(sae, resid)
            shares += prediction_top_shares(decoder, indices, values, [(int(p // T), int(p % T) + 1) for p in sorted(mine)])
        return float(np.mean(shares))
