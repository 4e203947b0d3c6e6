"""The lm-evaluation-harness model ``blockdiff``: generation tasks through the block-diffusion sampler.

``blockdiff eval lm-eval --model DIR --tasks ...`` runs it. From Python, importing this module registers it:
``lm_eval.simple_evaluate(model="blockdiff", model_args="pretrained=DIR[,adapter=DIR][,t_max=0.1,...]")``
(lm-eval's own ``lm_eval`` command does not import third-party models). Loading is
``evaluate.load_for_inference`` (a full checkpoint, or a base plus a PEFT adapter directory); sampler settings
are the checkpoint's ``generation_config.json``, any ``SamplerSettings`` field given as a model_arg winning,
with EOS fitted to the tokenizer as in ``blockdiff eval``.

Prompts: a task's context is the user turn of a one-turn conversation rendered by the checkpoint's chat
template with the generation prompt (``chat.render_generation_prompt``), the prompt format training
supervised after. With lm-eval's ``--apply_chat_template`` the harness builds the conversation itself
(few-shot examples as turns) and this model's ``apply_chat_template`` renders it with the same template;
such contexts are sampled as rendered.

Each request's random stream is seeded with ``seed + doc_id`` (the r-th repeat adds ``r * REPEAT_SEED_STRIDE``),
so results do not depend on batch size or request order, and the rows of a local task equal those of
``blockdiff eval gsm8k`` over the same file. Replies end at the checkpoint's stop tokens; the text is then
cut at the first of the request's ``until`` strings. Sampling is always the checkpoint's temperature
schedule: a task's ``do_sample``/``temperature`` are ignored (logged once).

lm-eval is an optional dependency: importing this module without it raises one error naming the extra.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from typing import NamedTuple

from blockdiff.errors import BlockdiffError, ConfigError

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'blockdiff[lm_eval]'"

try:  # optional extra: only the lm-eval command imports this module
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:
    raise BlockdiffError(f"{INSTALL_HINT} ({e})") from None

from blockdiff.data.chat import render, render_generation_prompt, tokenizer_name
from blockdiff.infer import prompting, sampling
from blockdiff.infer.evaluate import load_for_inference, settings_for_checkpoint

logger = logging.getLogger(__name__)

MODEL_NAME = "blockdiff"
# Seed offset between repeats of one document (lm-eval's ``repeats``): larger than any split's doc count.
REPEAT_SEED_STRIDE = 1_000_000_007
# Generation kwargs lm-eval tasks set that the diffusion sampler has no use for (its schedule is fixed).
_IGNORED_GEN_KWARGS = ("do_sample", "temperature", "top_p", "top_k")


def unsupported_request(request_type: str, task: str | None = None) -> ConfigError:
    """The error of every likelihood request: block diffusion has no tractable per-sequence likelihood."""
    where = f"task '{task}' needs {request_type}, which is" if task else f"{request_type} is"
    return ConfigError(f"{where} not supported by a diffusion model: the per-sequence likelihood of block "
                       "diffusion is not tractable; use generation tasks (output_type: generate_until)",
                       field="tasks")


def cut_at_stop_strings(text: str, until) -> str:
    """``text`` before the earliest occurrence of any non-empty string of ``until`` (a str or a list)."""
    stops = [until] if isinstance(until, str) else list(until or ())
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def _positive_int(value, field: str) -> int:
    """``value`` (an int or a string of digits, as lm-eval passes model_args) if it is >= 1."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"must be a positive integer (got {value!r})", field=field)
    return value


class _Job(NamedTuple):
    index: int  # position in the request list
    prompt: list[int]
    seed: int
    until: object  # the request's stop strings (str, list or None)


@register_model(MODEL_NAME)
class BlockdiffLM(LM):
    """A blockdiff checkpoint as an lm-eval model (``generate_until`` only).

    ``pretrained``: checkpoint directory; ``adapter``: PEFT adapter directory for it; ``dtype``/``device``
    as ``blockdiff eval``; ``batch_size``: rows per sampler call; ``enable_thinking``: render prompts with
    the template's thinking switch on. Any other keyword is a ``SamplerSettings`` field (``t_max``,
    ``max_new_tokens``, ``seed``, ...) overriding the checkpoint's generation config.
    """

    def __init__(self, pretrained: str, adapter: str | None = None, dtype: str | None = None,
                 device: str | None = None, batch_size: int = 8, max_batch_size: int | None = None,
                 enable_thinking: bool = False, **sampler_overrides) -> None:
        super().__init__()
        del max_batch_size  # lm-eval passes it for its automatic batch size search, which this model lacks
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.model, self.tokenizer, device = load_for_inference(pretrained, dtype, device, adapter)
        self._device = device
        self.enable_thinking = bool(enable_thinking)
        settings = settings_for_checkpoint(pretrained, self.tokenizer, **sampler_overrides)
        self.settings = prompting.settings_for_tokenizer(settings, self.tokenizer)
        self.info = {"pretrained": str(pretrained), "adapter": None if adapter is None else str(adapter),
                     "sampler": dataclasses.asdict(self.settings), "enable_thinking": self.enable_thinking}
        self._rendered: dict[str, list[int]] = {}  # contexts apply_chat_template produced -> their prompt ids
        self._warned_ignored = False

    # ---- lm-eval's chat interface ---------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return tokenizer_name(self.tokenizer).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the checkpoint's template, as training renders a prompt.

        ``add_generation_prompt=False`` is lm-eval's assistant prefill (a task's ``gen_prefix``): the final
        assistant message is continued, i.e. its text follows the generation prompt of the turns before it.
        """
        history, prefill = list(chat_history), ""
        if not add_generation_prompt and history and history[-1].get("role") == "assistant":
            prefill = history.pop()["content"]
        ids = render_generation_prompt(self.tokenizer, history, enable_thinking=self.enable_thinking)
        text = render(self.tokenizer, history, add_generation_prompt=True, enable_thinking=self.enable_thinking)
        if prefill:
            ids = ids + self.tokenizer(prefill, add_special_tokens=False)["input_ids"]
            text += prefill
        self._rendered[text] = ids
        return text

    def prompt_ids(self, context: str) -> list[int]:
        """Token ids of a request's context: as rendered by ``apply_chat_template``, else a one-turn chat."""
        if context in self._rendered:
            return self._rendered[context]
        return render_generation_prompt(self.tokenizer, [{"role": "user", "content": context}],
                                        enable_thinking=self.enable_thinking)

    def get_model_info(self) -> dict:
        return dict(self.info)

    # ---- requests -------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise unsupported_request("loglikelihood", requests[0].task_name if requests else None)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise unsupported_request("loglikelihood_rolling", requests[0].task_name if requests else None)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Sample every request (batched per ``max_gen_toks``, longest prompts first); replies in request order."""
        from tqdm import tqdm

        seen: dict[int, int] = defaultdict(int)  # the repeats of one Instance arrive as the same object
        by_length: dict[int, list[_Job]] = defaultdict(list)  # one sampler setting per max_gen_toks
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            self._note_ignored(gen_kwargs)
            repeat, seen[id(req)] = seen[id(req)], seen[id(req)] + 1
            doc = req.doc_id if req.doc_id is not None else i
            max_new = _positive_int(gen_kwargs.get("max_gen_toks", self.settings.max_new_tokens), "max_gen_toks")
            by_length[max_new].append(_Job(i, self.prompt_ids(context), self.settings.seed + doc
                                           + repeat * REPEAT_SEED_STRIDE, gen_kwargs.get("until")))

        replies: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="blockdiff generate_until", disable=disable_tqdm or None) as bar:
            for max_new, jobs in by_length.items():
                settings = dataclasses.replace(self.settings, max_new_tokens=max_new)
                jobs.sort(key=lambda j: -len(j.prompt))  # similar lengths share a batch: less left padding
                for lo in range(0, len(jobs), self.batch_size):
                    chunk = jobs[lo:lo + self.batch_size]
                    outputs = sampling.generate(self.model, [j.prompt for j in chunk], settings,
                                                device=self._device, row_seeds=[j.seed for j in chunk])
                    for job, ids in zip(chunk, outputs):
                        replies[job.index] = cut_at_stop_strings(prompting.decode_reply(self.tokenizer, ids),
                                                                 job.until)
                        self.cache_hook.add_partial("generate_until", requests[job.index].args, replies[job.index])
                    bar.update(len(chunk))
        return replies

    def _note_ignored(self, gen_kwargs: dict) -> None:
        ignored = sorted(k for k in gen_kwargs if k in _IGNORED_GEN_KWARGS)
        if ignored and not self._warned_ignored:
            self._warned_ignored = True
            logger.info("blockdiff samples with the checkpoint's temperature schedule (t_max %s -> t_min %s); "
                        "ignoring the task's %s", self.settings.t_max, self.settings.t_min, ", ".join(ignored))
