"""lm-evaluation-harness: our "mistral_jax" model against lm_eval's own `hf` model on transformers'
MistralForCausalLM (a tiny random model with the real v1 tokenizer): the same token splits, per-request
log-likelihoods (1e-4, float32), rolling windows, accuracy on a local multiple-choice task, greedy text on a
local generation task; sampling; and `python -m infer.eval` running lm_eval's command line."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval")

from hf_models import make_hf_model  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from mistral_jax.lm_eval_model import MistralJaxLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(ROOT, "tests", "data", "lm_eval")
MAX_LENGTH = 32  # small, so that contexts are truncated and texts span several rolling windows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, v1_tokenizer_path):
    """(checkpoint dir: a transformers directory with tokenizer.model and transformers' tokenizer, torch model)."""
    model = make_hf_model(11, vocab_size=32000, sliding_window=16, max_position_embeddings=256)[0]
    d = str(tmp_path_factory.mktemp("tiny"))
    model.save_pretrained(d)
    shutil.copy(v1_tokenizer_path, os.path.join(d, "tokenizer.model"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as fh:
        json.dump(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
            },
            fh,
        )
    return d, model


@pytest.fixture(scope="module")
def ours(tiny):
    return MistralJaxLM(checkpoint=tiny[0], batch_size=4, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def theirs(tiny):
    import transformers
    from lm_eval.models.huggingface import HFLM

    tok = transformers.AutoTokenizer.from_pretrained(tiny[0])
    return HFLM(pretrained=tiny[1], tokenizer=tok, batch_size=1, max_length=MAX_LENGTH, device="cpu")


def _requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


LONG = (
    "The river ran past the old mill and under the stone bridge, where children fished on summer evenings "
    "and the miller's dog slept in the shade of the willow trees that grew along the bank"
)


def test_token_splits_and_loglikelihoods_equal_hf(ours, theirs):
    pairs = [
        ("Question: What is the capital of France?\nAnswer:", " Paris"),
        ("The capital of France is ", "Paris, a city on the Seine."),  # trailing space moves over
        ("", "Hello world"),  # empty context: conditioned on BOS
        (LONG, " and the fish"),  # longer than max_length: truncated from the left
        ("One two", " three four five six seven eight nine ten"),
    ]
    for ctx, cont in pairs:
        if ctx:
            assert ours._encode_pair(ctx, cont) == theirs._encode_pair(ctx, cont)
    assert len(ours.tok_encode(LONG)) > MAX_LENGTH + 1
    got = ours.loglikelihood(_requests("loglikelihood", pairs))
    want = theirs.loglikelihood(_requests("loglikelihood", pairs))
    for (g, g_greedy), (w, w_greedy) in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4) and g_greedy == w_greedy
    assert all(math.isfinite(g) and g < 0 for g, _ in got)


def test_rolling_loglikelihoods_equal_hf(ours, theirs):
    texts = ["Hello world", LONG, LONG + ". " + LONG]  # one window, two, three
    assert ours.tok_encode(texts[2]) == theirs.tok_encode(texts[2])
    got = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
    want = theirs.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
    assert got == pytest.approx(want, abs=1e-4)


def test_generate_until_gives_hf_greedy_text(ours, theirs):
    """Stop strings cut where transformers' do (one taken from the middle of the free text), the context
    keeps its last max_length - max_gen_toks tokens, and max_gen_toks bounds the rest."""
    free = [
        ("Once upon a time", {"until": [], "max_gen_toks": 12}),
        (LONG, {"max_gen_toks": 12}),
        ("Hi", {"until": ["\n\n"], "max_gen_toks": 5, "do_sample": False, "temperature": 0.0}),
    ]
    got = ours.generate_until(_requests("generate_until", free))
    assert got == theirs.generate_until(_requests("generate_until", free))
    stop = got[0].split()[len(got[0].split()) // 2]
    cut = [("Once upon a time", {"until": [stop], "max_gen_toks": 12})]
    got_cut = ours.generate_until(_requests("generate_until", cut))
    assert got_cut == theirs.generate_until(_requests("generate_until", cut))
    assert got_cut[0] == got[0].split(stop)[0] and len(got_cut[0]) < len(got[0])
    # The greedy text, scored as a continuation, is greedy for both.
    scored = _requests("loglikelihood", [("Once upon a time", got[0])])
    assert ours.loglikelihood(scored)[0][1] and theirs.loglikelihood(scored)[0][1]


def test_adapter_scores_equal_hf_with_peft(tiny, tmp_path, theirs):
    """MistralJaxLM(checkpoint=BASE, adapter=DIR) scores as lm_eval's `hf` model on transformers + peft."""
    import transformers
    from lm_eval.models.huggingface import HFLM
    from test_peft_adapter import make_peft

    out = str(tmp_path / "adapter")
    peft_model = make_peft(tiny[1], out, r=2, target_modules=["q_proj", "o_proj", "up_proj"])
    ours = MistralJaxLM(checkpoint=tiny[0], adapter=out, batch_size=4, max_length=MAX_LENGTH)
    merged = HFLM(
        pretrained=peft_model.merge_and_unload(),
        tokenizer=theirs.tokenizer,
        batch_size=1,
        max_length=MAX_LENGTH,
        device="cpu",
    )
    assert isinstance(merged.tokenizer, transformers.PreTrainedTokenizerBase)
    pairs = _requests(
        "loglikelihood", [("Question: What is the capital of France?\nAnswer:", " Paris"), (LONG, " and the fish")]
    )
    got, want, base = ours.loglikelihood(pairs), merged.loglikelihood(pairs), theirs.loglikelihood(pairs)
    assert [g for g, _ in got] == pytest.approx([w for w, _ in want], abs=1e-4)
    assert abs(got[0][0] - base[0][0]) > 1e-2  # the adapter moves the scores


def _evaluate(lm, tasks, **kw):
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=TaskManager(include_path=TASKS, include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
        **kw,
    )


def test_local_tasks_equal_hf(ours, theirs):
    tasks = ["mj_local_mc", "mj_local_gen"]
    got, want = _evaluate(ours, tasks), _evaluate(theirs, tasks)
    mc_got, mc_want = got["samples"]["mj_local_mc"], want["samples"]["mj_local_mc"]
    assert len(mc_got) == 12
    for g, w in zip(mc_got, mc_want):
        assert g["doc_id"] == w["doc_id"] and g["arguments"] == w["arguments"]
        for ctx, cont in g["arguments"]:
            assert ours._encode_pair(ctx, cont) == theirs._encode_pair(ctx, cont)
        for (lg, gg), (lw, gw) in zip([r[0] for r in g["resps"]], [r[0] for r in w["resps"]]):
            assert float(lg) == pytest.approx(float(lw), abs=1e-4) and gg == gw
    for metric in ("acc,none", "acc_norm,none"):
        assert got["results"]["mj_local_mc"][metric] == want["results"]["mj_local_mc"][metric]
    gen_got, gen_want = got["samples"]["mj_local_gen"], want["samples"]["mj_local_gen"]
    assert [s["resps"] for s in gen_got] == [s["resps"] for s in gen_want]
    assert any(s["resps"][0][0] for s in gen_got)  # not all empty
    assert got["results"]["mj_local_gen"]["exact_match,none"] == want["results"]["mj_local_gen"]["exact_match,none"]


def test_sampled_generation_is_seeded_and_stops(ours):
    args = [("Once upon a time", {"max_gen_toks": 10, "do_sample": True, "temperature": 0.9})] * 3
    first = ours.generate_until(_requests("generate_until", args))
    assert first == ours.generate_until(_requests("generate_until", args))  # request i samples with seed + i
    assert len(set(first)) > 1  # ... so that repeats of one request differ
    stop = first[0].split()[len(first[0].split()) // 2]
    cut = ours.generate_until(_requests("generate_until", [(a[0], {**a[1], "until": [stop]}) for a in args]))
    assert cut[0] == first[0].split(stop)[0] and all(stop not in t for t in cut)
    with pytest.raises(ValueError, match="unsupported generation settings"):
        ours.generate_until(_requests("generate_until", [("Hi", {"num_beams": 4})]))


def test_cli_runs_lm_eval_on_a_local_task(tiny, tmp_path, monkeypatch, capsys):
    """`python -m infer.eval` in this process (its lm_eval part indexes only the local tasks, to save the time
    of scanning lm_eval's thousands of task files)."""
    import lm_eval.tasks

    from infer import eval as eval_cli
    from mistral_jax import launch

    class LocalTasks(lm_eval.tasks.TaskManager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, include_defaults=False)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTasks)
    monkeypatch.setattr(sys, "argv", ["python -m infer.eval"])
    out = tmp_path / "out"
    argv = [
        "--checkpoint",
        tiny[0],
        "--tasks",
        "mj_local_mc",
        "--include_path",
        TASKS,
        "--limit",
        "4",
        "--model_args",
        f"max_length={MAX_LENGTH}",
        "--output_path",
        str(out),
    ]
    assert launch.run_tool(eval_cli.main, argv) == 0
    assert "mj_local_mc" in capsys.readouterr().out
    results = [os.path.join(b, f) for b, _, fs in os.walk(out) for f in fs if f.startswith("results")]
    data = json.load(open(results[0]))
    assert data["config"]["model"] == "mistral_jax" and data["results"]["mj_local_mc"]["sample_len"] == 4
    assert tiny[0] in json.dumps(data["config"]["model_args"])

    for bad, message in (
        (["--checkpoint", str(tmp_path / "missing"), "--tasks", "x"], "missing: not a directory"),
        (["--checkpoint", tiny[0], "--model", "hf", "--tasks", "x"], "--model is set by infer.eval"),
    ):
        assert launch.run_tool(eval_cli.main, bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_cli_script_starts(tmp_path):
    """The module runs as a script: a user error is one line and exit code 2."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(
        [sys.executable, "-m", "infer.eval", "--checkpoint", str(tmp_path / "missing"), "--tasks", "x"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip() == f"error: --checkpoint {tmp_path / 'missing'}: not a directory"
