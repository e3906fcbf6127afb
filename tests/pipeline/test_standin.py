"""The paper route rehearsed on stand-in data: lm-eval's own 14 paper tasks, data swapped.

One lm-eval run of all 14 tasks on a tiny random Qwen3-MoE (about 20-30 s on 2 CPU cores)
proves every task loads offline and returns its metric; one run with an oracle model that
answers with the stand-in solutions proves the code tasks really execute the programs and
MATH-500 really scores with math-verify (a right answer scores 1, the random model 0).
"""

from __future__ import annotations

import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from moepaper.pipeline import standin

# Paper protocol, except max_gen_toks (2048 in the real suite) kept small for CPU speed.
TEST_GEN_KWARGS = {"max_gen_toks": 16, "do_sample": False}
PAPER_MAX_LENGTH = 4096

# The metric each task returns in lm-eval 0.4.13 ("metric,filter").
METRIC_KEYS = {
    "arc_challenge": "acc_norm,none",
    "arc_easy": "acc_norm,none",
    "boolq": "acc,none",
    "hellaswag": "acc_norm,none",
    "mmlu": "acc,none",
    "openbookqa": "acc_norm,none",
    "rte": "acc,none",
    "winogrande": "acc,none",
    "humaneval": "pass@1,create_test",
    "humaneval_plus": "pass@1,create_test",
    "mbpp": "pass_at_1,none",
    "mbpp_plus": "pass_at_1,none",
    "gsm8k": "exact_match,flexible-extract",
    "minerva_math500": "math_verify,none",
}
GENERATIVE = ("humaneval", "humaneval_plus", "mbpp", "mbpp_plus", "gsm8k", "minerva_math500")


def tiny_qwen3_moe():
    """A tiny random Qwen3-MoE as `moepaper.tiny.tiny_model("qwen3_moe")` builds it (context 4096)."""
    import transformers

    config = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=PAPER_MAX_LENGTH, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, norm_topk_prob=True, moe_intermediate_size=16,
        mlp_only_layers=[0], decoder_sparse_step=1, head_dim=8, num_experts=8, num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") or "bias" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            if "experts" in name and name.endswith(("gate_up_proj", "down_proj")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def char_tokenizer(chat_template: str | None = None):
    """The character-level tokenizer of `moepaper.models.tiny_tokenizer()` (ids 0-3 special)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = ["<pad>", "<s>", "</s>", "<unk>", "\n", "\t"] + [chr(c) for c in range(32, 127)]
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    if chat_template:
        tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    return standin.standin_task_manager(tmp_path_factory.mktemp("standin_tasks"))


@pytest.fixture(scope="module")
def code_eval_cache(tmp_path_factory):
    os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    with standin.offline_code_eval(tmp_path_factory.mktemp("evaluate_modules")) as root:
        yield root


@pytest.fixture(scope="module")
def random_model_run(task_manager, code_eval_cache):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(1)
    started = time.time()
    lm = HFLM(pretrained=tiny_qwen3_moe(), tokenizer=char_tokenizer(), batch_size=4, max_length=PAPER_MAX_LENGTH)
    output = lm_eval.simple_evaluate(
        model=lm, tasks=list(standin.PAPER_TASKS), task_manager=task_manager, num_fewshot=0,
        gen_kwargs=dict(TEST_GEN_KWARGS), confirm_run_unsafe_code=True, bootstrap_iters=0, log_samples=True,
        random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )
    output["seconds"] = time.time() - started
    print(f"\nall 14 stand-in tasks on the tiny model: {output['seconds']:.1f} s")
    return output


class OracleLM:
    """An lm-eval model that answers every generative stand-in task with its reference solution."""

    @staticmethod
    def answer(task: str, doc: dict) -> str:
        if task in ("humaneval", "humaneval_plus"):
            return doc["canonical_solution"]  # the create_test filter prepends the prompt
        if task in ("mbpp", "mbpp_plus"):
            return doc["code"]
        if task == "gsm8k":
            return doc["answer"]  # reasoning, then "#### N": both filters extract N
        if task == "minerva_math500":
            return f"{doc['solution']}\nFinal Answer: The final answer is ${doc['answer']}$. I hope it is correct."
        raise KeyError(task)

    @classmethod
    def build(cls):
        from lm_eval.api.model import LM

        class _Oracle(LM):
            def generate_until(self, requests, disable_tqdm=False):
                return [cls.answer(r.task_name, r.doc) for r in requests]

            def loglikelihood(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return _Oracle()


@pytest.fixture(scope="module")
def oracle_run(task_manager, code_eval_cache):
    import lm_eval

    return lm_eval.simple_evaluate(
        model=OracleLM.build(), tasks=list(GENERATIVE), task_manager=task_manager, num_fewshot=0,
        gen_kwargs=dict(TEST_GEN_KWARGS), confirm_run_unsafe_code=True, bootstrap_iters=0,
    )


# ---------------------------------------------------------------- the task folder


def test_yamls_override_only_the_data_source(tmp_path):
    """Every stand-in task is lm-eval's own config with dataset_path/name/kwargs swapped."""
    from lm_eval.tasks._yaml_loader import load_yaml

    folder = standin.standin_task_dir(tmp_path)
    tasks_dir = standin.lm_eval_tasks_dir()
    originals = {task: tasks_dir / rel for task, (rel, _) in standin.PAPER_TASK_YAMLS.items()}
    originals.update({f"mmlu_{s}": tasks_dir / standin.MMLU_DIR / f"mmlu_{s}.yaml" for s in standin.mmlu_subjects()})
    assert len(originals) == 13 + 57
    for yaml_path in folder.rglob("*.yaml"):
        ours = load_yaml(yaml_path, resolve_func=False)
        if "group" in ours:
            continue
        theirs = load_yaml(originals[ours["task"]], resolve_func=False)
        assert ours["dataset_path"] == "json" and ours["dataset_name"] is None
        for split, file in ours["dataset_kwargs"]["data_files"].items():
            assert os.path.isfile(file), file
        differing = {k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)}
        assert differing <= {"dataset_path", "dataset_name", "dataset_kwargs"}, (yaml_path, differing)
        # !function references still point into lm-eval's own task folders
        for value in ours.values():
            if isinstance(value, str) and value.endswith((".process_docs", ".doc_to_text", ".process_results")):
                assert str(tasks_dir) in value


def test_every_split_read_exists_and_mmlu_covers_57_subjects():
    assert len(standin.mmlu_subjects()) == 57
    for subject in standin.mmlu_subjects():
        for split in standin.MMLU_SPLITS:
            rows = standin.standin_docs(f"mmlu_{subject}", split)
            assert rows and set(rows[0]) == {"question", "subject", "choices", "answer"}
            assert len(rows[0]["choices"]) == 4 and rows[0]["subject"] == subject
    for task, (_, splits) in standin.PAPER_TASK_YAMLS.items():
        for split in splits:
            assert standin.standin_docs(task, split), (task, split)


def test_calibration_standins_pack_through_the_real_calibration_code():
    from moepaper.pipeline import calibration

    assert set(standin.calibration_standin("c4")[0]) == {"text", "timestamp", "url"}
    assert set(standin.calibration_standin("code")[0]) == {"instruction", "output"}
    math_record = standin.calibration_standin("math")[0]
    assert set(math_record) == {"id", "prompt", "messages"}
    assert [m["role"] for m in math_record["messages"]] == ["user", "assistant"]
    template = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    for key in standin.CALIBRATION_KEYS:
        for tok in (char_tokenizer(), char_tokenizer(template)):
            sequences = calibration.calibration_sequences(f"standin:{key}", tok, n_sequences=8, seq_len=64)
            assert sequences.shape == (8, 64)
    text = calibration.format_record(math_record, calibration.SOURCES["math"], char_tokenizer(template))
    assert text.startswith("<|user|>\n") and "<|assistant|>" in text
    # the stand-in source goes through the real formatting: chat records get the template
    texts = list(calibration.calibration_texts("standin:math", char_tokenizer(template)))
    assert len(texts) == len(standin.calibration_standin("math")) and all(t.startswith("<|user|>") for t in texts)
    assert "stand-in" in calibration.calibration_description("standin:c4", n_sequences=1, seq_len=8, seed=0)
    assert "standin:code" in calibration.available_sources()


# ---------------------------------------------------------------- lm-eval end to end


def test_all_14_paper_tasks_return_their_metric(random_model_run):
    results = {**random_model_run.get("groups", {}), **random_model_run["results"]}
    for task, key in METRIC_KEYS.items():
        assert key in results[task], (task, sorted(results[task]))
        value = results[task][key]
        assert isinstance(float(value), float) and not math.isnan(value), (task, value)
        assert 0.0 <= value <= 1.0
    # every stand-in row was evaluated (MMLU: one per subject)
    counts = random_model_run["n-samples"]
    assert counts["arc_easy"]["effective"] == len(standin.standin_docs("arc_easy", "test"))
    assert counts["hellaswag"]["effective"] == len(standin.standin_docs("hellaswag", "validation"))
    assert sum(counts[f"mmlu_{s}"]["effective"] for s in standin.mmlu_subjects()) == 57
    assert random_model_run["seconds"] < 300


def test_paper_protocol_reaches_the_model(random_model_run):
    """Zero-shot prompts (no chat template), greedy, lm-eval's own stop sequences kept."""
    samples = random_model_run["samples"]
    context, gen = samples["gsm8k"][0]["arguments"][0]
    assert context.startswith("Question: ") and context.endswith("\nAnswer:") and context.count("Question:") == 1
    assert gen["do_sample"] is False and gen["max_gen_toks"] == TEST_GEN_KWARGS["max_gen_toks"]
    assert "Question:" in gen["until"]
    context, gen = samples["minerva_math500"][0]["arguments"][0]
    assert context.startswith("Problem:\n") and context.endswith("\n\nSolution:") and context.count("Problem:") == 1
    context, _ = samples["mbpp"][0]["arguments"][0]
    assert context.startswith("You are an expert Python programmer") and context.count("[BEGIN]") == 1  # not 3-shot
    context, gen = samples["humaneval"][0]["arguments"][0]
    assert context == standin.standin_docs("humaneval", "test")[0]["prompt"] and "\ndef" in gen["until"]
    context, _ = samples["mmlu_anatomy"][0]["arguments"][0]
    assert context.startswith("The following are multiple choice questions (with answers) about anatomy.")
    assert "<|" not in context


def test_right_answers_score_one_code_runs_and_math_verify_checks(oracle_run):
    results = oracle_run["results"]
    for task in GENERATIVE:
        assert results[task][METRIC_KEYS[task]] == 1.0, (task, results[task])
    assert results["gsm8k"]["exact_match,strict-match"] == 1.0
    assert results["minerva_math500"]["exact_match,none"] == 1.0


def test_wrong_programs_fail_when_executed(code_eval_cache):
    import evaluate

    metric = evaluate.load("code_eval")
    scores, details = metric.compute(
        references=["assert f(2) == 4", "assert f(2) == 4", "assert f(2) == 4"],
        predictions=[["def f(x):\n    return x * 2"], ["def f(x):\n    return x + 3"], ["def f(x):\n    while True: pass"]],
        k=[1], timeout=1.0,
    )
    assert scores["pass@1"] == pytest.approx(1 / 3)
    assert [d[0][1]["passed"] for d in details.values()] == [True, False, False]
    assert details[2][0][1]["result"] == "timed out"


# ---------------------------------------------------------------- the task folder under concurrency (issue 22)

_WRITER = """
import sys
from pathlib import Path
from moepaper.pipeline import standin
expected = standin.task_yamls()
bad = 0
for _ in range(int(sys.argv[2])):
    try:
        folder = standin.standin_task_dir(sys.argv[1])
        files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*.yaml")}
        subjects = sum(f"mmlu/mmlu_{s}.yaml" in files for s in standin.mmlu_subjects())
        if set(files) != set(expected) or any(files[n].read_text() != t for n, t in expected.items()):
            bad += 1
            print(f"partial folder: {len(files)} of {len(expected)} files, {subjects} of 57 MMLU subjects", flush=True)
    except Exception as error:  # FileNotFoundError, "Directory not empty", FileExistsError, ...
        bad += 1
        print(f"{type(error).__name__}: {error}", flush=True)
print(f"BAD {bad}")
"""


def test_concurrent_processes_never_see_a_partial_folder(tmp_path):
    """Four processes ask for the same folder 15 times each and read it back at once: every read finds
    the whole folder (before issue 22 each call removed and rewrote it: partial task indexes, crashes)."""
    import subprocess
    import sys

    target = tmp_path / "tasks"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(target), "15"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for _ in range(4)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert all(out.strip().endswith("BAD 0") for out in outputs), outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tasks"]  # no staging folder left behind


def test_a_partial_or_outdated_folder_is_replaced_whole(tmp_path):
    folder = standin.standin_task_dir(tmp_path / "tasks")
    expected = standin.task_yamls()
    for path in sorted(folder.glob("mmlu/mmlu_*.yaml"))[:13]:  # a folder written halfway: 44 of 57 subjects
        path.unlink()
    (folder / "boolq.yaml").write_text("include: elsewhere\n")
    assert standin.standin_task_dir(folder) == folder
    files = {p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*.yaml")}
    assert files == expected
    # an old folder (no manifest, as written before issue 22) is replaced too; an intact one is kept as it is
    (folder / standin.MANIFEST).unlink()
    standin.standin_task_dir(folder)
    stamp = (folder / standin.MANIFEST).stat().st_mtime_ns
    standin.standin_task_dir(folder)
    assert (folder / standin.MANIFEST).stat().st_mtime_ns == stamp


def test_a_file_or_link_at_the_folder_path_is_a_clear_error(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(FileExistsError, match="a file is in the way"):
        standin.standin_task_dir(tmp_path / "a_file")
    real = standin.standin_task_dir(tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(FileExistsError, match="a symbolic link is in the way"):
        standin.standin_task_dir(tmp_path / "link")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"holds files that are not stand-in task YAMLs \(notes.txt\)"):
        standin.standin_task_dir(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_the_default_folder_is_complete():
    folder = standin.standin_task_dir()
    assert folder.name.startswith("moepaper-standin-tasks-") and standin._is_complete(folder, standin.task_yamls())
    assert {f"mmlu_{s}.yaml" for s in standin.mmlu_subjects()} <= {p.name for p in folder.glob("mmlu/*.yaml")}
