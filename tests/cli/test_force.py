"""``--force`` replaces only what diffem wrote: a foreign folder or a plain file at OUT survives it,
refused in one line naming what is there; ``compare`` never writes into an em-train RUN."""

from __future__ import annotations

from pathlib import Path

from helpers import QUICK, TINY_MLP, error_line, run_ok, sets, snapshot


def test_corrupt_force_keeps_a_foreign_folder_and_a_plain_file(cli, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("x")
    plain = tmp_path / "plain"
    plain.write_text("mine")
    for out, what in (
        (precious, "holds files diffem did not write (thesis.txt)"),
        (plain, "is a plain file"),
    ):
        code, _, err = cli("corrupt", "digits", out, "-c", "mask", "--limit", 10, "--force")
        assert code == 2 and what in error_line(err), err
        assert "--force replaces only what diffem wrote" in error_line(err)
    assert (precious / "thesis.txt").read_text() == "x" and [p.name for p in precious.iterdir()] == [
        "thesis.txt"
    ]
    assert plain.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "precious"]  # no lock or temporary left
    # what corrupt wrote itself is replaced, and so is an empty folder
    (precious / "thesis.txt").unlink()
    for _ in range(2):
        code, _, err = cli("corrupt", "digits", precious, "-c", "mask", "--limit", 10, "--force")
        assert code == 0, err


def test_compare_refuses_an_em_train_run_and_a_foreign_folder_as_out(cli, tmp_path: Path) -> None:
    train = [*TINY_MLP, *sets("train.batch_size=32", "train.epochs=1"), *QUICK]
    run_ok(
        "corrupt",
        "manifold:samples=64",
        tmp_path / "obs",
        "-c",
        "projection",
        "--clean-out",
        tmp_path / "clean",
    )
    run_ok("em-train", tmp_path / "obs", tmp_path / "run", "--laps", 1, *train)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    before = snapshot(tmp_path / "run")
    for out, what in ((tmp_path / "run", "is a RUN folder"), (stranger, "did not write (notes.txt)")):
        for force in ([], ["--force"]):
            argv = [
                "compare",
                tmp_path / "obs",
                out,
                "--methods",
                "diffem",
                "--eval-clean",
                tmp_path / "clean",
            ]
            code, _, err = cli(*argv, "--laps", 1, *train, *force)
            assert code == 2 and what in error_line(err), err
    assert snapshot(tmp_path / "run") == before
    assert [p.name for p in stranger.iterdir()] == ["notes.txt"]
