"""Per-request decoding: OpenAI's sampling (temperature 0 is greedy, then temperature and top_p, a
seed per request) and the text a stream may send so far (stop strings cut, partial ones held back)."""

from __future__ import annotations

import torch


def choose(logits: torch.Tensor, jobs) -> list[int]:
    """One next token per row of [rows, vocab] logits: argmax where the job is greedy, else sampled
    with that job's own generator (so a seed gives the same text however the rows are batched)."""
    logits = logits.float()
    tokens = logits.argmax(-1).tolist()
    for i, job in enumerate(jobs):
        if job.temperature > 0:
            tokens[i] = sample(logits[i].cpu(), job.temperature, job.top_p, job.generator)
    return tokens


def sample(row: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    probs = torch.softmax(row / temperature, dim=-1)
    if top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=generator))
    ordered, index = probs.sort(descending=True)
    keep = ordered.cumsum(0) - ordered < top_p  # the smallest set reaching top_p (the first token always)
    choice = torch.multinomial(ordered * keep, 1, generator=generator)
    return int(index[choice])


def generator_for(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % (2 ** 63))
    return generator


class TextProgress:
    """What of a growing completion has been sent, with stop strings applied."""

    def __init__(self, stops: tuple[str, ...] = ()):
        self.stops = stops
        self.sent = ""   # the text streamed so far
        self.text = ""   # the completion as it stands (cut at a stop string)

    def update(self, full: str, final: bool) -> tuple[str, bool]:
        """(new text to send, whether a stop string ended it). `full` is the decoded completion."""
        cuts = [i for i in (full.find(s) for s in self.stops) if i >= 0]
        stopped = bool(cuts)
        self.text = full[:min(cuts)] if stopped else full
        ready = self.text if stopped or final else self.text[:len(self.text) - self._held(self.text)]
        if not ready.startswith(self.sent):  # the decoder rewrote earlier text: wait until it agrees again
            return "", stopped
        delta, self.sent = ready[len(self.sent):], ready
        return delta, stopped

    def _held(self, text: str) -> int:
        """Characters kept back: an unfinished UTF-8 character, or the start of a stop string."""
        held = len(text) - len(text.rstrip("\ufffd"))
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    held = max(held, k)
                    break
        return held
