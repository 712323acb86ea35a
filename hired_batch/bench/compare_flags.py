"""The engine comparison's flags (``bench --engine hf,vllm``): what they add to ``bench``,
their defaults, the checks that run before anything loads, and the workloads they name."""

from __future__ import annotations

from dataclasses import dataclass

from hired_batch.bench.workload import CAPTIONS, DRAWN_SHORTEST, QUESTIONS, Spec, parse_selectors
from hired_batch.config import ENGINES, ConfigError

DEFAULT_LONG_NEW_TOKENS = 64
# Defaults of the engine comparison, and the smaller ones --quick uses (a flag given explicitly wins).
COMPARE_DEFAULTS = dict(selectors="full,hired:0.2", batch_sizes="4", repeats=3, workloads="short,long")
COMPARE_QUICK = dict(selectors="full,hired:0.2", batch_sizes="2", repeats=1, workloads="short,long")
# How the answers of a workload end (Workload.lengths); --long-lengths picks the long workload's.
LENGTHS = {"fixed": "EOS suppressed", "eos": "stop at EOS", "drawn": "drawn lengths, forced"}


@dataclass(frozen=True)
class Workload:
    """One kind of request of the comparison."""

    name: str  # short | long
    questions: tuple  # prompts cycled over the items
    max_new_tokens: int  # decode budget per item (drawn lengths: the longest one drawn)
    lengths: str  # fixed: EOS suppressed, every item decodes max_new_tokens; eos: each answer stops at
    #   EOS; drawn: each item's length drawn from [DRAWN_SHORTEST, max_new_tokens] and forced (EOS at it)

    def limits(self, answer_len: int | None) -> tuple[int, int]:
        """(max, min) new tokens of one item of this workload (answer_len: its drawn length)."""
        if self.lengths == "drawn":
            return answer_len, answer_len
        return self.max_new_tokens, self.max_new_tokens if self.lengths == "fixed" else 0


def add_flags(p) -> None:
    """The comparison's own flags (``bench`` adds them next to its own)."""
    p.add_argument(
        "--engine",
        default="hf",
        help="comma list of generation engines, hf and/or vllm (default hf: the selector sweep). "
        "With vllm: stock vLLM for 'full', the HiRED plugin otherwise, the same items through "
        "every engine x selector on two workloads (needs vllm installed)",
    )
    p.add_argument(
        "--workloads",
        help="with --engine ...vllm: comma list of short (VQA, --max-new-tokens, "
        "fixed length) and long (captions, at most --long-new-tokens, uneven); "
        f"default {COMPARE_DEFAULTS['workloads']}",
    )
    p.add_argument(
        "--long-new-tokens",
        type=int,
        help=f"the long workload's max new tokens (default {DEFAULT_LONG_NEW_TOKENS}, no minimum)",
    )
    p.add_argument(
        "--long-lengths",
        choices=("eos", "drawn"),
        help="how the long workload's answers end: eos (a real checkpoint's own EOS; default with "
        "--model) or drawn (each item's length drawn uniformly from "
        f"[{DRAWN_SHORTEST}, --long-new-tokens] and forced; default with a preset, whose random "
        "weights never emit EOS)",
    )


def parse_engines(text: str) -> list[str]:
    """'hf,vllm' -> ['hf', 'vllm'] (order kept, no repeats)."""
    out = list(dict.fromkeys(p.strip() for p in str(text).split(",") if p.strip()))
    bad = [e for e in out if e not in ENGINES]
    if bad or not out:
        raise ConfigError(f"--engine: expected a comma list of {ENGINES}, got {text!r}")
    return out


def compares(args) -> bool:
    """True when ``bench`` runs the engine comparison (``--engine`` names vllm); with the
    HF engine alone the plain sweep runs, which refuses the comparison's own flags."""
    if "vllm" in parse_engines(args.engine):
        return True
    for flag, value in (
        ("--workloads", args.workloads),
        ("--long-new-tokens", args.long_new_tokens),
        ("--long-lengths", args.long_lengths),
    ):
        if value is not None:
            raise ConfigError(f"{flag} belongs to the engine comparison: add --engine hf,vllm (or vllm)")
    return False


def check_args(args) -> tuple[list[str], list[Spec], int, list[Workload]]:
    """(engines, specs, batch size, workloads) of a comparison; ConfigError on a bad flag.

    Every flag is checked before vLLM's presence, so a typo is named even where vLLM
    is missing; nothing is loaded here.
    """
    engines = parse_engines(args.engine)
    defaults = COMPARE_QUICK if args.quick else COMPARE_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    specs = parse_selectors(args.selectors)
    sizes = [s.strip() for s in args.batch_sizes.split(",") if s.strip()]
    if len(sizes) != 1 or not sizes[0].isdigit() or int(sizes[0]) < 1:
        raise ConfigError(
            f"--batch-sizes: --engine {args.engine} takes one batch size, an int >= 1 (vLLM's "
            f"concurrent sequences, the HF engine's batch), got {args.batch_sizes!r}"
        )
    if args.ideal_only:
        raise ConfigError(f"--ideal-only is not available with --engine {args.engine}; use --engine hf")
    if args.mode != "exact":
        raise ConfigError(
            f"--mode {args.mode}: the vLLM plugin runs exact mode only (reference mode's token "
            "count depends on the attention, vLLM places placeholders first)"
        )
    if args.long_new_tokens is None:
        args.long_new_tokens = DEFAULT_LONG_NEW_TOKENS
    if args.long_lengths is None:
        args.long_lengths = "eos" if args.model else "drawn"
    for name in ("max_new_tokens", "long_new_tokens", "repeats", "vision_chunk"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    if args.items is not None and args.items < 1:
        raise ConfigError(f"--items must be >= 1, got {args.items}")
    workloads = parse_workloads(args)
    if args.pipeline and not (any(s.selector != "full" for s in specs) and "short" in [w.name for w in workloads]):
        raise ConfigError(
            "--pipeline with --engine vllm runs the vLLM + HiRED rows of the short workload through "
            f"the Ray job: it needs a HiRED selector and the short workload, got --selectors "
            f"{args.selectors} --workloads {args.workloads}"
        )
    from hired_batch.engine.vllm import check_installed

    check_installed()  # one line naming the extras, before any model loads
    return engines, specs, int(sizes[0]), workloads


def parse_workloads(args) -> list[Workload]:
    """--workloads -> Workloads (short: VQA, fixed length; long: captions, --long-lengths)."""
    known = {
        "short": Workload("short", tuple(QUESTIONS), args.max_new_tokens, "fixed"),
        "long": Workload("long", tuple(CAPTIONS), args.long_new_tokens, args.long_lengths),
    }
    names = list(dict.fromkeys(p.strip() for p in args.workloads.split(",") if p.strip()))
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise ConfigError(f"--workloads: expected a comma list of {sorted(known)}, got {args.workloads!r}")
    return [known[n] for n in names]
