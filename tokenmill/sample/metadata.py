"""SamplingMetadata: the per-step, per-row sampling settings as batched tensors.

Built once per step from the requests' `SamplingParams` (a loop over requests, not tokens).
Optional fields are None when no row in the batch uses the feature, so the sampler can skip
the work entirely (e.g. no sort when no row uses top-k / top-p).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenmill.sampling_params import SamplingParams


@dataclass
class SamplingMetadata:
    """One row per sequence to sample this step.

    Token-id matrices are padded with `vocab_size` (one past the last real id), so the sampler
    can scatter into a `[num_rows, vocab_size + 1]` buffer and drop the padding column.
    Greedy rows have temperature 0 and neutral top-k / top-p / min-p values.
    """

    temperature: torch.Tensor  # [num_rows] float32, 0 for greedy rows
    top_k: torch.Tensor | None  # [num_rows] int64, 0 = no limit
    top_p: torch.Tensor | None  # [num_rows] float32
    min_p: torch.Tensor | None  # [num_rows] float32
    repetition_penalty: torch.Tensor | None  # [num_rows] float32
    presence_penalty: torch.Tensor | None  # [num_rows] float32
    frequency_penalty: torch.Tensor | None  # [num_rows] float32
    prompt_token_ids: torch.Tensor | None  # [num_rows, max_prompt_len] int64
    output_token_ids: torch.Tensor | None  # [num_rows, max_out_len] int64
    # [num_rows, vocab_size] bool, True = may not be sampled (min_tokens, allowed_token_ids,
    # bad_words)
    forbidden_mask: torch.Tensor | None
    # logit_bias of the rows that have one, as (row, token id, bias) triples: [n] int64, [n]
    # int64, [n] float32
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> generator
    max_num_logprobs: int | None = None  # None: no logprobs; k >= 0: sampled + top-k
    max_top_k: int = 0  # the largest top_k of the batch (host side, sizes the top-k)
    all_greedy: bool = False

    @property
    def num_rows(self) -> int:
        return int(self.temperature.shape[0])


@dataclass(frozen=True)
class TokenBitmasks:
    """The structured-output masks of one step: row i of `bitmask` (host, int32,
    [len(request_ids), ceil(vocab / 32)]; token t is bit t % 32 of word t // 32) is what request
    `request_ids[i]` may sample next."""

    request_ids: list[str]
    bitmask: torch.Tensor


def _to(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device`, copied without a host synchronisation (a
    non-blocking copy; from pageable memory CUDA stages it before returning)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _optional_row_tensor(
    values: list[float] | list[int], neutral: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """A [num_rows] tensor, or None when every row holds the neutral value."""
    if all(v == neutral for v in values):
        return None
    return _to(values, dtype, device)


def _padded_ids(rows: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """[num_rows, max(1, max_len)] int64, padded on the right with `pad_id`."""
    width = max([1] + [len(r) for r in rows])
    padded = [list(r) + [pad_id] * (width - len(r)) for r in rows]
    return _to(padded, torch.int64, device)


def _forbidden_mask(
    params: list[SamplingParams],
    output_ids: list[list[int]],
    stop_ids: list[set[int]] | None,
    vocab_size: int,
    device: torch.device,
    bad_words: list[tuple[tuple[int, ...], ...]] | None = None,
) -> torch.Tensor | None:
    """True where a row may not sample a token: a stop id while the row has fewer than
    min_tokens outputs, any id outside its allowed_token_ids, the last token of a bad word's
    sequence whose other tokens end the output. None when no row has any."""
    rows: list[int] = []
    cols: list[int] = []
    restricted: list[int] = []
    allow_rows: list[int] = []
    allow_cols: list[int] = []
    for i, p in enumerate(params):
        if stop_ids is not None and len(output_ids[i]) < p.min_tokens:
            valid = [t for t in stop_ids[i] if 0 <= t < vocab_size]
            rows.extend([i] * len(valid))
            cols.extend(valid)
        for seq in bad_words[i] if bad_words is not None else ():
            head = list(seq[:-1])
            if (not head or output_ids[i][-len(head) :] == head) and 0 <= seq[-1] < vocab_size:
                rows.append(i)
                cols.append(seq[-1])
        if p.allowed_token_ids:
            restricted.append(i)
            valid = [t for t in p.allowed_token_ids if 0 <= t < vocab_size]
            allow_rows.extend([i] * len(valid))
            allow_cols.extend(valid)
    if not rows and not restricted:
        return None
    mask = torch.zeros(len(params), vocab_size, dtype=torch.bool, device=device)
    if restricted:
        mask[_to(restricted, torch.int64, device)] = True
        mask[_to(allow_rows, torch.int64, device), _to(allow_cols, torch.int64, device)] = False
    if rows:
        mask[_to(rows, torch.int64, device), _to(cols, torch.int64, device)] = True
    return mask


def _logit_bias(
    params: list[SamplingParams], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The rows' logit_bias entries as (row, token id, bias) tensors, or None if no row has one.
    Ids outside the logits are an error (the engine checks them against the vocabulary)."""
    rows: list[int] = []
    ids: list[int] = []
    values: list[float] = []
    for i, p in enumerate(params):
        for t, v in (p.logit_bias or {}).items():
            if not 0 <= t < vocab_size:
                raise ValueError(f"logit_bias token id {t} out of range [0, {vocab_size})")
            rows.append(i)
            ids.append(t)
            values.append(v)
    if not rows:
        return None
    return (
        _to(rows, torch.int64, device),
        _to(ids, torch.int64, device),
        _to(values, torch.float32, device),
    )


def build_sampling_metadata(
    params: list[SamplingParams],
    prompt_ids: list[list[int]],
    output_ids: list[list[int]],
    generators: dict[int, torch.Generator],
    vocab_size: int,
    device: torch.device,
    stop_ids_for_min_tokens: list[set[int]] | None = None,
    bad_words_token_ids: list[tuple[tuple[int, ...], ...]] | None = None,
) -> SamplingMetadata:
    """Batch the rows' sampling settings into tensors on `device`.

    `generators` maps a row index to that request's own generator (seeded requests).
    `stop_ids_for_min_tokens[i]` holds the ids (eos + stop_token_ids) that row i may not emit
    while it has fewer than `params[i].min_tokens` output tokens. `bad_words_token_ids[i]` are
    row i's bad words as token sequences (`Request.bad_words_token_ids`).
    """
    num_rows = len(params)
    if len(prompt_ids) != num_rows or len(output_ids) != num_rows:
        raise ValueError("params, prompt_ids and output_ids must have one entry per row")
    if stop_ids_for_min_tokens is not None and len(stop_ids_for_min_tokens) != num_rows:
        raise ValueError("stop_ids_for_min_tokens must have one entry per row")
    if bad_words_token_ids is not None and len(bad_words_token_ids) != num_rows:
        raise ValueError("bad_words_token_ids must have one entry per row")
    if any(not 0 <= i < num_rows for i in generators):
        raise ValueError(f"generator row indices must be in [0, {num_rows})")

    greedy = [p.greedy for p in params]
    temperature = [0.0 if g else float(p.temperature) for p, g in zip(params, greedy)]
    # Filters are irrelevant to greedy rows; neutral values let the sampler skip them.
    top_k = [
        0 if g or p.top_k <= 0 or p.top_k >= vocab_size else p.top_k for p, g in zip(params, greedy)
    ]
    top_p = [1.0 if g else float(p.top_p) for p, g in zip(params, greedy)]
    min_p = [0.0 if g else float(p.min_p) for p, g in zip(params, greedy)]

    f32 = torch.float32
    repetition = _optional_row_tensor(
        [float(p.repetition_penalty) for p in params], 1.0, f32, device
    )
    presence = _optional_row_tensor([float(p.presence_penalty) for p in params], 0.0, f32, device)
    frequency = _optional_row_tensor([float(p.frequency_penalty) for p in params], 0.0, f32, device)
    any_penalty = repetition is not None or presence is not None or frequency is not None

    requested = [p.logprobs for p in params if p.logprobs is not None]
    return SamplingMetadata(
        temperature=_to(temperature, f32, device),
        top_k=_optional_row_tensor(top_k, 0, torch.int64, device),
        top_p=_optional_row_tensor(top_p, 1.0, f32, device),
        min_p=_optional_row_tensor(min_p, 0.0, f32, device),
        repetition_penalty=repetition,
        presence_penalty=presence,
        frequency_penalty=frequency,
        prompt_token_ids=(
            _padded_ids(prompt_ids, vocab_size, device) if repetition is not None else None
        ),
        output_token_ids=_padded_ids(output_ids, vocab_size, device) if any_penalty else None,
        forbidden_mask=_forbidden_mask(
            params, output_ids, stop_ids_for_min_tokens, vocab_size, device, bad_words_token_ids
        ),
        logit_bias=_logit_bias(params, vocab_size, device),
        generators=dict(generators),
        max_num_logprobs=max(requested) if requested else None,
        max_top_k=max(top_k, default=0),
        all_greedy=all(greedy),
    )
