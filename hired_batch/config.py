"""Every configuration dataclass of the package (frozen, one per concern, each field
with its default and a comment), written once: flags and YAML options map onto these
fields (``hired_batch.job.options``) and their help texts read the defaults from here.

Validation lives in ``check()`` methods that raise ConfigError naming what was expected
and what came, so bad configuration fails before any work starts. This module imports
nothing heavy (no torch, no Ray) so the CLI can validate flags instantly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

# The selectors the CLI offers: the modules of engine/selectors/ (a test keeps them equal; config imports no torch).
SELECTORS = ("hired", "full", "spatial", "random")
MODES = ("exact", "reference")
DTYPES = ("auto", "float32", "float16", "bfloat16")
ENGINES = ("hf", "vllm")  # generation engines: transformers generate | vLLM with the HiRED plugin
SUPPORTED_MODEL_TYPES = ("llava_next", "llava")  # transformers model_type values the engine runs
QUESTION_FIELD = "question"  # the one field a --prompt template may use: the row's question


class ConfigError(ValueError):
    """A user mistake (a flag, an option, an input path, a model that is not LLaVA): the
    CLI prints it as one line and exits 2. Any other exception is a bug and keeps its
    traceback. A ValueError subclass, so callers that catch ValueError still catch it."""


def _is_number(v) -> bool:
    """An int or float, not a bool (YAML and JSON can carry either where a number belongs)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_vision_chunk(vision_chunk) -> int:
    """Crops per vision-tower call, as an int >= 1; ConfigError otherwise."""
    if int(vision_chunk) < 1:
        raise ConfigError(f"vision_chunk must be >= 1 crop, got {vision_chunk!r}")
    return int(vision_chunk)


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


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

    selector: str = "hired"  # hired | full (stock LLaVA) | spatial | random
    mode: str = "exact"  # exact (budget met to the token) | reference (published masks)
    budget: float = 0.2  # fraction of the P*576 CLIP patch tokens kept, in (0, 1]
    budget_tokens: int | None = None  # if set: visual tokens kept per image, overrides budget
    alpha: float = 0.5  # share of the budget given to the full image, in [0, 1]
    seed: int = 0  # seed of the `random` selector
    return_indices: bool = False  # report the kept token indices per item

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
        return self

    @property
    def budget_arg(self):
        """The budget as the selectors take it: an int count or a float fraction."""
        return int(self.budget_tokens) if self.budget_tokens is not None else float(self.budget)


@dataclass(frozen=True)
class GenerationConfig:
    """How answers are decoded."""

    max_new_tokens: int = 64  # tokens generated per item at most
    min_new_tokens: int = 0  # EOS suppressed before this many (bench: = max_new_tokens)
    temperature: float = 0.0  # 0 = greedy; > 0 samples
    top_p: float = 1.0  # nucleus sampling mass when sampling
    top_k: int = 0  # when sampling, only the k most likely tokens; 0 = all (vLLM's convention)
    # Tokens already in the prompt or the answer so far: positive logits divided by it,
    # negative ones multiplied (vLLM's and HF's rule, greedy too); 1 = off, > 1 discourages repeats.
    repetition_penalty: float = 1.0
    stop: tuple = ()  # strings that end the answer, which then holds the text before the first one (not it)
    system_prompt: str | None = None  # system message put before the question by the chat template
    seed: int | None = None  # torch seed set before each batch when sampling

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
        if self.system_prompt is not None and (not isinstance(self.system_prompt, str)
                                               or not self.system_prompt.strip()):
            raise ConfigError(f"system_prompt must be a non-empty string, got {self.system_prompt!r}")
        return self

    @property
    def do_sample(self) -> bool:
        return float(self.temperature) > 0


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint, on which device, in which precision."""

    path: str = "llava-hf/llava-v1.6-vicuna-7b-hf"  # hub id or local checkpoint directory
    dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | float32 | float16 | bfloat16
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    vision_chunk: int = 8  # image crops per vision-tower call: caps CLIP's activations at any batch size
    engine: str = "hf"  # hf (transformers generate, static batches) | vllm (vLLM + HiRED plugin, continuous batching)
    max_model_len: int | None = None  # vllm: context per sequence the engine plans for (None: the checkpoint's)

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

    # pixels (width * height), checked from the file header before any decoding, so a
    # decompression bomb costs a header read. PIL's own guard (2 * Image.MAX_IMAGE_PIXELS,
    # about 179 M px by default) still refuses anything above it whatever this says.
    max_pixels: int = 64_000_000
    # px; the shorter side must be at least this long (a 1x1 image is refused)
    min_side: int = 2
    # long side / short side (dimensionless); strips beyond this are refused
    max_aspect_ratio: float = 50.0
    # characters after stripping; a cheap early refusal, the model layer counts tokens
    max_question_chars: int = 20_000
    # s; one try at reading an image URL (http(s), s3: anything over the network; local
    # paths are read directly) may take at most this long; a timed-out read is tried once
    # more, then the row is an error row, so a URL that never answers holds its batch for
    # two timeouts, not the client's ~10 minutes
    image_timeout: float = 30.0

    def __post_init__(self):
        for name in ("max_pixels", "min_side", "max_question_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"DecodeLimits.{name} must be an int >= 1, got {value!r}")
        if not (isinstance(self.max_aspect_ratio, (int, float)) and self.max_aspect_ratio >= 1):
            raise ConfigError(
                f"DecodeLimits.max_aspect_ratio must be a number >= 1, got {self.max_aspect_ratio!r}")
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

    endpoint: str | None = None  # e.g. http://127.0.0.1:9000; None = AWS / AWS_ENDPOINT_URL_S3


@dataclass(frozen=True)
class ColumnSpec:
    """How input columns map to the job's fields."""

    id_column: str = "id"  # unique row id column (generated as file#row when absent)
    # id_column came from --id-column (not the default or a --task), so advice may say to drop it
    id_column_given: bool = False
    image_column: str = "image"  # bytes, {bytes, path} struct, or a path/URL string
    question_column: str | None = "question"  # None: the prompt alone is the question
    prompt: str | None = None  # fixed instruction, or a template with {question}; literal braces as {{ }}
    keep_columns: tuple = ()  # passed through unchanged to the output
    task: str | None = None  # benchmark preset whose prompt template renders the question
    prompt_columns: tuple = ()  # extra input columns that template reads (e.g. hint, choices)
    storage_options: dict = field(default_factory=dict)  # fsspec options for image paths/URLs

    def check(self) -> "ColumnSpec":
        """Raise ConfigError when no question can be built; return self. (The ``prompt``
        template itself is checked by ``job.stages.check_prompt``, which parses it.)"""
        if self.question_column is None and not self.prompt:
            raise ConfigError("without a question column a --prompt is required (e.g. 'Describe the image.')")
        return self

    @property
    def prompt_fields_allowed(self) -> tuple[str, ...]:
        """Fields a ``--prompt`` template may use: {question} when there is a question column."""
        return (QUESTION_FIELD,) if self.question_column is not None else ()


@dataclass(frozen=True)
class Resources:
    """How much of the cluster the job uses."""

    batch_size: int | str = 8  # items per generate call, or "auto": the most that fit memory_limit
    window: int = 64  # with "auto": rows per Ray batch, grouped by planned prompt length inside; caps the auto batch
    memory_limit: str | int | None = None  # with "auto": bytes a batch may use ("24GB"); None = free device memory
    min_actors: int = 1  # GPU actors at least (autoscaling lower bound)
    max_actors: int = 1  # GPU actors at most
    gpus_per_actor: float | None = None  # GPUs each generation actor reserves; None: 1 if the cluster has GPUs, else 0
    tensor_parallel_size: int = 1  # vllm engine: GPUs one engine shards the model over (= gpus_per_actor on GPUs)
    generate_cpus: float = 0.25  # CPUs each generation actor reserves (it mostly waits on its GPU)
    preprocess_cpus: float = 0.5  # CPUs per preprocessing actor
    preprocess_actors: int = 1  # preprocessing actors (they overlap GPU work)
    generate_memory: str | int | None = None  # host memory each generation actor reserves in Ray ("16GB"); None = none
    rows_per_file: int = 10_000  # output rows per Parquet file at most

    def check(self) -> "Resources":
        """Raise ConfigError on an out-of-range field; return self."""
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ConfigError(f"batch_size must be >= 1 or 'auto', got {self.batch_size!r}")
        if self.window < 1:
            raise ConfigError(f"window must be >= 1, got {self.window}")
        if not (1 <= self.min_actors <= self.max_actors):
            raise ConfigError(f"need 1 <= min_actors <= max_actors, got {self.min_actors}, {self.max_actors}")
        gpus = self.gpus_per_actor or 0
        if isinstance(self.tensor_parallel_size, bool) or not isinstance(self.tensor_parallel_size, int) \
                or self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        if gpus and self.tensor_parallel_size > 1 and gpus != self.tensor_parallel_size:
            raise ConfigError(f"--tensor-parallel-size {self.tensor_parallel_size} shards the model over that many "
                             f"GPUs of one actor, but --gpus-per-actor is {gpus:g}: give them equal")
        if gpus > 1 and self.tensor_parallel_size == 1:
            # the engine puts the whole model on one device; a second GPU would sit idle
            raise ConfigError(f"--gpus-per-actor {self.gpus_per_actor:g}: each generation actor runs the model on "
                             "one GPU; use --num-actors N to use N GPUs (values up to 1 share a GPU)")
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

    # failed rows / all rows in the output above which the job fails; in [0, 1]. 1.0: only
    # when every row failed (0: any failed row fails the job)
    max_failed_fraction: float = 1.0
    # an input row group that cannot be decoded: False = the job ends naming it (fix or
    # remove the file, then resume); True = its rows are counted as lost. Either way the
    # other rows are written and the exit is 1
    skip_unreadable: bool = False

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

    inputs: tuple = ()  # Parquet files/dirs/globs (local or s3://), hf:NAME[:CONFIG][:SPLIT], or a save_to_disk dir
    output: str = ""  # output directory, local or s3://
    columns: ColumnSpec = field(default_factory=ColumnSpec)  # input column mapping
    model: ModelConfig = field(default_factory=ModelConfig)  # checkpoint, dtype, device
    selection: SelectionConfig = field(default_factory=SelectionConfig)  # HiRED knobs
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # decoding knobs
    resources: Resources = field(default_factory=Resources)  # cluster usage
    limits: DecodeLimits = field(default_factory=DecodeLimits)  # per-row input limits
    s3: S3Options = field(default_factory=S3Options)  # S3 endpoint
    checkpoint: str | None = None  # Ray Data checkpoint dir (local or s3://) for resume
    overwrite: bool = False  # delete Parquet files already in the output dir before running
    failures: FailurePolicy = field(default_factory=FailurePolicy)  # when a finished run exits 1
