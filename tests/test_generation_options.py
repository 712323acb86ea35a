"""Generation options users of vLLM expect (top-k, repetition penalty, stop strings, a
system prompt) on the HF engine, with vLLM 0.32's meaning; their flags and YAML keys
fail fast; the job's output schema does not change."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from support.cli import run_before_ray
from support.images import noise_images

from hired_batch.cli import build_parser
from hired_batch.config import ConfigError, GenerationConfig, ModelConfig, SelectionConfig
from hired_batch.engine.generation_rules import RepetitionPenalty, stop_cut
from hired_batch.engine.hf import HiredEngine
from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image
from hired_batch.engine.weights import FALLBACK_SYSTEM, FALLBACK_TEMPLATE, Preprocessor, chat_prompt, load_llava
from hired_batch.job.stages import OUTPUT_FIELDS, ColumnSpec, GenerateStage, PreprocessStage

SIZES = [(336, 336), (300, 800), (500, 300)]  # (h, w): mixed, so the batch is left-padded
QUESTIONS = ["What is this?", "How many cats are there in the picture?", "Color?"]
SYSTEM = "You are a careful assistant."


def images(sizes=SIZES, seed=0):
    return noise_images(sizes, seed)


@pytest.fixture(scope="module")
def loaded(tiny_next):
    return load_llava(ModelConfig(path=str(tiny_next)))


@pytest.fixture(scope="module")
def greedy(loaded):
    """The plain greedy answers of the default batch (HiRED-20 %, 12 tokens)."""
    return answer(loaded)


def answer(loaded, imgs=None, qs=QUESTIONS, selection=SelectionConfig(), **gen):
    model, proc = loaded
    eng = HiredEngine(model, proc, selection, GenerationConfig(**{"max_new_tokens": 12, **gen}))
    return eng.generate(imgs or images(), qs).items


def texts(items):
    return [i["answer"] for i in items]


# --------------------------------------------------------------------------- top-k


def test_top_k_1_samples_the_greedy_answer(loaded, greedy):
    assert texts(answer(loaded, temperature=1.0, seed=3)) != texts(greedy)  # sampling alone wanders off
    assert texts(answer(loaded, temperature=1.0, seed=3, top_k=1)) == texts(greedy)


# --------------------------------------------------------------------------- repetition penalty


def test_repetition_penalty_follows_the_rule_on_prompt_and_answer_ids():
    """vLLM's rule on a hand-made step: prompt ids (padding excluded) and answer ids so
    far are penalized, positive logits divided, negative ones multiplied."""
    pad = 9
    prompt = torch.tensor([[pad, pad, 1, 2], [3, 4, 5, 1]])
    attn = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    proc = RepetitionPenalty(prompt, attn, 2.0)
    scores = torch.tensor([[1.0, 4.0, -3.0, 2.0, 0.0, 6.0, -1.0, 8.0, 1.0, 5.0]] * 2)
    first = proc(torch.empty(2, 0, dtype=torch.long), scores.clone())
    assert first[0].tolist() == [1.0, 2.0, -6.0, 2.0, 0.0, 6.0, -1.0, 8.0, 1.0, 5.0]  # 1, 2; not the pad 9
    assert first[1].tolist() == [1.0, 2.0, -3.0, 1.0, 0.0, 3.0, -1.0, 8.0, 1.0, 5.0]  # 1, 3, 4, 5
    second = proc(torch.tensor([[7], [6]]), scores.clone())  # each row's answer so far
    assert second[0, 7] == 4.0 and second[1, 6] == -2.0 and second[0, 6] == -1.0


def test_repetition_penalty_equals_stock_generate_over_prompt_and_answer(tiny_llava):
    """With every visual token the engine's prompt ids are stock LLaVA's, and stock
    ``generate`` on input_ids penalizes prompt + answer ids, as vLLM does. The first
    question repeats the greedy answer, so a penalty over the answer alone (what
    ``generate`` sees on embeddings) would answer it differently. LLaVA-1.5: 576
    visual tokens an image, a cheap full-token prefill."""
    loaded15 = load_llava(ModelConfig(path=str(tiny_llava)))
    model, proc = loaded15
    imgs, full = images(SIZES[:2]), SelectionConfig(selector="full", budget=1.0)
    first = texts(answer(loaded15, imgs, QUESTIONS[:2], selection=full))[0]
    qs = [f"{first} {first}", QUESTIONS[1]]  # different lengths: a left-padded batch
    plain = texts(answer(loaded15, imgs, qs, selection=full))
    penalized = texts(answer(loaded15, imgs, qs, selection=full, repetition_penalty=1.3))
    assert penalized[0] != plain[0]
    eng = HiredEngine(model, proc, full, GenerationConfig())
    for img, q, got in zip(imgs, qs, penalized):  # one at a time: no padding in stock input_ids
        inp = proc(text=[eng.pre.prompt(q)], images=[img], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inp, max_new_tokens=12, do_sample=False, repetition_penalty=1.3)
        assert proc.tokenizer.decode(out[0, inp["input_ids"].shape[1] :], skip_special_tokens=True).strip() == got


# --------------------------------------------------------------------------- stop strings


def test_stop_cut_is_vllms_rule():
    assert stop_cut("abcdef", ["cd", "bcde"]) == 2  # the one that completes first wins
    assert stop_cut("abc", ["bc", "c"]) == 1  # both complete at once: the first listed
    assert stop_cut("abcabc", ["bc"], after=3) == 4  # must end beyond the min_new_tokens text
    assert stop_cut("abcabc", ["bc"], after=2) == 1
    assert stop_cut("abc", ["x"]) is None


def test_a_stop_string_ends_its_row_only(loaded, greedy):
    first = greedy[0]["answer"]
    word = next(w for w in first.split()[1:] if w.isalpha() and all(w not in i["answer"] for i in greedy[1:]))
    stopped = answer(loaded, stop=(word,))
    assert stopped[0]["answer"] == first[: first.index(word)].strip()
    n = stopped[0]["n_generated_tokens"]
    assert n < greedy[0]["n_generated_tokens"]
    assert stopped[1:] == greedy[1:]  # the other rows go on, unchanged
    # n counts up to the token that completes the stop string
    assert word in answer(loaded, max_new_tokens=n)[0]["answer"]
    assert word not in answer(loaded, max_new_tokens=n - 1)[0]["answer"]
    # as in vLLM, a stop string inside the first min_new_tokens tokens does not count
    assert answer(loaded, stop=(word,), min_new_tokens=n)[0]["n_generated_tokens"] > n


# --------------------------------------------------------------------------- system prompt


def test_system_prompt_is_in_the_prompt_ids(loaded, greedy, tiny_next):
    model, proc = loaded
    pre = Preprocessor.from_pretrained(str(tiny_next), SYSTEM)
    ids = pre(images()[0], QUESTIONS[0]).input_ids
    text = f"{SYSTEM} USER: <image>\n{QUESTIONS[0]} ASSISTANT:"  # the checkpoint's template, system first
    assert pre.prompt(QUESTIONS[0]) == text and ids.tolist() == proc.tokenizer(text)["input_ids"]
    told = answer(loaded, system_prompt=SYSTEM)
    extra = len(proc.tokenizer(SYSTEM, add_special_tokens=False)["input_ids"])
    assert [t["n_prompt_tokens"] - p["n_prompt_tokens"] for t, p in zip(told, greedy)] == [extra] * len(greedy)


def test_system_prompt_without_a_chat_template_and_with_one_that_refuses_or_drops_it(tiny_next):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(tiny_next))
    proc.chat_template = None
    assert chat_prompt(proc, "Q?", SYSTEM) == FALLBACK_SYSTEM.format(system=SYSTEM) + FALLBACK_TEMPLATE.format(
        question="Q?"
    )
    proc.chat_template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}{% endfor %}"
    with pytest.raises(ConfigError, match="refuses a system message: no system role"):
        Preprocessor(proc, "llava_next", SYSTEM)
    proc.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}USER: <image>\n{% endif %}{% endfor %}"
    with pytest.raises(ConfigError, match="leaves it out of the prompt"):
        Preprocessor(proc, "llava_next", SYSTEM)
    Preprocessor(proc, "llava_next")  # without a system prompt that template is fine


# --------------------------------------------------------------------------- the job


def test_the_job_stages_apply_every_option_and_keep_the_output_schema(tiny_next, loaded):
    """PreprocessStage + GenerateStage (what the Ray job runs) give the engine API's answers."""
    gen = GenerationConfig(
        max_new_tokens=12, temperature=0.7, top_k=1, repetition_penalty=1.2, stop=("?",), system_prompt=SYSTEM
    )
    imgs = images()
    batch = {
        "id": np.array(["a", "b", "c"], dtype=object),
        "image": np.array([image_to_bytes(i) for i in imgs], dtype=object),
        "question": np.array(QUESTIONS, dtype=object),
    }
    pre = PreprocessStage(str(tiny_next), ColumnSpec(), system_prompt=SYSTEM)(batch)
    model, _ = loaded
    stage = GenerateStage(
        ModelConfig(path=str(tiny_next)),
        SelectionConfig(),
        gen,
        engine=HiredEngine(model, loaded[1], SelectionConfig(), gen),
    )
    out = stage.table({k: np.array(pre.column(k).to_pylist(), dtype=object) for k in pre.column_names})
    assert out.schema == pa.schema(list(OUTPUT_FIELDS.items()))
    direct = HiredEngine(model, loaded[1], SelectionConfig(), gen).generate(imgs, QUESTIONS).items
    assert out.column("answer").to_pylist() == texts(direct)
    assert out.column("n_prompt_tokens").to_pylist() == [i["n_prompt_tokens"] for i in direct]
    assert not any("?" in a for a in out.column("answer").to_pylist())


def test_row_generation_reads_a_rows_options_over_the_jobs():
    from hired_batch.engine.generation_rules import row_generation

    job = GenerationConfig(max_new_tokens=8, temperature=0.5)
    assert row_generation(job, None) is None and row_generation(job, "") is None
    assert row_generation(job, '{"stop": "END", "top_k": 3}') == GenerationConfig(
        max_new_tokens=8, temperature=0.5, stop=("END",), top_k=3
    )
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['system_prompt'\]"):
        row_generation(job, {"system_prompt": "x"})
    with pytest.raises(ConfigError, match="expected a JSON object"):
        row_generation(job, "[1, 2]")


def test_each_row_gets_its_own_generation_options_in_one_batch(tiny_next, loaded):
    """A ``sampling`` column (per-row options, as Ray Data LLM's ``sampling_params``) gives
    each row its own answer length in one Ray batch; a row without one gets the job's, and
    a row whose options are wrong is an error row naming them."""
    gen = GenerationConfig(max_new_tokens=6, min_new_tokens=6)
    img = image_to_bytes(images()[0])
    batch = {
        "id": np.array(["short", "job", "long", "bad"], dtype=object),
        "image": np.array([img] * 4, dtype=object),
        "question": np.array([QUESTIONS[0]] * 4, dtype=object),
        "sampling": np.array(
            [
                {"max_new_tokens": 2, "min_new_tokens": 2},
                None,
                '{"max_new_tokens": 9, "min_new_tokens": 9}',
                {"max_new_tokens": 0},
            ],
            dtype=object,
        ),
    }
    pre = PreprocessStage(str(tiny_next), ColumnSpec())(batch)
    model, processor = loaded
    stage = GenerateStage(
        ModelConfig(path=str(tiny_next)),
        SelectionConfig(),
        gen,
        engine=HiredEngine(model, processor, SelectionConfig(), gen),
    )
    out = stage.table({k: np.array(pre.column(k).to_pylist(), dtype=object) for k in pre.column_names}).to_pylist()
    assert [r["n_generated_tokens"] for r in out[:3]] == [2, 6, 9]
    assert len({r["batch_id"] for r in out[:3]}) == 3  # one generate call per set of options
    assert out[3]["answer"] is None and out[3]["error"] == "sampling: max_new_tokens must be >= 1, got 0"


# --------------------------------------------------------------------------- flags and YAML


@pytest.fixture()
def dataset(tmp_path):
    img = image_to_bytes(make_synthetic_image(64, 48, 0))
    pq.write_table(pa.table({"id": ["a", "b"], "image": [img, img], "question": ["q1", "q2"]}), tmp_path / "in.parquet")
    return tmp_path


def run(capsys, *argv):
    return run_before_ray(capsys, *argv)


def base(d, model):
    return ["--input", str(d / "in.parquet"), "--output", str(d / "out"), "--model", str(model)]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top-k", "-1"], "top_k must be an integer >= 0 (0 = all tokens), got -1"),
        (["--repetition-penalty", "0"], "repetition_penalty must be a number > 0 (1 = off), got 0.0"),
        (["--repetition-penalty", "nan"], "repetition_penalty must be a number > 0 (1 = off), got nan"),
        (["--stop", "###", "--stop", ""], "stop must be non-empty strings, got ('###', '')"),
        (["--system-prompt", "  "], "system_prompt must be a non-empty string, got '  '"),
    ],
)
def test_bad_generation_flags_fail_with_one_line(capsys, dataset, tiny_next, extra, message):
    code, err = run(capsys, *base(dataset, tiny_next), *extra)
    assert code == 2
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "yaml_line, message",
    [  # types: job_from_options; ranges: GenerationConfig.check
        ("top-k: 2.5", "option 'top_k' expects int, got 2.5 (float)"),
        ("top-k: yes", "option 'top_k' expects int, got True (bool)"),
        ("top-k: -1", "top_k must be an integer >= 0 (0 = all tokens), got -1"),
        ("repetition-penalty: lots", "option 'repetition_penalty' expects float, got 'lots' (str)"),
        ("repetition-penalty: 0", "repetition_penalty must be a number > 0 (1 = off), got 0"),
        ("stop: 5", "option 'stop' expects a string or a list of strings, got 5 (int)"),
        ("stop: [END, 7]", "option 'stop' expects a string or a list of strings, got ['END', 7] (list)"),
        ("stop: ['']", "stop must be non-empty strings, got ('',)"),
        ("system-prompt: [a, b]", "option 'system_prompt' expects str, got ['a', 'b'] (list)"),
    ],
)
def test_bad_generation_yaml_fails_with_one_line(capsys, dataset, tiny_next, yaml_line, message):
    (dataset / "job.yaml").write_text(yaml_line + "\n")
    code, err = run(capsys, *base(dataset, tiny_next), "--config", str(dataset / "job.yaml"))
    assert code == 2
    assert message in err and len(err.splitlines()) == 1


def test_yaml_keys_are_the_flag_names(dataset, tiny_next):
    from hired_batch.job import job_from_options
    from hired_batch.job.runner import job_options, merged_options

    (dataset / "job.yaml").write_text(
        f"top-k: 5\nrepetition-penalty: 1.1\nstop: ['###', '\\n']\nsystem-prompt: {SYSTEM}\n"
    )
    args = build_parser().parse_args(
        ["run", *base(dataset, tiny_next), "--config", str(dataset / "job.yaml"), "--stop", "END"]
    )
    gen = job_from_options(job_options(merged_options(args))).generation
    assert (gen.top_k, gen.repetition_penalty, gen.stop, gen.system_prompt) == (5, 1.1, ("END",), SYSTEM)
    one = dataset / "one.yaml"
    one.write_text("stop: '###'\n")
    args = build_parser().parse_args(["run", *base(dataset, tiny_next), "--config", str(one)])
    assert job_from_options(job_options(merged_options(args))).generation.stop == ("###",)


def test_a_chat_template_that_drops_the_system_prompt_fails_before_ray(capsys, dataset, tiny_next, tmp_path):
    import shutil

    model = tmp_path / "no-system-model"
    shutil.copytree(tiny_next, model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: <image>\n{{ m['content'][1]['text'] }} "
        "{% endif %}{% endfor %}ASSISTANT:"
    )
    code, err = run(capsys, *base(dataset, model), "--system-prompt", SYSTEM)
    assert code == 2 and "chat template leaves it out of the prompt" in err and len(err.splitlines()) == 1
