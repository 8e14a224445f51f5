"""The chunked head loss run inside the output head's own forward, where a sharding engine gathers its weight.

`ChunkedHeadLoss` multiplies hidden states by the output head's weight. Read from outside the model's
forward, that weight is a shard (FSDP2: a DTensor) or an empty placeholder (DeepSpeed ZeRO-3), because
the engines gather a module's parameters only around that module's forward (and again for backward).
So, as fused-loss integrations do (Liger's fused linear cross-entropy), the loss runs where the logits
would be computed: `DistillationHead` is the student's output layer; handed a pending request, its forward
takes the [batch, seq, hidden] states the model passes it, gathers the response rows and returns the
chunked loss instead of logits. Without a request it is the plain Linear it replaced (generation, eval).

The parameters stay the same Parameter objects under the same names (`lm_head.weight`), so checkpoints,
tied embeddings, PEFT and `from_pretrained` see no difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class HeadRequest:
    """What one distillation forward needs beyond the hidden states, and where its detached sums land."""

    batch: dict[str, Any]
    loss_fn: Any  # (rows [N, hidden], weight, bias) -> (loss, ce_sum, kd_sum)
    ce_sum: Tensor | None = None
    kd_sum: Tensor | None = None


class DistillationHead(torch.nn.Linear):
    """The output layer; with `request` set, forward returns the distillation loss (a 0-dim tensor)."""

    request: HeadRequest | None = None

    @classmethod
    def replacing(cls, linear: torch.nn.Linear) -> DistillationHead:
        """A DistillationHead holding `linear`'s own Parameters (no copy, no new allocation)."""
        head = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        head.weight = linear.weight
        head.bias = linear.bias
        head.train(linear.training)
        return head

    def forward(self, hidden_states: Tensor) -> Tensor:
        request = self.request
        if request is None:
            return super().forward(hidden_states)
        batch = request.batch
        rows = hidden_states[batch["row_index"], batch["col_index"]]  # positions t - 1 of response tokens
        loss, request.ce_sum, request.kd_sum = request.loss_fn(rows, self.weight, self.bias)
        return loss


def install_distillation_head(model: Any) -> DistillationHead:
    """Make the output layer of `model` (a transformers model, or PEFT around one) a DistillationHead.

    Must run before an engine wraps the model (FSDP2 swaps module classes, ZeRO-3 hooks modules), and
    is idempotent. `model.get_output_embeddings()` must already be a plain Linear (see output_head).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if isinstance(head, DistillationHead):
        return head
    replacement = DistillationHead.replacing(head)
    base.set_output_embeddings(replacement)
    if base.get_output_embeddings() is not replacement:
        raise RuntimeError(f"{type(base).__name__}.set_output_embeddings did not replace the output layer.")
    return replacement
