"""``TemplatedLLM``: one MLflow pyfunc for every plugin-provided causal LM, composing the stages.

A request goes inputs -> params -> prompts -> tokens -> generation -> completions -> response;
each stage is a module of this package, and this class only connects them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow.models.model
import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_EXHAUSTED, ErrorCode

from templated_llm.engine import Engine, EngineFullError, Sequence
from templated_llm.engine.adapters import picks_rope_per_pass

from templated_llm.model_logging.config import read_config
from templated_llm.plugins.manager import get_model_spec
from templated_llm.runtime.batching import MAX_MERGED_PROMPTS, MAX_MERGED_TOKENS, MicroBatcher
from templated_llm.runtime.completions import Completion, stripped, stripped_stream, to_frame
from templated_llm.runtime.generation import end_ids, generate_completions, stream
from templated_llm.runtime.inputs import (
    MESSAGES_COLUMN,
    PROMPT_COLUMN,
    Row,
    has_messages,
    read_requests,
    refuse_unknown,
    request_at,
)
from templated_llm.runtime.memory import available_memory
from templated_llm.runtime.loading import engine_adapter, load_model, load_tokenizer, warn_if_remote_code
from templated_llm.runtime.params import GenerationParams, read_params
from templated_llm.runtime.prompts import PromptRenderer
from templated_llm.runtime.structured import Grammar, StructuredOutput
from templated_llm.runtime.tasks import CHAT, read_task_requests, task_response
from templated_llm.runtime.templates import PromptTemplate
from templated_llm.runtime.streams import Stream
from templated_llm.runtime.tokens import PromptTokens, add_special_tokens, context_length
from templated_llm.runtime.tracing import RequestTrace, Tracer

_logger = logging.getLogger(__name__)


class TemplatedLLM(mlflow.pyfunc.PythonModel):
    """Renders each prompt through the model's Jinja template and generates in one batch.

    Everything model-specific comes from the plugin that serves the model, found through the
    ``templated_llm`` hooks when the model is loaded.
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        # MLflow has read the model that model_code.py set from its module global by now; left
        # there, the last model loaded (weights, KV cache, engine thread) outlives its last user.
        if getattr(mlflow.models.model, "__mlflow_model__", None) is self:
            mlflow.models.model.__mlflow_model__ = None
        self.config = read_config(context.model_config, "model_config")
        self.spec = get_model_spec(self.config.model, self.config.plugin_module, self.config.plugin_digest)
        snapshot = Path(context.artifacts["snapshot"])
        warn_if_remote_code(self.config, snapshot)
        self.tokenizer = load_tokenizer(self.spec, snapshot, self.config.trust_remote_code)
        loaded = load_model(self.spec, self.config, snapshot, self.tokenizer)
        self.model, self.device, self.attention = loaded.model, loaded.device, loaded.attention
        template = PromptTemplate.from_file(context.artifacts["template"])
        self.renderer = PromptRenderer(self.spec, template, self.tokenizer)
        # One scheduler thread owns the model and runs every request a step at a time; a model
        # no plugin adapts to it generates whole batches, one at a time, concurrent requests
        # with equal params joining the next (transformers' generate is not thread-safe), as
        # long as the batch fits the KV cache budget the memory check left it.
        self._engine = self._start_engine()
        self.cache_tokens = None if self._engine is not None else loaded.batch_cache_tokens
        merged = MAX_MERGED_TOKENS if self.cache_tokens is None else min(MAX_MERGED_TOKENS, self.cache_tokens)
        # LongRoPE rotates a whole batch by its longest row: each row generates alone.
        self._rows_alone = picks_rope_per_pass(self.model.config)
        self._batcher = MicroBatcher(self._generate, max_padded_tokens=merged,
                                     max_prompts=1 if self._rows_alone else MAX_MERGED_PROMPTS)
        self.tokens = self._prompt_tokens()
        self.structured = StructuredOutput(self.tokenizer, self.model.config.vocab_size,
                                           sorted(end_ids(self.model.generation_config, self.tokenizer)))
        self.tracer = Tracer(
            enabled=self.config.tracing, content=self.config.trace_content, model=self.spec.name,
            template=self.config.template_name, template_version=self.config.template_version,
            task=self.config.task,
            prompt=(self.config.template_name, self.config.template_version) if self.config.template_uri else None,
        )
        _logger.info(
            "loaded %s (plugin %s) on %s in %s with %s attention, %s",
            self.spec.name, self.spec.plugin_name, self.device, loaded.dtype, self.attention,
            "on the engine" if self._engine is not None
            else f"whole batches of at most {self.cache_tokens} tokens of KV cache",
        )

    def _start_engine(self) -> Engine | None:
        if not self.config.engine:
            return None
        adapter = engine_adapter(self.spec, self.model, self.attention)
        if adapter is None:
            _logger.info(
                "%s (%s, %s attention) has no continuous-batching adapter: it generates whole "
                "batches with transformers' generate", self.spec.name, type(self.model).__name__,
                self.attention,
            )
            return None
        # The cgroup's and TEMPLATED_LLM_MEMORY_LIMIT's bound too, as in the memory check.
        available = available_memory(str(adapter.device))
        return Engine(self.model, self.tokenizer, adapter, self.config.engine_config(),
                      None if available is None else max(available.bytes, 0))

    def _prompt_tokens(self) -> PromptTokens:
        # Prompt plus max_tokens must fit the context, and on the engine one KV cache slot.
        limit, name = context_length(self.model), "the model's context"
        if self._engine is not None and (limit is None or self._engine.max_seq_len < limit):
            limit, name = self._engine.max_seq_len, (
                "what one sequence may hold in the engine (max_cache_tokens / max_num_seqs)")
        return PromptTokens(self.tokenizer, limit, add_special_tokens(self.spec), name, self.cache_tokens,
                            rows_alone=self._engine is not None or self._rows_alone)

    @property
    def engine(self) -> Engine | None:
        """The continuous-batching engine serving this model, if it runs on one."""
        return self._engine

    def render(self, rows: list[Row], variables: dict[str, str] | None = None) -> list[str]:
        """The exact text the model sees for each row: a prompt, or a list of chat messages.

        ``variables`` override the template variables' defaults (``system``, ...).
        """
        return [self.renderer.render(row, variables) for row in rows]

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        # MLflow hands a DataFrame; direct calls may also pass a list or dict (see inputs.py).
        # A DataFrame hint is one MLflow derives no schema from: our signature is explicit.
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame | dict[str, Any] | list[dict[str, Any]]:
        """Completions for every row: the ``candidates`` DataFrame or, for a model logged with
        an MLflow task, one OpenAI-shaped response per request (the response itself for one)."""
        with self.tracer.request() as trace:
            if self.config.task is not None:
                return self._predict_task(model_input, params, trace)
            completions, usage = self._complete_input(model_input, params, trace)
            frame = to_frame(completions, usage)
            trace.response(frame, completions)
            return frame

    def complete(self, model_input: Any, params: dict[str, Any] | None = None, *, first_row: int = 0
                 ) -> list[Completion]:
        """Every row's :class:`Completion` (text, token counts, finish reason), whatever task the
        model was logged with; ``model_input`` and ``params`` as ``predict`` takes them without
        a task. Traced as ``predict`` is. ``first_row``: the number a refusal gives the first
        row, for a caller that sends the rows of its own request a few at a time."""
        with self.tracer.request() as trace:
            completions, _ = self._complete_input(model_input, params, trace, first_row)
            trace.response([dataclasses.asdict(c) for c in completions], completions)
            return completions

    def predict_stream(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: Any,
        params: dict[str, Any] | None = None,
    ) -> Iterator[str]:
        """Yield the completion of one prompt (or one conversation) in chunks as it generates;
        for a model logged with an MLflow task, of one request body, with its params."""
        if (params or {}).get("return_usage"):
            with self._refusal_traced(body=model_input):
                raise MlflowException.invalid_parameter_value(
                    "param 'return_usage': predict_stream yields the text only, so it has no token counts "
                    "to return; call predict for them, or leave return_usage out")
        if self.config.task is not None:
            with self._refusal_traced(body=model_input):
                requests = read_task_requests(model_input, self.config.task, self.config.max_rows_per_request,
                                              stream=True)
                if len(requests) != 1 or len(requests[0].rows) != 1:
                    raise MlflowException.invalid_parameter_value(
                        f"predict_stream takes one request of one prompt; received {len(requests)} "
                        f"requests of {sum(len(r.rows) for r in requests)} prompts")
            return _text_only(self._stream(requests[0].rows, {**(params or {}), **requests[0].params}))
        return _text_only(self.generate_stream(model_input, params))

    def generate_stream(
        self, model_input: Any, params: dict[str, Any] | None = None, *, text: bool = True, first_row: int = 0
    ) -> Iterator[str | Completion]:
        """``predict_stream``'s text chunks, then the whole :class:`Completion` (text, token
        counts, finish reason). Input and params are checked before this returns; closing the
        iterator, or its ``cancel()`` from any thread, stops the generation. ``text=False``:
        the Completion only, for a caller who wants it whole but may cancel it (on the engine
        no text is then decoded at every step). ``first_row`` as :meth:`complete` takes it."""
        with self._refusal_traced(body=model_input):
            requests = self._requests(model_input, params, first_row)
            if len(requests) != 1 or len(requests[0][0]) != 1:
                raise MlflowException.invalid_parameter_value(
                    "predict_stream takes one prompt or conversation; received "
                    f"{sum(len(rows) for rows, _ in requests)}"
                )
        [(rows, params)] = requests
        return self._stream(rows, params, text, first_row)

    @contextlib.contextmanager
    def _refusal_traced(self, *, body: Any = None, rows: list[Row] | None = None) -> Iterator[None]:
        """A stream refused before it starts leaves an error trace, as a refused predict does,
        of what it was sent: its ``rows`` once they are read, else its ``body`` as received."""
        try:
            yield
        except Exception:
            with self.tracer.request() as trace:
                if rows is not None:
                    trace.rows(rows)
                else:
                    trace.body(body, chat=self.config.task == CHAT or has_messages(body))
                raise

    def _stream(self, rows: list[Row], params: dict[str, Any] | None, text: bool = True, first_row: int = 0
                ) -> Iterator[str | Completion]:
        with self._refusal_traced(rows=rows):
            variables, generation = self._params(params)
            grammar = self._grammar(generation)
            input_ids, generation, row_tokens = self._encode(self.render(rows, variables), generation, params,
                                                             first_row)
        if self._engine is not None:
            [sequence] = self._submit(input_ids, generation, grammar, row_tokens)
            chunks = Stream(_then_completion(sequence) if text else _completion_only(sequence),
                            sequence.cancel, cancel=sequence.cancel)
        else:
            batch = self.tokens.pad(input_ids, self.device)
            # The model alone for the whole stream: no batch runs beside it.
            chunks = stream(self.model, self.tokenizer, batch, generation, self.device,
                            self._batcher.lock, grammar)
            if not text:
                chunks = _completions_of(chunks)
        if self.spec.strip_output:
            chunks = _rechunked(chunks, stripped_stream)
        return self.tracer.stream(rows, generation, variables, chunks)

    def _submit(self, input_ids: list[list[int]], generation: GenerationParams, grammar: Grammar | None,
                row_tokens: list[int]) -> list[Sequence]:
        """Every row on the engine, each with its ``max_tokens``, or none: a row refused (a full
        queue) cancels the rows already queued."""
        capacity = self._engine.max_num_seqs + self._engine.config.max_waiting
        if len(input_ids) > capacity:  # all or none: more would be refused (429) every time
            raise MlflowException.invalid_parameter_value(
                f"the request has {len(input_ids)} rows; this model's engine holds at most {capacity} "
                f"sequences at once (max_num_seqs {self._engine.max_num_seqs} + max_waiting "
                f"{self._engine.config.max_waiting}). Send at most {capacity} rows per request")
        rows: list[Sequence] = []
        try:
            for ids, params in zip(input_ids, _rows_params(generation, row_tokens)):
                rows.append(self._engine.submit(ids, params, grammar))
        except BaseException as exc:
            for row in rows:
                row.cancel()
            if isinstance(exc, EngineFullError):
                raise MlflowException(str(exc), error_code=RESOURCE_EXHAUSTED) from None
            raise
        return rows

    def _predict_task(
        self, model_input: Any, params: dict[str, Any] | None, trace: RequestTrace
    ) -> dict[str, Any] | list[dict[str, Any]]:
        with trace.body_if_refused(model_input, chat=self.config.task == CHAT):
            requests = read_task_requests(model_input, self.config.task, self.config.max_rows_per_request)
        trace.rows([row for r in requests for row in r.rows], requests[0].params if len(requests) == 1 else None)
        # Each request (row) has its own params: its body's over the request's params.
        results = self._complete_all([(r.rows, {**(params or {}), **r.params}) for r in requests], trace)
        responses = [task_response(self.config.task, self.spec.name, completions) for completions, _ in results]
        response = responses[0] if len(responses) == 1 else responses
        trace.response(response, [c for completions, _ in results for c in completions])
        return response

    def _complete_input(
        self, model_input: Any, params: dict[str, Any] | None, trace: RequestTrace, first_row: int = 0
    ) -> tuple[list[Completion], bool]:
        """Every row's completion, and whether token counts were asked for (by any row)."""
        with trace.body_if_refused(model_input, chat=has_messages(model_input)):
            requests = self._requests(model_input, params, first_row)
        trace.rows([row for rows, _ in requests for row in rows])
        results = self._complete_all(requests, trace, first_row)
        return ([c for completions, _ in results for c in completions],
                any(generation.return_usage for _, generation in results))

    def _requests(self, model_input: Any, params: dict[str, Any] | None, first_row: int = 0
                  ) -> list[tuple[list[Row], dict[str, Any] | None]]:
        """The input's requests, each with its params: those a dict body or a DataFrame row
        sets, over ``params``."""
        model_input, params = self._body_params(model_input, params)
        return [(rows, {**(params or {}), **own} if own else params) for rows, own
                in read_requests(model_input, self._param_names, self.config.max_rows_per_request, first_row)]

    def _complete_all(
        self, requests: list[tuple[list[Row], dict[str, Any] | None]], trace: RequestTrace, first_row: int = 0
    ) -> list[tuple[list[Completion], GenerationParams]]:
        """Every request's completions, each with its own params: all are checked before any
        generates, then all generate at once (side by side on the engine)."""
        prepared = []
        for index, (rows, params) in enumerate(requests):
            with request_at(index, len(requests)):
                prepared.append(self._prepare(rows, params, trace, first_row))
        with trace.generation([ids for input_ids, *_ in prepared for ids in input_ids]) as stage:
            completions = self._generate_all(prepared)
            if self.spec.strip_output:
                completions = [[stripped(c) for c in request] for request in completions]
            stage.generated([c for request in completions for c in request])
        return [(request, generation) for request, (_, generation, *_) in zip(completions, prepared)]

    def _prepare(self, rows: list[Row], params: dict[str, Any] | None, trace: RequestTrace, first_row: int
                 ) -> tuple[list[list[int]], GenerationParams, Grammar | None, list[int]]:
        """A request's token ids, params, grammar and each row's ``max_tokens``; raises a 400
        for anything it cannot be."""
        variables, generation = self._params(params)
        row_tokens = None
        try:
            grammar = self._grammar(generation)  # an invalid schema is a 400 before anything runs
            with trace.rendering(rows) as stage:
                prompts = self.render(rows, variables)
                stage.rendered(prompts)
            input_ids, generation, row_tokens = self._encode(prompts, generation, params, first_row)
        finally:
            trace.params(generation, variables, row_tokens)  # as generated, or as refused
        return input_ids, generation, grammar, row_tokens

    def _generate_all(self, prepared: list[tuple[list[list[int]], GenerationParams, Grammar | None, list[int]]]
                      ) -> list[list[Completion]]:
        if self._engine is None:
            return [self._whole_batches(input_ids, generation, row_tokens)
                    for input_ids, generation, _, row_tokens in prepared]
        results: list[list[Completion]] = []
        waiting, running = list(prepared), collections.deque()
        try:
            while waiting or running:
                # Queue what the engine takes; when it is full, the call's own oldest request
                # frees room as it ends (full with others' work alone, the call is refused).
                while waiting:
                    try:
                        running.append(self._submit(*waiting[0]))
                    except MlflowException as exc:
                        if exc.error_code != ErrorCode.Name(RESOURCE_EXHAUSTED) or not running:
                            raise
                        break
                    waiting.pop(0)
                results.append([sequence.result() for sequence in running.popleft()])
            return results
        except BaseException:
            # A refused or failed request fails the call: what else it queued stops.
            for sequences in running:
                for sequence in sequences:
                    sequence.cancel()
            raise

    def _whole_batches(self, input_ids: list[list[int]], generation: GenerationParams, row_tokens: list[int]
                       ) -> list[Completion]:
        if len(set(row_tokens)) == 1:
            return list(self._batcher.submit(input_ids, generation))
        # Rows fitted each to its own length (they generate one at a time: LongRoPE) go apart.
        return [completion for ids, params in zip(input_ids, _rows_params(generation, row_tokens))
                for completion in self._batcher.submit([ids], params)]

    def _body_params(self, model_input: Any, params: dict[str, Any] | None) -> tuple[Any, dict[str, Any] | None]:
        """A dict input's fields named as params (``{"messages": ..., "max_tokens": 5}``), taken
        as params over ``params``: what MLflow's scoring server does with that body. Other
        fields beside the prompts are refused rather than ignored."""
        if not isinstance(model_input, dict):
            return model_input, params
        names = self._param_names
        body = {k: v for k, v in model_input.items() if k in names}
        refuse_unknown([str(k) for k in model_input if k not in (PROMPT_COLUMN, MESSAGES_COLUMN)], names, "fields")
        if not body:
            return model_input, params
        return {k: v for k, v in model_input.items() if k not in names}, {**(params or {}), **body}

    @property
    def _param_names(self) -> set[str]:
        return {*GenerationParams.model_fields, *self.spec.template_variables}

    def _params(self, params: dict[str, Any] | None) -> tuple[dict[str, str], GenerationParams]:
        return read_params(params, self.spec.template_variables, self.config.generation_defaults,
                           self.config.max_tokens_limit)

    def _encode(self, prompts: list[str], generation: GenerationParams, params: dict[str, Any] | None,
                first_row: int) -> tuple[list[list[int]], GenerationParams, list[int]]:
        """The prompts' token ids, ``generation`` with the largest ``max_tokens`` they leave room
        for, and each row's: a caller who sent none gets the default, or less where the context
        is short."""
        fit = (params or {}).get("max_tokens") is None
        input_ids, row_tokens = self.tokens.encode(prompts, generation.max_tokens, fit, first_row)
        return input_ids, generation.model_copy(update={"max_tokens": max(row_tokens)}), row_tokens

    def _grammar(self, generation: GenerationParams) -> Grammar | None:
        """The compiled grammar of the request's response_format (cached); None for text."""
        return self.structured.compile(generation.response_format)

    def _generate(self, input_ids: list[list[int]], generation: GenerationParams) -> list[Completion]:
        # A seeded row draws from its own seeded generator, as on the engine: what it gets alone.
        alone = self._rows_alone or (generation.seed is not None and not generation.greedy)
        batches = [[ids] for ids in input_ids] if alone else [input_ids]
        return [completion for ids in batches for completion in generate_completions(
            self.model, self.tokenizer, self.tokens.pad(ids, self.device), generation, self.device,
            self._grammar(generation))]


def _rows_params(generation: GenerationParams, row_tokens: list[int]) -> list[GenerationParams]:
    """``generation`` for each row, with the row's ``max_tokens``."""
    return [generation if max_tokens == generation.max_tokens else
            generation.model_copy(update={"max_tokens": max_tokens}) for max_tokens in row_tokens]


def _then_completion(sequence: Sequence) -> Iterator[str | Completion]:
    # Closing this closes the sequence's stream, which cancels it in the engine.
    yield from sequence.stream()
    # The text can end (at a stop string) a step before the engine has ended the sequence.
    yield sequence.result()


def _completion_only(sequence: Sequence) -> Iterator[Completion]:
    # No text chunks: the sequence is not marked streaming, so the engine decodes it once.
    yield sequence.result()


def _text_only(chunks: Iterator[str | Completion]) -> Iterator[str]:
    return _rechunked(chunks, lambda inner: (chunk for chunk in inner if isinstance(chunk, str)))


def _completions_of(chunks: Iterator[str | Completion]) -> Iterator[Completion]:
    return _rechunked(chunks, lambda inner: (chunk for chunk in inner if isinstance(chunk, Completion)))


def _rechunked(chunks: Iterator[str | Completion],
               transform: Callable[[Iterator[str | Completion]], Iterator[Any]]) -> Iterator[Any]:
    """``transform(chunks)`` as a stream that closes and cancels as ``chunks`` does."""
    def kept() -> Iterator[Any]:
        with contextlib.closing(chunks):  # closing this stops the generation
            yield from transform(chunks)
    return Stream(kept(), chunks.close, cancel=getattr(chunks, "cancel", None))
