"""The SFT loss: the output head only where a label is learned, in chunks, in every batching mode.

Over Qwen2.5's 151,936-token vocabulary the output layer and its cross-entropy dominate a small model's
step, and most positions are prompt or padding. The model is run without its head (``logits_to_keep``
selects no position) and the head is applied to the labelled positions' final hidden states only,
``HEAD_CHUNK_ROWS`` at a time, so no [positions x vocabulary] float32 tensor ever exists.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from transformers import Trainer

from .packing import IGNORE_INDEX

HEAD_CHUNK_ROWS = 512  # positions per output-head chunk: 311 MB of float32 logits at 151,936 tokens


def token_mean_loss(
    head, hidden, labels, num_items_in_batch=None, *, chunk_rows: int = HEAD_CHUNK_ROWS, min_chunks: Any = None
):
    """Next-token loss summed over labelled positions, divided by the labelled tokens of the whole
    global batch (all processes, all accumulation steps) when the Trainer provides that count, so
    N processes x batch b train exactly like 1 process x batch N*b.

    ``hidden`` is the decoder's output (after its final norm), ``head`` the output layer module. The head
    runs only where the next token is learned, ``chunk_rows`` positions at a time, and neither the forward
    nor the backward holds more than one chunk's logits (the full float32 logits of a 4 x 512 batch are
    1.2 GB, mostly prompt or padding).

    ``min_chunks(n)``, when given, returns how many chunks to run when this process has ``n``: under ZeRO-3
    every rank must call the head equally often (``chunks_of_all_ranks``), and the extra chunks are empty.
    """
    shifted = labels[:, 1:].to(hidden.device)
    learned = shifted != IGNORE_INDEX
    states, targets = hidden[:, :-1][learned], shifted[learned]
    chunks = max(-(-len(targets) // chunk_rows), 1)
    if min_chunks is not None:
        chunks = min_chunks(chunks)
    if any(p.requires_grad for p in head.parameters()):
        total = _trained_head_loss(head, states, targets, chunk_rows, chunks)
    else:
        total = _FrozenHeadLoss.apply(states, targets, head, chunk_rows, chunks)
    return total / (num_items_in_batch if num_items_in_batch is not None else len(targets))


def _chunk_loss(head, states, targets):
    return torch.nn.functional.cross_entropy(head(states).float(), targets, reduction="sum")


def chunks_of_all_ranks(chunks: int) -> int:
    """The most chunks any process has this micro-batch. ZeRO-3 records the order of module calls on the first
    micro-batch and asserts at the next that every rank made as many: ranks holding different numbers of
    labelled tokens would call the head a different number of times and hang."""
    from .ranks import max_over_ranks

    return max_over_ranks(chunks)


def _trained_head_loss(head, states, targets, chunk_rows: int, chunks: int):
    """Each chunk checkpointed: its logits are recomputed in the backward, one chunk at a time. Non-reentrant,
    so the recomputation's weight gradients join the one backward pass and a parameter's gradient hooks
    (DDP, ZeRO) fire once, not once per chunk."""
    total = torch.zeros((), dtype=torch.float32, device=states.device)
    # At least one chunk, empty if nothing is learned: the head stays in the graph (DDP waits for its grads).
    for start in range(0, chunks * chunk_rows, chunk_rows):
        rows = slice(start, start + chunk_rows)  # past the end: an empty chunk
        total = total + checkpoint(_chunk_loss, head, states[rows], targets[rows], use_reentrant=False)
    return total


class _FrozenHeadLoss(torch.autograd.Function):
    """A frozen head's summed loss, its gradient with respect to the hidden states computed chunk by chunk
    in the forward, where each chunk's logits exist anyway: the backward only scales it. No weight gradient
    is wanted, so a chunk costs one forward and one backward matmul (a checkpoint would add a recomputation),
    and nothing outlives its chunk. ZeRO-3 gathers the weight through the head's own hooks in each chunk;
    a checkpoint's recomputation would instead meet a frozen weight it has already partitioned again."""

    @staticmethod
    def forward(ctx, states, targets, head, chunk_rows: int, chunks: int):
        total = torch.zeros((), dtype=torch.float32, device=states.device)
        grads = torch.zeros_like(states) if ctx.needs_input_grad[0] else None
        for start in range(0, chunks * chunk_rows, chunk_rows):
            rows = slice(start, start + chunk_rows)
            with torch.enable_grad():
                chunk = states[rows].detach().requires_grad_(grads is not None)
                loss = _chunk_loss(head, chunk, targets[rows])
            if grads is not None:
                (grads[rows],) = torch.autograd.grad(loss, chunk)
            total += loss.detach()
        ctx.save_for_backward(grads)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grads,) = ctx.saved_tensors
        return grads * grad_total, None, None, None, None


class SFTTrainer(Trainer):
    """The Trainer, with the model stopping before its output head: ``token_mean_loss`` runs the head
    itself, only where a label is learned. Token counts across processes and accumulation steps, and
    the loss scaling that goes with them, stay the Trainer's (it calls ``compute_loss_func``)."""

    def __init__(self, *args, chunk_rows: int = HEAD_CHUNK_ROWS, **kwargs):
        super().__init__(*args, compute_loss_func=self._head_loss, **kwargs)
        from transformers.integrations import is_deepspeed_zero3_enabled

        self._chunk_rows = chunk_rows
        self._equal_chunks = is_deepspeed_zero3_enabled() and self.args.world_size > 1
        if self.args.n_gpu > 1:  # DataParallel replicas would race for the one captured hidden state
            raise ValueError(f"one process sees {self.args.n_gpu} GPUs: run one per GPU (train.nproc_per_node)")
        self._captured: dict[str, Any] = {}
        self.tokens_seen: torch.Tensor | int = 0  # this process's non-padding tokens, on its device

    def _track_num_input_tokens(self, inputs) -> None:
        """Counts this process's non-padding tokens where they are (a flat batch has no padding), without
        reading the count back: the Trainer's own count (``include_num_input_tokens_seen``) waits for the
        device and gathers across processes at every step. Read at logging steps only (``LiveMetrics``)."""
        if "num_tokens" in inputs:  # flat batches: the collator counted them (rows may end in padding)
            self.tokens_seen = self.tokens_seen + inputs["num_tokens"]
            return
        mask = inputs.get("attention_mask")
        self.tokens_seen = self.tokens_seen + (mask.sum() if mask is not None else inputs["input_ids"].numel())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Through the wrapped model (DDP and DeepSpeed act in its forward, PEFT in its modules), keeping
        # no logits; the decoder's output is picked up on the way and the head applied in _head_loss.
        inputs = {k: v for k, v in inputs.items() if k != "num_tokens"}  # the collator's count, not a model input
        inner = self.accelerator.unwrap_model(model)
        no_logits = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
        hook = inner.get_decoder().register_forward_hook(self._capture_hidden)
        self._captured["head"] = inner.get_output_embeddings()
        try:
            return super().compute_loss(
                model, {**inputs, "logits_to_keep": no_logits}, return_outputs, num_items_in_batch=num_items_in_batch
            )
        finally:
            hook.remove()
            self._captured.clear()

    def _capture_hidden(self, module, args, output) -> None:
        self._captured["hidden"] = output[0]  # last_hidden_state, after the final norm

    def _head_loss(self, outputs, labels, num_items_in_batch=None):
        # The head in the forward's precision: bf16/fp16 autocast when mixed precision is on.
        with self.accelerator.autocast():
            return token_mean_loss(
                self._captured["head"],
                self._captured["hidden"],
                labels,
                num_items_in_batch,
                chunk_rows=self._chunk_rows,
                min_chunks=chunks_of_all_ranks if self._equal_chunks else None,
            )
