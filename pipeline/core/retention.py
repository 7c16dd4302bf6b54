"""SFT loss terms that keep the SFT model close to the CPT model it starts from (docs/levers.md).

    python -m pipeline.run sft.kl_weight=0.5      # + 0.5 x KL(p_cpt || p_sft) on the trained tokens
    python -m pipeline.run sft.l2_weight=1.0      # + 1.0 x sum of ||dW||^2 over the SFT adapter's LoRA updates

**KL.** The CPT model's distribution comes from the same network with the SFT adapter switched off
(`disable_adapter()`, no gradient): no second copy of the model in memory. The divergence is the forward one,
KL(p_cpt || p_sft) = sum_v p_cpt(v) (log p_cpt(v) - log p_sft(v)), the knowledge-distillation loss of Learning without
Forgetting: it charges SFT for every token to which it takes away probability the CPT model gave, which is what
forgetting a fact looks like at that position. The reverse direction (the RLHF-style penalty) charges new probability
where the CPT model had little, which is what SFT is for (a new answer style), and lets SFT drop CPT's lower modes
without cost. It is summed over the positions that carry the SFT loss (answer tokens, and replayed text with
sft.replay_ratio) and divided like TRL's loss (by the number of such tokens), so kl_weight is per token.

**L2.** The squared Frobenius norm of each LoRA update dW = scale x B @ A, i.e. of what the merge would add to the
weight, summed over the adapted layers; computed as <B^T B, A A^T> (two r x r matrices), never forming dW. Not the
norm of A and B themselves: A starts random, so that would pull the adapter towards an arbitrary point rather than
towards the CPT model. Fully trained embedding copies (target_modules with embed) are not penalised.

Cost: the KL term runs the model twice more per step (the adapter model with full logits for the gradient, the CPT
model without gradient), so an SFT step costs about three forward passes instead of one; L2 is negligible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from trl import SFTTrainer


def kl_to_adapter_free(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """sum over trained positions of KL(p_cpt || p_sft) / (num_items_in_batch or the number of those positions).

    p_sft: `model` as it is (with the SFT adapter, with gradient); p_cpt: the same model with the adapter disabled.
    """
    labels = inputs["labels"]
    feed = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
    feed["use_cache"] = False
    mask = labels[:, 1:] != -100  # position t predicts label t+1, as in the LM loss
    logits = model(**feed).logits[:, :-1][mask].float()
    peft_model = model.module if hasattr(model, "module") else model  # unwrap DDP if any
    with torch.no_grad(), peft_model.disable_adapter():
        ref = model(**feed).logits[:, :-1][mask].float()
    log_p_sft, log_p_cpt = F.log_softmax(logits, -1), F.log_softmax(ref, -1)
    kl = (log_p_cpt.exp() * (log_p_cpt - log_p_sft)).sum()
    count = mask.sum() if num_items_in_batch is None else num_items_in_batch
    return kl / torch.as_tensor(count, device=kl.device).clamp(min=1)


def lora_update_sq_norm(model) -> torch.Tensor:
    """sum over LoRA layers of ||scale * B @ A||_F^2 for the active adapter: how far the merged weights would move."""
    from peft.tuners.lora import LoraLayer

    total = None
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            a = module.lora_A[name].weight.float()  # (r, in)
            b = module.lora_B[name].weight.float()  # (out, r)
            term = module.scaling[name] ** 2 * ((b.T @ b) * (a @ a.T)).sum()  # = ||B A||^2 = tr(B^T B A A^T)
            total = term if total is None else total + term
    if total is None:
        return torch.zeros((), device=next(model.parameters()).device)
    return total


class RetentionSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer with sft.kl_weight / sft.l2_weight terms added to its loss during training.

    Subclassed ONLY to change compute_loss: data preparation, collation, TRL's own LM loss (its fused head) and its
    logging are untouched; the extra terms are logged as `kl` and `l2` next to TRL's metrics. Evaluation (the SFT
    dev set, sft.early_stopping_patience) sees the plain LM loss, the quantity early stopping should watch.
    """

    def __init__(self, *args, kl_weight: float = 0.0, l2_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.kl_weight, self.l2_weight = kl_weight, l2_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch)
        if not model.training or not (self.kl_weight or self.l2_weight):
            return out
        loss = out[0] if return_outputs else out
        if self.kl_weight:
            kl = kl_to_adapter_free(model, inputs, num_items_in_batch)
            loss = loss + self.kl_weight * kl
            self._metrics["train"]["kl"].append(self.accelerator.gather_for_metrics(kl.detach()).mean().item())
        if self.l2_weight:
            l2 = lora_update_sq_norm(model)
            # One value per optimizer step: with num_items_in_batch the trainer sums the micro-batches' losses instead
            # of averaging them, so divide as TRL does for its MoE auxiliary loss.
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.l2_weight * l2 / steps
            self._metrics["train"]["l2"].append(l2.detach().item())
        return (loss, out[1]) if return_outputs else loss
