"""OpenAI chat and completions: requests (translating themselves into core sampling parameters and steering
specs) and responses, streamed or whole."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from server.protocol.common import AppliedSteering, SteeringRequest, Strict, Usage
from steering.errors import InvalidRequestError
from steering.sampling import MAX_LOGIT_BIAS, MIN_REPETITION_PENALTY, SamplingParams, StructuredOutput
from steering.spec import SteeringSpec
from steering.tools import ToolSpec, check_tools, closed, named_schema, required_schema


class StreamOptions(Strict):
    include_usage: bool = False


class JsonSchemaSpec(Strict):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    """The JSON Schema the output follows (absent: any JSON value)."""
    strict: bool | None = None
    """The output always follows the schema here (constrained decoding); with strict, objects that do not say
    otherwise allow no other keys (``additionalProperties: false``), as OpenAI's strict mode requires."""


class TextFormat(Strict):
    type: Literal["text"]


class JsonObjectFormat(Strict):
    type: Literal["json_object"]


class JsonSchemaFormat(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class StructuredOutputs(Strict):
    """vLLM's extension: decode under a JSON schema, a regular expression, a list of choices or an EBNF grammar
    (exactly one)."""

    model_config = ConfigDict(populate_by_name=True)

    json_: dict[str, Any] | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: Annotated[str, Field(min_length=1)] | None = None
    choice: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = None
    grammar: Annotated[str, Field(min_length=1)] | None = None

    def to_core(self) -> StructuredOutput:
        out = StructuredOutput(json_schema=self.json_, json_object=bool(self.json_object), regex=self.regex,
                               choice=None if self.choice is None else tuple(self.choice), grammar=self.grammar)
        out.kind()
        return out


def _logit_bias(value: dict[str, float] | None) -> dict[str, float] | None:
    for key, bias in (value or {}).items():
        if not key.lstrip("-").isdigit():
            raise ValueError(f"logit_bias keys are token ids (integers as strings); got {key!r}")
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
    return value


def _metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is not None and (len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())):
        raise ValueError("metadata holds at most 16 pairs, keys of at most 64 and values of at most 512 characters")
    return value


def _no_store(value: bool | None) -> bool | None:
    if value:
        raise ValueError("this server keeps no stored completions: store must be false or absent")
    return value


class GenerationFields(Strict):
    """What chat and completion requests share: the model, sampling, streaming and steering."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=10)
    logit_bias: Annotated[dict[str, float], AfterValidator(_logit_bias)] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    user: str | None = None
    store: Annotated[bool, AfterValidator(_no_store), Field(json_schema_extra={"const": False})] | None = None
    """Accepted as false: this server keeps no stored completions."""
    metadata: Annotated[dict[str, str], AfterValidator(_metadata)] | None = None
    """Accepted (OpenAI's tags for stored completions, which this server does not keep); written to the log."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    steering: SteeringRequest | None = None

    @model_validator(mode="after")
    def _one_structure(self) -> GenerationFields:
        if self.structured_outputs is not None and self.response_format is not None and \
                self.response_format.type != "text":
            raise ValueError("give response_format or structured_outputs, not both")
        return self

    def structured(self) -> StructuredOutput | None:
        """The constrained decoding the request asks for, if any."""
        if self.structured_outputs is not None:
            return self.structured_outputs.to_core()
        rf = self.response_format
        if isinstance(rf, JsonObjectFormat):
            return StructuredOutput(json_object=True)
        if isinstance(rf, JsonSchemaFormat):
            schema = rf.json_schema.schema_
            if schema is None:
                return StructuredOutput(json_object=True)
            return StructuredOutput(json_schema=closed(schema) if rf.json_schema.strict else schema)
        return None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def steering_spec(self) -> SteeringSpec | None:
        return None if self.steering is None else self.steering.to_core()

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_sampling(self, max_tokens: int, logprobs: bool, top_logprobs: int,
                    structured: StructuredOutput | None = None,
                    prompt_logprobs: int | None = None) -> list[SamplingParams]:
        """One set of sampling parameters per choice (``n``); choice i samples with ``seed + i``."""
        base: dict[str, Any] = dict(
            max_tokens=max_tokens, min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=0 if self.top_k is None else self.top_k,
            stop=self.stop_list(), stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            logprobs=logprobs, top_logprobs=top_logprobs,
            frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            structured=structured if structured is not None else self.structured(),
            prompt_logprobs=prompt_logprobs,
        )
        return [SamplingParams(seed=None if self.seed is None else (self.seed + i) % 2**63, **base)
                for i in range(self.n)]


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageURL(Strict):
    url: Annotated[str, Field(min_length=1)]
    """A ``data:`` URL (``data:image/png;base64,...``), or a file in a directory the server allows
    (``--image-dirs``). Never fetched from the network: an ``http(s)`` URL is refused."""
    detail: Literal["auto"] | None = None
    """Only ``auto``: the model's own image processor decides the resolution."""


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(Strict):
    name: str
    arguments: str
    """JSON text of the arguments object."""


class MessageToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    """Text, or parts: text and (for a vision-language model) images."""
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    """An assistant's earlier calls (then ``content`` may be null)."""
    tool_call_id: str | None = None
    """A tool message: the call it answers."""

    @model_validator(mode="after")
    def _content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only on an assistant message with tool_calls)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def text(self) -> str:
        """The message's text (its text parts joined; images left out)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def content_core(self, index: int) -> str | list[dict[str, Any]]:
        """The content as the core takes it: text, or parts with each image still a URL (loaded and checked off the
        event loop, :func:`steering.multimodal.load_message_images`)."""
        if not isinstance(self.content, list) or not any(isinstance(p, ImagePart) for p in self.content):
            return self.text()
        return [{"type": "text", "text": p.text} if isinstance(p, TextPart) else
                {"type": "image_url", "url": p.image_url.url, "param": f"messages[{index}].content[{j}].image_url"}
                for j, p in enumerate(self.content)]

    def to_core(self, index: int = 0) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content_core(index)}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            out["name"] = self.name
        return out


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    return [m.to_core(i) for i, m in enumerate(messages)]


class FunctionDef(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """JSON Schema of the arguments object (absent: no arguments)."""
    strict: bool | None = None
    """Accepted; forced calls (``tool_choice`` required or named) always follow the schema here."""


class ToolDef(Strict):
    type: Literal["function"]
    function: FunctionDef

    def to_core(self) -> ToolSpec:
        f = self.function
        return ToolSpec(f.name, f.description or "", f.parameters or {"type": "object", "properties": {}})


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


ToolMode = Literal["none", "auto", "required", "named"]


class ChatCompletionRequest(GenerationFields):
    model_config = ConfigDict(json_schema_extra={
        "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}},
        "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}})

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: Annotated[list[ToolDef], Field(min_length=1, max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    def tool_specs(self) -> list[ToolSpec]:
        specs = [t.to_core() for t in self.tools or []]
        check_tools(specs)
        return specs

    def tool_mode(self) -> ToolMode:
        """How the tools are used: ``none`` (not offered), ``auto`` (offered, calls parsed from the text),
        ``required`` / ``named`` (a call decoded under its JSON schema)."""
        choice = self.tool_choice
        if not self.tools:
            if choice not in (None, "none"):
                raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
            return "none"
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in {t.function.name for t in self.tools}:
                raise InvalidRequestError(f"tool_choice names the function {choice.function.name!r}, which is not "
                                          "among the tools", param="tool_choice")
            mode: ToolMode = "named"
        else:
            mode = choice or "auto"
        if mode in ("required", "named") and self.structured() is not None:
            raise InvalidRequestError("a forced tool call is decoded under its own schema: give tool_choice "
                                      "'required' or a function, or response_format, not both",
                                      param="tool_choice")
        return mode

    def tool_structure(self, mode: ToolMode) -> StructuredOutput | None:
        """The schema a forced call is decoded under."""
        specs = self.tool_specs()
        if mode == "required":
            return StructuredOutput(json_schema=required_schema(specs, self.parallel_tool_calls is not False))
        if mode == "named":
            assert isinstance(self.tool_choice, NamedToolChoice)
            spec = next(t for t in specs if t.name == self.tool_choice.function.name)
            return StructuredOutput(json_schema=named_schema(spec))
        return None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Text = Annotated[str, Field(min_length=1)]


class CompletionRequest(GenerationFields):
    prompt: Text | TokenIds | Annotated[list[Text], Field(min_length=1)] | \
        Annotated[list[TokenIds], Field(min_length=1)]
    """A text, token ids, or a batch of either: each prompt gets ``n`` choices, indexed prompt by prompt."""
    max_tokens: int | None = Field(None, ge=0)
    """0 generates nothing: with ``echo``, it scores the prompt."""
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    """Return the prompt before each completion (and, with ``logprobs``, its tokens' log-probabilities)."""

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)  # type: ignore[arg-type]


# -- responses -----------------------------------------------------------------------------------------------------
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry]


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] = []


class Choice(BaseModel):
    index: int
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatChoice(Choice):
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    steering: list[AppliedSteering] | None = None


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(Choice):
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    steering: list[AppliedSteering] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    """None for the first prompt token of an echo (nothing precedes it)."""
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []

    def extend(self, other: CompletionLogprobs) -> CompletionLogprobs:
        return CompletionLogprobs(tokens=self.tokens + other.tokens,
                                  token_logprobs=self.token_logprobs + other.token_logprobs,
                                  top_logprobs=self.top_logprobs + other.top_logprobs,
                                  text_offset=self.text_offset + other.text_offset)


class CompletionChoice(Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    steering: list[AppliedSteering] | None = None
