"""Async scheduling on the stage side: where each greedy sequence's newest sample is.

The gateway may send a decode before the answer carrying its input token is back (scheduler.py,
`lookahead`): the chunk says it `follows_sample`, with a 0 in its token's place. The stage then
finds that token here:

- a single stage (it embeds and samples): row `row` of the device argmax ids of the micro-batch
  that drew it, copied into the new step's token ids on the device (`put_samples`), stream-ordered
  after that micro-batch, so the two steps run back to back with no host sync;
- the first stage of a chain: the id itself, noted from the answer as it passed back (`note`).

A follower that arrives before the step it follows was launched (or answered) raises
SampleNotReady, changing nothing; the server tries it again after the next launch. One that
follows a refused step, or a superseded sample, raises Aborted at once: the gateway schedules both
again. Entries go with their sequence (`forget`, `drop_leases`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stagemesh.errors import Aborted, InvalidArgument

from stage_worker.step_input import Chunk, StepInput


class SampleNotReady(Exception):
    """A chunk follows a sample of a micro-batch not launched (or answered) yet: nothing changed;
    launch it again after the next launch."""


@dataclass(frozen=True)
class Sample:
    """Output `output_index` of a sequence: row `row` of `ids` (device argmax ids), or `token`
    (a chain's first stage), or, with neither, a micro-batch that was refused."""

    output_index: int
    ids: torch.Tensor | None = None
    row: int = -1
    token: int | None = None


class SampleBook:
    """(lease, seq_id) -> its newest Sample. Written on the compute thread and, on a chain's first
    stage, from the event loop (single dict operations; iteration goes over a copy of the keys)."""

    def __init__(self):
        self._by_seq: dict[tuple[str, int], Sample] = {}

    def record(self, lease: str, seq_id: int, sample: Sample | None) -> None:
        """The newest sample of a sequence (None: it has none a step could follow)."""
        if sample is None:
            self._by_seq.pop((lease, seq_id), None)
        else:
            self._by_seq[(lease, seq_id)] = sample

    def note(self, step: StepInput, samples, known) -> None:
        """A chain's first stage: the answer to `step` passed back with `samples` (seq_id, token_id);
        `known`: the lease table (a sequence gone meanwhile gets no entry)."""
        index = {c.seq_id: c.output_index for c in step.chunks if c.sample}
        for seq_id, token in samples:
            if seq_id in index and (step.lease_id, seq_id) in known:
                self.record(step.lease_id, seq_id, Sample(index[seq_id], token=token))

    def refused(self, lease_id: str, outputs, known) -> None:
        """A step failed here or further down: the samples it would draw, (seq_id, output_index)
        of each, will never come."""
        for seq_id, output_index in outputs:
            if (lease_id, seq_id) in known:
                self.record(lease_id, seq_id, Sample(output_index))

    def followed(self, step: StepInput, c: Chunk, state, device: bool) -> Sample:
        """The sample chunk c follows (`state`: its sequence's SeqState, None if the lease does
        not hold it yet), on the device or as an id; raises SampleNotReady, Aborted or
        InvalidArgument (module docstring)."""
        new = c.seq_id in step.new
        if state is None and not new:  # announced by the step it follows
            raise SampleNotReady(f"sequence {c.seq_id} unknown for lease {step.lease_id!r} yet")
        if state is not None and not state.sampling.plain_greedy and not new:
            raise InvalidArgument(f"sequence {c.seq_id}: follows_sample needs plain greedy sampling "
                                  "(sampled or processed tokens are drawn on the host)")
        rec = self._by_seq.get((step.lease_id, c.seq_id))
        if rec is None or rec.output_index < c.output_index - 1:
            raise SampleNotReady(f"sequence {c.seq_id}: output {c.output_index - 1} not sampled yet")
        if rec.output_index != c.output_index - 1 or (rec.ids if device else rec.token) is None:
            raise Aborted(f"sequence {c.seq_id}: the step that sampled its output "
                          f"{c.output_index - 1} was refused or replaced; schedule it again")
        return rec

    def forget(self, lease: str, seq_ids=()) -> None:
        """Drop the given sequences of a lease, or every one of it."""
        if seq_ids:
            for sid in seq_ids:
                self._by_seq.pop((lease, sid), None)
        else:
            self.drop_leases({lease})

    def drop_leases(self, leases) -> None:
        for key in [k for k in list(self._by_seq) if k[0] in leases]:
            del self._by_seq[key]

    def clear(self) -> None:
        self._by_seq.clear()


def put_samples(follows: list[tuple[int, Sample]], ids: torch.Tensor) -> None:
    """Copy each followed sample (device argmax ids of an earlier step, stream-ordered after it)
    into its row of this step's token ids: no host synchronisation."""
    groups: dict[int, tuple[torch.Tensor, list[int], list[int]]] = {}
    for row, rec in follows:
        src, dst_rows, src_rows = groups.setdefault(id(rec.ids), (rec.ids, [], []))
        dst_rows.append(row)
        src_rows.append(rec.row)
    for src, dst_rows, src_rows in groups.values():
        index = torch.tensor([dst_rows, src_rows], pin_memory=ids.is_cuda).to(ids.device, non_blocking=True)
        ids.index_copy_(0, index[0], src.index_select(0, index[1]).to(ids.dtype))
