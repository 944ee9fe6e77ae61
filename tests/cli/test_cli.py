import pytest

from bench.cli import build_parser, main


def subcommands(parser) -> list[list[str]]:
    """Every command path, e.g. ['bench', 'loss'], read from the parser itself."""
    paths = []
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            paths.append([name])
            if sub._subparsers is not None:
                paths += [[name, *rest] for rest in subcommands(sub)]
    return paths


@pytest.mark.parametrize("path", subcommands(build_parser()), ids=" ".join)
def test_every_command_explains_itself(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: smoothap-bench " + " ".join(path))


def test_config_errors_exit_2_naming_the_key(capsys, tmp_path):
    code = main(["train", "--set", "optim.lrr=1", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert code == 2
    assert "unknown key optim.lrr" in capsys.readouterr().err


def test_unknown_loss_exits_2_listing_the_registry(capsys, tmp_path):
    code = main(
        [
            "train",
            "--loss",
            "nope",
            "--set",
            "data.root=/nonexistent",
            "--tracking-uri",
            f"sqlite:///{tmp_path}/m.db",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown loss 'nope'" in err and "smooth_ap" in err  # named before any data is read


@pytest.mark.parametrize(
    ("argv", "name", "trials"),
    [
        (["run"], "omniglot", None),  # None: the bundled config's own budget
        (["run", "--experiment-name", "abl"], "abl", None),  # a full run under its own name
        (["run", "--quick"], "omniglot-quick", 2),
        (
            ["run", "--quick", "--experiment-name", "q2", "--set", "tune.trials=3"],
            "q2",
            3,
        ),  # --set still wins
    ],
)
def test_run_names_its_experiment_and_applies_the_quick_budget(argv, name, trials):
    from bench.cli.commands import main_job_experiment
    from bench.config import load_experiment

    exp = main_job_experiment(build_parser().parse_args(argv))
    trials = load_experiment("omniglot").tune.trials if trials is None else trials
    assert (exp.name, exp.tracking.experiment, exp.tune.trials) == (name, name, trials)


def test_an_unreachable_optuna_database_exits_2_in_one_line(capsys, tmp_path, monkeypatch):
    pytest.importorskip("psycopg")
    import bench.tune.study

    monkeypatch.setattr(bench.tune.study, "STORAGE_RETRY_S", 0.5)
    url = "postgresql+psycopg://bench:s3cret@127.0.0.1:9/studies"  # port 9 (discard): refused at once
    argv = ["tune", "--losses", "smooth_ap", "--trials", "1", "--storage", url]
    code = main([*argv, "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    err = capsys.readouterr().err
    assert code == 2
    (line,) = [line for line in err.splitlines() if not line.startswith(("20", "INFO"))]  # less MLflow's INFO
    assert line.startswith(
        "error: cannot open Optuna storage postgresql+psycopg://bench:***@127.0.0.1:9/studies"
    )
    assert "Connection refused" in line and "s3cret" not in err
