"""Multi-seed statistics on constructed metrics files, the seed runner with mocked commands, the CLI."""

import json
import logging
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from scipy import stats as sps
from typer.testing import CliRunner

from aerialseg.cli import app
from aerialseg.core.errors import AerialsegError
from aerialseg.core.fileio import write_json
from aerialseg.evaluation.metrics import summarize
from aerialseg.evaluation.stats import (
    compare_runs,
    describe,
    holm,
    load_run,
    paired_test,
    write_comparison,
)
from aerialseg.stages.seeds import run_seeds
from helpers.runs import make_matrix, make_run


def strict_json(path: Path) -> dict:
    """JSON with NaN/Infinity rejected (they are not valid JSON)."""
    def reject(token: str) -> None:
        raise ValueError(f"{token} in {path}")
    return json.loads(path.read_text(), parse_constant=reject)


@pytest.mark.parametrize("how", ["summary", "run.json", "dirname"])
def test_load_run_finds_model_and_seed(tmp_path, how):
    run = load_run(make_run(tmp_path, "unet", 7, 0.8, how))
    assert (run.model, run.seed) == ("unet", 7)
    assert 0 < run.metrics["mIoU"] < 1


def test_label_prefix_names_the_group(tmp_path):
    run_dir = make_run(tmp_path, "pspnet", 2, 0.7)
    run = load_run(f"student={run_dir}")
    assert (run.model, run.seed, run.path) == ("student", 2, run_dir)
    with pytest.raises(AerialsegError, match="run directory not found"):
        load_run(f"student={tmp_path / 'nowhere'}")


def test_load_run_nested_metrics_and_errors(tmp_path):
    run_dir = tmp_path / "pspnet-seed3"
    write_json(run_dir / "eval" / "metrics.json", summarize(make_matrix(0.7, 1)))
    write_json(run_dir / "model.json", {"name": "pspnet"})
    assert (load_run(run_dir).model, load_run(run_dir).seed) == ("pspnet", 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AerialsegError, match="no metrics.json"):
        load_run(tmp_path / "empty")
    anonymous = tmp_path / "anon"
    write_json(anonymous / "metrics.json", summarize(make_matrix(0.7, 1)))
    write_json(anonymous / "model.json", {"name": "unet"})
    with pytest.raises(AerialsegError, match="seed"):
        load_run(anonymous)
    (anonymous / "metrics.json").write_text("{broken")
    with pytest.raises(AerialsegError, match="not valid JSON"):
        load_run(anonymous)


def test_describe_matches_numpy():
    values = [0.61, 0.64, 0.59, 0.66]
    d = describe(values)
    assert d["mean"] == pytest.approx(np.mean(values))
    assert d["std"] == pytest.approx(np.std(values, ddof=1))
    assert d["ci95"] == pytest.approx(sps.t.ppf(0.975, 3) * np.std(values, ddof=1) / 2)
    assert describe([0.5])["std"] is None and describe([])["mean"] is None


def test_compare_matches_scipy(tmp_path):
    runs = [load_run(make_run(tmp_path, m, s, q + 0.01 * s)) for s in (0, 1, 2)
            for m, q in (("small", 0.70), ("big", 0.78))]
    result = compare_runs(runs, metrics=["mIoU", "pixel_accuracy"])
    big = [r.metrics["mIoU"] for r in sorted(runs, key=lambda r: r.seed) if r.model == "big"]
    small = [r.metrics["mIoU"] for r in sorted(runs, key=lambda r: r.seed) if r.model == "small"]
    assert result["models"]["big"]["mIoU"]["mean"] == pytest.approx(np.mean(big))
    assert result["models"]["big"]["mIoU"]["std"] == pytest.approx(np.std(big, ddof=1))
    assert set(result["models"]["big"]["iou"]) == {"background", "road", "water", "tree", "building"}
    test = next(t for t in result["comparisons"] if t["metric"] == "mIoU")
    assert (test["a"], test["b"], test["n"]) == ("big", "small", 3)
    expected = sps.ttest_rel(big, small)
    assert test["t"] == pytest.approx(expected.statistic)
    assert test["p_ttest"] == pytest.approx(expected.pvalue)
    diff = np.subtract(big, small)
    assert test["cohen_dz"] == pytest.approx(diff.mean() / diff.std(ddof=1))
    assert test["p_wilcoxon"] is None and any("Wilcoxon" in n for n in test["notes"])
    assert result["warnings"] == []


def test_one_model_gives_mean_and_std_without_a_test_table(tmp_path):
    from aerialseg.evaluation.stats import markdown_table

    runs = [load_run(make_run(tmp_path, "default", s, 0.7 + 0.01 * s)) for s in (0, 1, 2)]
    result = compare_runs(runs)
    values = [r.metrics["mIoU"] for r in runs]
    assert result["comparisons"] == []
    table = markdown_table(result)
    assert f"| default | 0, 1, 2 | {np.mean(values):.4f} ± {np.std(values, ddof=1):.4f} |" in table
    assert "a vs b" not in table


def test_wilcoxon_from_six_seeds():
    rng = np.random.default_rng(3)
    a = {s: 0.7 + 0.02 * rng.standard_normal() for s in range(8)}
    b = {s: a[s] - 0.01 - 0.01 * rng.random() for s in range(8)}
    test = paired_test(a, b)
    expected = sps.wilcoxon([a[s] for s in range(8)], [b[s] for s in range(8)])
    assert test["p_wilcoxon"] == pytest.approx(expected.pvalue)
    assert test["p_wilcoxon"] < 0.01 and test["mean_diff"] > 0


def test_identical_runs_give_p_one(tmp_path):
    runs = [load_run(make_run(tmp_path / m, "same", s, 0.75)) for m in ("a", "b") for s in range(6)]
    runs = [type(r)(r.path, model, r.seed, r.metrics) for r, model in zip(runs, ["A"] * 6 + ["B"] * 6)]
    result = compare_runs(runs)
    test = result["comparisons"][0]
    assert test["p_ttest"] == 1.0 and test["p_wilcoxon"] == 1.0 and test["mean_diff"] == 0.0
    out = write_comparison(result, tmp_path / "compare.json")
    assert strict_json(out)["comparisons"][0]["p_ttest"] == 1.0


def test_constant_difference_has_no_p():
    test = paired_test({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.25, 1: 0.35, 2: 0.45})
    assert test["p_ttest"] is None and test["t"] is None and "zero variance" in " ".join(test["notes"])


def test_mismatched_seeds_pair_common_and_warn(tmp_path, caplog):
    runs = [load_run(make_run(tmp_path, "a", s, 0.7)) for s in (0, 1, 2, 3)]
    runs += [load_run(make_run(tmp_path, "b", s, 0.8)) for s in (1, 2, 3, 4)]
    with caplog.at_level(logging.WARNING):
        result = compare_runs(runs, metrics=["mIoU"])
    test = result["comparisons"][0]
    assert test["seeds"] == [1, 2, 3] and test["n"] == 3
    assert any("[0, 4]" in w for w in result["warnings"]) and "[0, 4]" in caplog.text
    a = [result["models"]["a"]["per_seed"]["mIoU"][str(s)] for s in (1, 2, 3)]
    b = [result["models"]["b"]["per_seed"]["mIoU"][str(s)] for s in (1, 2, 3)]
    assert test["p_ttest"] == pytest.approx(sps.ttest_rel(a, b).pvalue)


def test_single_common_seed_runs_no_test():
    test = paired_test({0: 0.5, 1: 0.6}, {1: 0.55, 2: 0.6})
    assert test["n"] == 1 and test["p_ttest"] is None


def test_duplicate_and_missing_inputs(tmp_path):
    run = load_run(make_run(tmp_path, "a", 0, 0.7))
    with pytest.raises(AerialsegError, match="two runs"):
        compare_runs([run, run])
    with pytest.raises(AerialsegError, match="no runs"):
        compare_runs([])
    with pytest.raises(AerialsegError, match="no run has the metric"):
        compare_runs([run], primary="nonsense")
    with pytest.raises(AerialsegError, match="baseline"):
        compare_runs([run], baseline="zzz")


def test_holm_adjustment():
    assert holm([0.01, 0.04, None, 0.03]) == pytest.approx([0.03, 0.06, None, 0.06])


def test_write_comparison_files(tmp_path):
    runs = [load_run(make_run(tmp_path, m, s, q)) for s in (0, 1, 2) for m, q in (("x", 0.7), ("y", 0.8), ("z", 0.6))]
    out = write_comparison(compare_runs(runs, baseline="x"), tmp_path / "reports" / "compare.json")
    data = strict_json(out)
    assert {(t["a"], t["b"]) for t in data["comparisons"]} == {("y", "x"), ("z", "x")}
    md = out.with_suffix(".md").read_text()
    assert "| y vs x | mIoU | 3 |" in md and "± " in md
    png = mpimg.imread(out.with_suffix(".png"))
    assert png.shape[0] > 300 and png.shape[1] > 400
    assert not list(out.parent.glob(".aerialseg-tmp-*"))


def test_run_seeds_calls_train_and_evaluate(tmp_path):
    calls: list[list[str]] = []

    def fake_cli(command: list[str]) -> subprocess.CompletedProcess:
        calls.append(command)
        args = command[3:]
        out = Path(args[args.index("--out") + 1])
        if args[0] == "train":
            name, seed = args[args.index("--model") + 1], int(args[args.index("--seed") + 1])
            write_json(out / "model.json", {"name": name})
            write_json(out / "train_summary.json", {"model": name, "seed": seed})
        else:
            assert args[args.index("--model") + 1] == str(out) and args[args.index("--split") + 1] == "test"
            write_json(out / "metrics.json", summarize(make_matrix(0.7, len(calls))))
        return subprocess.CompletedProcess(command, 0)

    params = {"stats": {"runs_dir": str(tmp_path / "runs"), "epochs": 2}}
    dirs = run_seeds(params, ["unet", "pspnet"], [0, 1], runner=fake_cli)
    assert len(dirs) == 4 and len(calls) == 8
    assert calls[0][3:] == ["train", "--model", "unet", "--seed", "0", "--out", str(tmp_path / "runs/unet/seed0"),
                            "--params", "params.yaml", "--epochs", "2"]
    runs = [load_run(d) for d in dirs]
    assert {(r.model, r.seed) for r in runs} == {("unet", 0), ("unet", 1), ("pspnet", 0), ("pspnet", 1)}
    run_seeds(params, ["unet", "pspnet"], [0, 1], runner=fake_cli)  # resumes: nothing to do
    assert len(calls) == 8
    run_seeds(params, ["unet"], [0], epochs=5, runner=fake_cli)  # other epochs: runs again
    assert len(calls) == 10


def test_run_seeds_failure_names_the_run(tmp_path):
    def failing(command: list[str]) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(command, 3)

    with pytest.raises(AerialsegError, match="training unet seed 0 failed with exit code 3"):
        run_seeds({"stats": {"runs_dir": str(tmp_path)}}, ["unet"], [0], runner=failing)
    with pytest.raises(AerialsegError, match="no models"):
        run_seeds({}, [], [0], runner=failing)


def test_cli_compare(tmp_path, repo_root):
    dirs = [str(make_run(tmp_path, m, s, q)) for s in (0, 1, 2) for m, q in (("a", 0.7), ("b", 0.75))]
    out = tmp_path / "cmp.json"
    result = CliRunner().invoke(app, ["compare", *dirs, "--out", str(out), "--params",
                                      str(repo_root / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert strict_json(out)["primary"] == "mIoU" and out.with_suffix(".png").is_file()
    bad = CliRunner().invoke(app, ["compare", str(tmp_path / "missing"), "--params", str(repo_root / "params.yaml")])
    assert isinstance(bad.exception, AerialsegError) and "run directory not found" in str(bad.exception)
