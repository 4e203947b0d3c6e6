"""Expert parallelism: the token-row exchange between the ranks of an EP group and the slicing of each
layer's experts to the rank that owns them.

EP rank r of a group of ``ep`` ranks keeps experts ``[r*E/ep, (r+1)*E/ep)``. The router runs replicated;
the expert-sorted token rows go to the rank owning their expert with ``all_to_all_single`` (counts are
exchanged first: uneven splits, no padding) and come back the same way (autograd through both).
``blockdiff.parallel.parallelize`` builds the meshes and calls ``shard_experts``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as tdist

from blockdiff.model.moe import inverse_permutation


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        tdist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        tdist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class _Permute(torch.autograd.Function):
    """Rows reordered by a permutation ``index`` (whose inverse is ``inverse``): forward and backward are
    both gathers. Plain indexing would scatter-add its gradient (``index_put_`` with accumulate)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class ExpertDispatcher:
    """Installed as ``Experts.dispatcher`` when ep > 1 (see ``model.moe.Experts``)."""

    def __init__(self, group, ep: int, num_experts: int):
        self.group, self.ep = group, ep
        self.n_local = num_experts // ep

    def announce(self, counts: torch.Tensor):
        """Start the exchange of row counts and the copy of the split sizes to the host; ``dispatch`` reads
        them. The layer queues its dense MLP in between, so the GPU is busy while the host waits.
        Returns None in a recomputation that replays the forward's exchanges."""
        stash = _ExchangeStash.active
        if stash is not None and stash.replaying:
            return None
        # rows are sorted by global expert; experts of EP rank r are the r-th contiguous block
        send = counts.view(self.ep, self.n_local).contiguous()
        recv = torch.empty_like(send)  # recv[s, e]: rows source s sends for my local expert e
        tdist.all_to_all_single(recv, send, group=self.group)
        splits = torch.stack([send.sum(1), recv.sum(1)])
        if not splits.is_cuda:
            return recv, splits, None
        host = torch.empty(splits.shape, dtype=splits.dtype, pin_memory=True)
        host.copy_(splits, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return recv, host, copied

    def dispatch(self, rows: torch.Tensor, counts: torch.Tensor, ticket=None):
        stash = _ExchangeStash.active
        if stash is not None and stash.replaying:  # recomputation: the forward's exchange results
            recv, send_splits, recv_splits, got = stash.replay()
        else:
            recv, splits, copied = ticket if ticket is not None else self.announce(counts)
            if copied is not None:
                copied.synchronize()
            # the one host read per MoE call: all_to_all_single needs its split sizes as Python ints
            send_splits, recv_splits = splits.tolist()
            got = all_to_all(rows, recv_splits, send_splits, self.group)  # ordered (source, local expert)
            if stash is not None and torch.is_grad_enabled():
                stash.record((recv, send_splits, recv_splits, got))
        # regroup by local expert (the recomputation runs this too: checkpoint matches saved tensors by count)
        expert_of = torch.arange(self.n_local, device=rows.device).repeat(self.ep)
        expert_of = torch.repeat_interleave(expert_of, recv.reshape(-1), output_size=sum(recv_splits))
        order = torch.argsort(expert_of, stable=True)
        inverse = inverse_permutation(order)
        return _Permute.apply(got, order, inverse), recv.sum(0), (order, inverse, send_splits, recv_splits)

    def combine(self, h: torch.Tensor, ctx) -> torch.Tensor:
        order, inverse, send_splits, recv_splits = ctx
        back = _Permute.apply(h, inverse, order)  # undo the regrouping by local expert
        stash = _ExchangeStash.active
        if stash is not None and stash.replaying:
            return stash.replay()
        out = all_to_all(back, send_splits, recv_splits, self.group)
        if stash is not None and torch.is_grad_enabled():
            stash.record(out)
        return out


class _ExchangeStash:
    """Expert-parallel exchanges of one checkpointed layer call, kept from its forward for its
    recomputation: the recomputed layer replays the received rows and the combined outputs instead of
    exchanging again (two all-to-alls, a counts exchange and a host read of split sizes per MoE call).
    Costs the memory of those rows until the layer's backward. ``active`` is the stash of the layer
    running now (training is single-threaded)."""

    active: "_ExchangeStash | None" = None

    def __init__(self):
        self.saved: list = []
        self.replaying, self.next = False, 0

    def record(self, value) -> None:
        self.saved.append(value)

    def replay(self):
        value = self.saved[self.next]
        self.next += 1
        return value

    @contextlib.contextmanager
    def use(self, replaying: bool):
        previous, _ExchangeStash.active = _ExchangeStash.active, self
        self.replaying, self.next = replaying, 0
        try:
            yield
        finally:
            _ExchangeStash.active = previous


def exchange_stash_contexts():
    """``context_fn`` of ``checkpoint``: (context of the forward, context of the recomputation)."""
    stash = _ExchangeStash()
    return stash.use(False), stash.use(True)


def shard_experts(model, group, ep_rank: int, ep: int) -> tuple[set[str], int]:
    """Keep EP rank ``ep_rank``'s block of experts in every layer and install the dispatcher that exchanges
    token rows over ``group``. Returns (names of the sliced params, first global expert of this rank)."""
    E = model.config.num_experts
    n_local = E // ep
    sl = slice(ep_rank * n_local, (ep_rank + 1) * n_local)
    expert_names = set()
    for li, layer in enumerate(model.layers):
        ex = layer.experts
        # every [E, ...] param under the experts module: the expert weights and any LoRA adapter's
        for mod_name, mod in list(ex.named_modules()):
            for name, old in list(mod.named_parameters(recurse=False)):
                if old.ndim >= 1 and old.shape[0] == E:
                    new = torch.nn.Parameter(old.detach()[sl].clone(), requires_grad=old.requires_grad)
                    setattr(mod, name, new)
                    full = ".".join(x for x in (f"layers.{li}.experts", mod_name, name) if x)
                    expert_names.add(full)
            # a quantized base's expert tensors (frozen buffers, not FSDP-sharded): the same slice
            for name, old in list(mod.named_buffers(recurse=False)):
                if old.ndim >= 1 and old.shape[0] == E:
                    mod._buffers[name] = old[sl].clone()
                    expert_names.add(f"layers.{li}.experts.{mod_name}")
        ex.dispatcher = ExpertDispatcher(group, ep, E)
    return expert_names, sl.start
